"""Argument checks of the public functions: each names the argument, what was expected and
how to fix it. None of them reads an array's values but :func:`check_finite`."""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

from ._compat import Array, all_finite, device, is_eager, is_floating, namespace

__all__ = [
    "broadcast_shapes",
    "check_causal",
    "check_chunk",
    "check_devices",
    "check_finite",
    "check_mask",
    "check_qkv",
    "check_rank",
    "check_scale",
    "check_shape",
]


def broadcast_shapes(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    """The broadcast of ``shapes`` (``ValueError`` when they do not broadcast)."""
    ndim = max(len(s) for s in shapes)
    out = []
    for i in range(-ndim, 0):
        sizes = {s[i] for s in shapes if len(s) >= -i} - {1}
        if len(sizes) > 1:
            raise ValueError(f"shapes {shapes} do not broadcast")
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def check_qkv(
    xp: ModuleType, q: Array, k: Array, v: Array, names: tuple[str, str, str]
) -> tuple[int, ...]:
    """Check ranks, shapes and dtypes; return the broadcast batch shape."""
    for name, a in zip(names, (q, k, v), strict=True):
        if a.ndim < 2:
            raise ValueError(f"{name} must have shape (..., L, dim), got shape {tuple(a.shape)}")
        if not is_floating(xp, a.dtype):
            raise TypeError(f"{name} must have a real floating dtype, got {a.dtype}")
    nq, nk, nv = names
    if q.shape[-1] == 0:
        raise ValueError(f"{nq} must have a feature dimension d >= 1, got shape {tuple(q.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"{nq} and {nk} need the same last dimension, got {nq}.shape={tuple(q.shape)} "
            f"and {nk}.shape={tuple(k.shape)}"
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"{nk} and {nv} need the same length (axis -2), got {nk}.shape={tuple(k.shape)} "
            f"and {nv}.shape={tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"{nq}, {nk} and {nv} must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}"
        )
    try:
        return broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except ValueError:
        raise ValueError(
            f"batch dimensions of {nq} {tuple(q.shape[:-2])}, {nk} {tuple(k.shape[:-2])} and "
            f"{nv} {tuple(v.shape[:-2])} do not broadcast"
        ) from None


def check_mask(
    xp: ModuleType, mask: Array | None, batch: tuple[int, ...], length: int, name: str
) -> Array | None:
    """Check a boolean mask of exactly ``len(batch) + 1`` dimensions (each the batch's or
    1, the last ``length``) and return it as ``(..., L, 1)`` for ``where``.

    Fewer dimensions are refused rather than broadcast: a ``(batch, L)`` mask on
    ``(batch, heads, L, d)`` inputs would otherwise mask the heads axis.
    """
    if mask is None:
        return None
    if mask.dtype != xp.bool:
        raise TypeError(f"{name} must be a boolean array (True = a real token), got {mask.dtype}")
    check_rank(mask, batch, length, name)
    return mask[..., None]


def check_rank(a: Array, batch: tuple[int, ...], length: int, name: str) -> None:
    """``a`` (a mask or segment ids) of shape ``batch + (length,)`` up to 1s: exactly
    ``q.ndim - 1`` dimensions, each q's or 1. The error shows the fix for a mask with
    too few dimensions (``mask[:, None, :]``)."""
    shape, target = tuple(a.shape), (*batch, length)
    ok = len(shape) == len(target) and shape[-1] == length
    ok = ok and all(s in (1, t) for s, t in zip(shape[:-1], batch, strict=True))
    if ok:
        return
    hint = ""
    if len(shape) < len(target) and shape and shape[-1] == length:
        missing = len(target) - len(shape)
        hint = (f"; add the missing axes, e.g. {name}[:, {'None, ' * missing}:] for a "
                f"{shape} {name} on inputs with batch dimensions {batch}")  # fmt: skip
    length_name = {"key_mask": "Lk", "query_mask": "Lq", "kv_segment_ids": "Lk"}.get(name, "L")
    raise ValueError(
        f"{name} must have shape batch + ({length_name},) = {target}: exactly q.ndim - 1 = "
        f"{len(target)} dimensions, each q's or 1 (not broadcast from fewer); got {shape}{hint}"
    )


def check_scale(scale: float | None, d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d)
    if (
        isinstance(scale, bool)
        or not isinstance(scale, int | float)
        or not (math.isfinite(scale) and scale > 0)
    ):
        raise ValueError(f"scale must be a finite positive number, got {scale!r}")
    return float(scale)


def check_devices(xp: ModuleType, **arrays: Array | None) -> None:
    present = {n: a for n, a in arrays.items() if a is not None}
    # a traced JAX value reports no device: compare the ones that are known
    devices = {n: dev for n, a in present.items() if (dev := device(a)) is not None}
    first = next(iter(devices.values()), None)
    if any(dev != first for dev in devices.values()):
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"arrays on more than one device ({listed}); move them to one device")


def check_finite(xp: ModuleType, mask: Array | None, **arrays: Array) -> None:
    """Raise if an eager array holds NaN/inf where it is used (query rows; unmasked keys)."""
    if not all(is_eager(a) for a in arrays.values()):
        return  # lazy arrays are never read (documented)
    for name, a in arrays.items():
        keyed = name in ("k", "kf", "v")
        values = xp.where(mask, a, 0.0) if (keyed and mask is not None) else a
        if not all_finite(xp, values):
            where = " at unmasked positions" if keyed else ""
            raise ValueError(
                f"{name} holds NaN or inf{where}; pass check_finite=False to skip this check "
                "(masked positions may hold anything)"
            )


def check_causal(causal: bool, lq: int, lk: int, names: tuple[str, str]) -> None:
    if causal and lq != lk:
        raise ValueError(
            f"causal attention needs {names[0]} and {names[1]} of the same length, got "
            f"Lq={lq} and Lk={lk} (use causal=False for cross-attention)"
        )


def check_chunk(chunk_size: int | None) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return chunk_size


def check_shape(
    name: str, a: Array, tail: tuple[int, ...], batch: tuple[int, ...], like: Array
) -> None:
    """``a`` of ``like``'s framework with shape ``lead + tail``, ``lead`` broadcasting to
    ``batch`` (e.g. the statistics of a :class:`~favorcore.Balance`)."""
    namespace(**{name: a, "inputs": like})
    shape: tuple[Any, ...] = tuple(a.shape)
    try:
        ok = len(shape) >= len(tail) and shape[len(shape) - len(tail) :] == tail
        ok = ok and broadcast_shapes(shape[: len(shape) - len(tail)], batch) == batch
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name} must have shape batch + {tail} with batch broadcasting to {batch}, got {shape}"
        )
