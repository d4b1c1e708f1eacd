"""The linear-attention sums shared by the core path and the tiled engine."""

from __future__ import annotations

import math
from types import ModuleType

from ._compat import Array, device, stop_gradient

__all__ = ["causal_sums", "normalise"]


def normalise(xp: ModuleType, out1: Array, dv: int, kv: Array | None = None) -> Array:
    """Divide the first ``dv`` columns by the last (the normaliser ``D``).

    Rows with ``D`` at most the smallest normal number of the dtype (no valid key, or
    every feature product underflowed, or a trigonometric estimate <= 0) give 0. The
    division is done as ``(num / c) / (D / c)`` with ``c = D`` held constant: the same
    value and gradient, but the backward pass never forms ``D**2`` (which underflows to 0
    and turns gradients into inf/NaN when ``D`` is small).

    Gradients: the gradient of a query's features is about ``|kv| / D`` times the output's
    and is multiplied by the features only afterwards; where ``D`` is so small that it
    would overflow (``D <= sqrt(smallest normal)`` or ``D <= max|kv| * 1e4 / max float``,
    ``kv`` the key sums the row was answered from), the row keeps its value but passes no
    gradient instead of ``inf * 0 = NaN``.
    """
    num, den = out1[..., :dv], out1[..., dv:]
    info = xp.finfo(den.dtype)
    ok = den > float(info.smallest_normal)
    safe = xp.where(ok, den, 1.0)  # no 0/0 even in the branch where() discards
    c = stop_gradient(xp, safe)
    value = (num / c) / (safe / c)
    floor = math.sqrt(float(info.smallest_normal))
    grad_ok = den > floor
    if kv is not None:
        bound = stop_gradient(xp, xp.max(xp.abs(kv), axis=(-2, -1), keepdims=True))
        grad_ok = grad_ok & (den > bound * (1e4 / float(info.max)))
    value = xp.where(grad_ok, value, stop_gradient(xp, value))
    # NaN (from NaN inputs with check_finite=False) propagates instead of becoming 0
    return xp.where(ok | xp.isnan(den), value, 0.0)


def _causal_blocks(
    xp: ModuleType, qf: Array, kf: Array, v1: Array, kv0: Array | None, c: int
) -> tuple[Array, Array]:
    """Causal linear attention over ``L = n * c`` positions; returns ``(out1, kv)``."""
    batch, length, m = qf.shape[:-2], qf.shape[-2], qf.shape[-1]
    n, e = length // c, v1.shape[-1]
    qc = xp.reshape(qf, (*batch, n, c, m))
    kc = xp.reshape(kf, (*batch, n, c, m))
    vc = xp.reshape(v1, (*batch, n, c, e))
    sums = xp.cumulative_sum(xp.matrix_transpose(kc) @ vc, axis=-3, include_initial=True)
    prefix = sums[..., :n, :, :]
    total = sums[..., n, :, :]
    if kv0 is not None:
        prefix = prefix + kv0[..., None, :, :]
        total = total + kv0
    pos = xp.arange(c, device=device(qf))
    scores = qc @ xp.matrix_transpose(kc)
    scores = xp.where(pos[:, None] >= pos[None, :], scores, 0.0)
    out1 = qc @ prefix + scores @ vc
    return xp.reshape(out1, (*batch, length, e)), total


def causal_sums(
    xp: ModuleType, qf: Array, kf: Array, v1: Array, kv0: Array | None, chunk: int
) -> tuple[Array, Array]:
    """Unnormalised causal linear attention ``(out1, kv)`` for any length (equal batch dims).

    Full chunks of ``chunk`` positions, then one shorter chunk that carries the state.
    """
    length = qf.shape[-2]
    split = (length // chunk) * chunk
    pieces = []
    kv = kv0
    if split:
        out_main, kv = _causal_blocks(
            xp, qf[..., :split, :], kf[..., :split, :], v1[..., :split, :], kv, chunk
        )
        pieces.append(out_main)
    if split < length:
        out_tail, kv = _causal_blocks(
            xp, qf[..., split:, :], kf[..., split:, :], v1[..., split:, :], kv, length - split
        )
        pieces.append(out_tail)
    if not pieces:  # length 0
        shape = (*qf.shape[:-2], qf.shape[-1], v1.shape[-1])
        zeros = xp.zeros(shape, dtype=qf.dtype, device=device(qf))
        return v1[..., :0, :], zeros if kv is None else kv
    out1 = pieces[0] if len(pieces) == 1 else xp.concat(pieces, axis=-2)
    return out1, kv


# -- the public functions -------------------------------------------------------------------
