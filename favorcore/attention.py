r"""Linear (FAVOR) attention, bidirectional and causal, and exact softmax attention.

Shapes follow PyTorch's ``scaled_dot_product_attention``: ``q`` is ``(..., Lq, d)``,
``k`` is ``(..., Lk, d)``, ``v`` is ``(..., Lk, dv)``, with any leading batch/head
dimensions that broadcast. ``key_mask`` is boolean, **True = attend**, broadcastable to
``q.shape[:-2] + (Lk,)``; masked keys are removed with ``where`` (never multiplied), so
padding may hold anything, NaN included, and a query with no valid key returns 0.

The normaliser comes out of the same matmul as the numerator: ``[v | 1]`` is multiplied
by the features, and its last column is the denominator.

Causal attention uses chunked prefix sums (DESIGN.md section 4). Within a chunk of ``C``
positions the masked ``C x C`` product is used; across chunks, the per-chunk sums
``phi(K_c)^T [V_c | 1]`` are prefix-summed with one ``cumulative_sum``. A running
:class:`AttentionState` carries the sums from one call to the next, so a long sequence can be
processed in pieces (prefill, streaming, one-token decoding) with the same result as one
call.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from types import ModuleType
from typing import Any, NamedTuple

from ._compat import Array, all_finite, compute_dtype, device, is_eager, is_floating, namespace
from ._linear import causal_sums, normalise
from ._registry import lookup
from ._tiled import tiled_attention
from .balance import BALANCE_KINDS, Balance, BalanceKind, apply_balance, balance_statistics
from .features import (
    AccuracyWarning,
    FeatureMap,
    OptimalPositiveFeatures,
    PositiveFeatures,
    TrigonometricFeatures,
    _needs_projection,
    _positive_pair,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "AttentionState",
    "favor_attention",
    "linear_attention",
    "softmax_attention",
]

#: Chunk length of causal attention in the plain core path when ``chunk_size`` is not
#: given (the adapters' fast paths use their own, :attr:`favorcore._tiled.TiledOps.chunk`).
#: Measured with ``python -m favorcore chunks`` (2 cores, d = 64, m = 256); see the docs.
DEFAULT_CHUNK_SIZE = 128


class AttentionState(NamedTuple):
    """Sums over keys of linear attention, carried between calls.

    ``kv[..., :dv]`` is ``sum_j phi(k_j) v_j^T`` and ``kv[..., dv]`` is ``sum_j phi(k_j)``
    over the keys seen so far; shape ``batch + (m, dv + 1)``, in the compute dtype
    (float32 or wider). A NamedTuple, so it is a JAX pytree.

    Causal calls carry it along the sequence (prefill, streaming, decoding). In
    bidirectional calls it stands for keys given elsewhere (other chunks of a long or
    distributed sequence): the queries attend to them and to the call's own keys.
    """

    kv: Array


# -- validation -----------------------------------------------------------------------------


def _check_qkv(
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
        return _broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except ValueError:
        raise ValueError(
            f"batch dimensions of {nq} {tuple(q.shape[:-2])}, {nk} {tuple(k.shape[:-2])} and "
            f"{nv} {tuple(v.shape[:-2])} do not broadcast"
        ) from None


def _broadcast_shapes(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    ndim = max(len(s) for s in shapes)
    out = []
    for i in range(-ndim, 0):
        sizes = {s[i] for s in shapes if len(s) >= -i} - {1}
        if len(sizes) > 1:
            raise ValueError(f"shapes {shapes} do not broadcast")
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


#: the maps the tiled engine computes itself (subclasses may override apply)
_TILED_MAPS = (PositiveFeatures, OptimalPositiveFeatures)


def _check_mask(
    xp: ModuleType,
    key_mask: Array | None,
    batch: tuple[int, ...],
    lk: int,
    name: str = "key_mask",
) -> Array | None:
    """Check ``key_mask`` (or the mask ``name``) and return it as ``(..., L, 1)`` for ``where``."""
    if key_mask is None:
        return None
    if key_mask.dtype != xp.bool:
        raise TypeError(
            f"{name} must be a boolean array (True = a real token), got dtype {key_mask.dtype}"
        )
    target = (*batch, lk)
    try:
        ok = key_mask.ndim >= 1 and _broadcast_shapes(tuple(key_mask.shape), target) == target
    except ValueError:
        ok = False
    if not ok:
        length = "Lk" if name == "key_mask" else "Lq"
        raise ValueError(
            f"{name} must broadcast to batch + ({length},) = {target}, "
            f"got shape {tuple(key_mask.shape)}"
        )
    return key_mask[..., None]


def _check_scale(scale: float | None, d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d)
    if (
        isinstance(scale, bool)
        or not isinstance(scale, int | float)
        or not (math.isfinite(scale) and scale > 0)
    ):
        raise ValueError(f"scale must be a finite positive number, got {scale!r}")
    return float(scale)


def _check_devices(xp: ModuleType, **arrays: Array | None) -> None:
    present = {n: a for n, a in arrays.items() if a is not None}
    # a traced JAX value reports no device: compare the ones that are known
    devices = {n: dev for n, a in present.items() if (dev := device(a)) is not None}
    first = next(iter(devices.values()), None)
    if any(dev != first for dev in devices.values()):
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"arrays on more than one device ({listed}); move them to one device")


def _check_finite(xp: ModuleType, mask: Array | None, **arrays: Array) -> None:
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


def _warn_small_normaliser(
    xp: ModuleType, bad: Array, mask: Array | None, causal: bool, features: FeatureMap
) -> None:
    """Warn when query rows with valid keys got no usable normaliser (their output is 0)."""
    if mask is not None:
        valid = xp.astype(mask[..., 0], xp.int32)
        has_key = (
            (xp.cumulative_sum(valid, axis=-1) > 0)
            if causal
            else (xp.sum(valid, axis=-1, keepdims=True) > 0)
        )
        bad = bad & has_key[..., None]
    count = int(xp.sum(xp.astype(bad, xp.int32)))
    if not count:
        return
    if isinstance(features, TrigonometricFeatures):
        why = ("<= 0 from trigonometric features, which are not positive; use PositiveFeatures "
               "or hyperbolic_features, or inputs of smaller norm")  # fmt: skip
    else:
        why = ("that underflowed: every feature product of these queries with the keys was "
               "below the smallest normal number; the inputs' norms are too large for FAVOR "
               "in this dtype (scale them down, or use float64)")  # fmt: skip
    warnings.warn(
        AccuracyWarning(
            f"{count} query rows got an estimated normaliser {why}; their outputs are set to 0."
        ),
        stacklevel=3,
    )


def _check_balance(
    xp: ModuleType,
    balance: bool | str | Balance | None,
    features: FeatureMap,
    causal: bool,
    state: AttentionState | None,
    return_state: bool,
    q: Array,
    batch: tuple[int, ...],
) -> BalanceKind | Balance | None:
    """The balance to apply: a kind to compute from this call's tokens, given statistics,
    or None."""
    if balance is None:  # the default: on where it is exact and this call has the tokens
        on = isinstance(features, PositiveFeatures) and not (
            causal or state is not None or return_state
        )
        return "matrix" if on else None
    if balance is False:
        return None
    if balance is True or balance in BALANCE_KINDS:
        if causal or state is not None or return_state:
            raise ValueError(
                f"balance={balance!r} computes its statistics from this call's tokens, which in "
                "causal attention would use the future and across calls would change the "
                "carried state; pass Balance statistics (balance_statistics on a calibration "
                "batch)"
            )
        return "matrix" if balance is True else balance
    if not isinstance(balance, Balance):
        raise TypeError(
            f"balance must be None, a bool, one of {BALANCE_KINDS} or a Balance, got {balance!r}"
        )
    namespace(query=balance.query, key=balance.key, shift=balance.shift, spread=balance.spread,
              inputs=q)  # fmt: skip
    d = q.shape[-1]
    parts = [("query", balance.query, (d, d)), ("key", balance.key, (d, d)),
             ("shift", balance.shift, (1, d)), ("spread", balance.spread, (1, 1))]  # fmt: skip
    for name, arr, tail in parts:
        if arr is None:
            continue
        try:
            ok = (
                tuple(arr.shape[-2:]) == tail
                and _broadcast_shapes(tuple(arr.shape[:-2]), batch) == batch
            )
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"balance.{name} must have shape batch + {tail} with batch broadcasting to {batch}, "
                f"got {tuple(arr.shape)}"
            )
    return balance


def _check_projection(features: FeatureMap, projection: Array | None, d: int) -> None:
    if projection is None:
        return
    rows = features.feature_matrix(d)
    if rows is None:
        raise ValueError(f"projection: {type(features).__name__} with m=None uses no projection")
    if tuple(projection.shape) != rows.shape:
        raise ValueError(
            f"projection must have shape {rows.shape} (features.feature_matrix(d)), got "
            f"{tuple(projection.shape)}"
        )


def _check_causal(causal: bool, lq: int, lk: int, names: tuple[str, str]) -> None:
    if causal and lq != lk:
        raise ValueError(
            f"causal attention needs {names[0]} and {names[1]} of the same length, got "
            f"Lq={lq} and Lk={lk} (use causal=False for cross-attention)"
        )


def _check_chunk(chunk_size: int | None) -> int:
    if chunk_size is None:
        return DEFAULT_CHUNK_SIZE
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return chunk_size


def _check_state(
    xp: ModuleType,
    state: AttentionState | None,
    expected: tuple[int, ...],
    dtype: Any,
    like: Array,
) -> Array | None:
    if state is None:
        return None
    if not isinstance(state, AttentionState):
        raise TypeError(f"state must be a AttentionState, got {type(state).__name__}")
    namespace(state=state.kv, inputs=like)  # same framework as the inputs
    if tuple(state.kv.shape) != expected:
        raise ValueError(
            f"state.kv has shape {tuple(state.kv.shape)}, but these inputs need batch + "
            f"(m, dv + 1) = {expected}; was the state made with other shapes?"
        )
    return xp.astype(state.kv, dtype, copy=False)


# -- the algorithms -------------------------------------------------------------------------


def _linear_core(
    xp: ModuleType,
    qf: Array,
    kf: Array,
    v: Array,
    mask: Array | None,
    *,
    causal: bool,
    chunk: int,
    kv0: Array | None,
    batch: tuple[int, ...],
) -> tuple[Array, Array, Array]:
    """Validated linear attention in the compute dtype; returns ``(out, kv, normaliser)``."""
    dtype = qf.dtype
    v = xp.astype(v, dtype, copy=False)
    ones = xp.ones((*v.shape[:-1], 1), dtype=dtype, device=device(v))
    v1 = xp.concat([v, ones], axis=-1)
    if mask is not None:
        kf = xp.where(mask, kf, 0.0)
        v1 = xp.where(mask, v1, 0.0)
    dv = v.shape[-1]
    if not causal:
        kv = xp.matrix_transpose(kf) @ v1
        if kv0 is not None:
            kv = kv + kv0
        kv = xp.broadcast_to(kv, (*batch, *kv.shape[-2:]))
        out1 = qf @ kv
        return normalise(xp, out1, dv, kv), kv, out1[..., dv:]
    qf = xp.broadcast_to(qf, (*batch, *qf.shape[-2:]))
    kf = xp.broadcast_to(kf, (*batch, *kf.shape[-2:]))
    v1 = xp.broadcast_to(v1, (*batch, *v1.shape[-2:]))
    out1, kv = causal_sums(xp, qf, kf, v1, kv0, chunk)
    return normalise(xp, out1, dv, kv), kv, out1[..., dv:]


def linear_attention(
    qf: Array,
    kf: Array,
    v: Array,
    *,
    causal: bool = False,
    key_mask: Array | None = None,
    chunk_size: int | None = None,
    state: AttentionState | None = None,
    return_state: bool = False,
    check_finite: bool = True,
) -> Array | tuple[Array, AttentionState]:
    r"""Linear attention ``D^-1 phi(Q) (phi(K)^T [V | 1])`` on precomputed features.

    Parameters
    ----------
    qf : array, shape (..., Lq, m)
        Query features.
    kf : array, shape (..., Lk, m)
        Key features, same dtype as ``qf``.
    v : array, shape (..., Lk, dv)
        Values, same dtype as the features.
    causal : bool
        Query ``i`` attends to keys ``j <= i`` only (needs ``Lq == Lk``).
    key_mask : bool array, optional
        True = attend, broadcastable to ``batch + (Lk,)``. Masked rows of ``kf`` and ``v``
        are removed with ``where``, so both numerator and denominator ignore them.
    chunk_size : int, optional
        Chunk length of causal attention (default :data:`DEFAULT_CHUNK_SIZE`); the result
        does not depend on it beyond rounding.
    state : AttentionState, optional
        Sums over keys given earlier (causal: the preceding tokens; bidirectional: more
        keys every query attends to).
    return_state : bool
        Also return the :class:`AttentionState` after this call: ``state`` plus this call's
        keys.
    check_finite : bool
        On eager arrays, raise ``ValueError`` for NaN or inf in ``qf``, or in ``kf``/``v`` at
        unmasked positions.

    Returns
    -------
    array, shape batch + (Lq, dv)
        In the dtype of ``v``. With ``return_state``, ``(out, state)``.

    Raises
    ------
    ValueError, TypeError
        For wrong ranks or shapes, mixed dtypes or frameworks, a bad mask, chunk size or
        state; the message names the argument.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> qf, kf = rng.random((4, 8)), rng.random((6, 8))
    >>> v = rng.standard_normal((6, 3))
    >>> out = linear_attention(qf, kf, v)
    >>> a = qf @ kf.T
    >>> bool(np.allclose(out, (a @ v) / a.sum(-1, keepdims=True)))
    True
    """
    xp = namespace(qf=qf, kf=kf, v=v, key_mask=key_mask)
    _check_devices(xp, qf=qf, kf=kf, v=v, key_mask=key_mask)
    batch = _check_qkv(xp, qf, kf, v, ("qf", "kf", "v"))
    _check_causal(causal, qf.shape[-2], kf.shape[-2], ("qf", "kf"))
    mask = _check_mask(xp, key_mask, batch, kf.shape[-2])
    chunk = _check_chunk(chunk_size)
    dtype = compute_dtype(xp, qf.dtype)
    kv0 = _check_state(xp, state, (*batch, qf.shape[-1], v.shape[-1] + 1), dtype, qf)
    if check_finite:
        _check_finite(xp, mask, qf=qf, kf=kf, v=v)
    out, kv, _ = _linear_core(
        xp, xp.astype(qf, dtype, copy=False), xp.astype(kf, dtype, copy=False), v, mask,
        causal=causal, chunk=chunk, kv0=kv0, batch=batch,
    )  # fmt: skip
    out = xp.astype(out, v.dtype, copy=False)
    return (out, AttentionState(kv)) if return_state else out


def favor_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    features: FeatureMap,
    causal: bool = False,
    key_mask: Array | None = None,
    scale: float | None = None,
    chunk_size: int | None = None,
    state: AttentionState | None = None,
    return_state: bool = False,
    projection: Array | None = None,
    check_finite: bool = True,
    balance: bool | BalanceKind | Balance | None = None,
    query_mask: Array | None = None,
) -> Array | tuple[Array, AttentionState]:
    r"""FAVOR attention: softmax attention estimated with random features.

    Computes ``D^-1 phi(Q') (phi(K')^T [V | 1])`` with ``Q' = sqrt(scale) q`` and
    ``K' = sqrt(scale) k``, so that the features estimate ``exp(scale q . k)`` and the
    result approximates ``softmax(scale q k^T) v``. Costs O(L m (d + dv)) instead of
    O(Lq Lk d).

    Parameters
    ----------
    q : array, shape (..., Lq, d)
        Queries, any leading batch/head dimensions.
    k : array, shape (..., Lk, d)
        Keys; ``Lk`` may differ from ``Lq`` unless ``causal``.
    v : array, shape (..., Lk, dv)
        Values; ``dv`` may differ from ``d``.
    features : FeatureMap
        The feature map, e.g. ``PositiveFeatures(m=256, seed=0)``.
    causal : bool
        Query ``i`` attends to keys ``j <= i`` only (needs ``Lq == Lk``).
    key_mask : bool array, optional
        True = attend, broadcastable to ``q.shape[:-2] + (Lk,)``.
    scale : float, optional
        Logit scale; ``1/sqrt(d)`` when omitted, as in ``scaled_dot_product_attention``.
    chunk_size : int, optional
        Chunk length of causal attention; the result does not depend on it beyond
        rounding. By default the backend's fast path picks its measured best (NumPy and
        PyTorch: 64), the plain core path :data:`DEFAULT_CHUNK_SIZE`.
    state : AttentionState, optional
        Sums over keys given earlier: in causal calls the preceding tokens, in
        bidirectional calls more keys that every query attends to (other chunks of a
        sequence processed elsewhere).
    return_state : bool
        Also return the :class:`AttentionState` after this call: ``state`` plus this
        call's keys.
    projection : array, optional
        The matrix the features are computed from, shape ``(rows, d)`` as
        ``features.feature_matrix(d)``, in ``q``'s namespace; by default the map's own
        (drawn from its seed). Adapters pass theirs (a module buffer, a draw from a
        ``jax.random`` key).
    check_finite : bool
        On eager arrays (not under ``jax.jit``, not Dask), raise ``ValueError`` if ``q``,
        or ``k``/``v`` at unmasked positions, hold NaN or inf, and warn
        (:class:`AccuracyWarning`) when trigonometric features give query rows a normaliser
        <= 0 (their output is 0). Lazy arrays are never read: there NaN propagates to the
        rows it touches.
    balance : None, bool, {"matrix", "scalar"} or Balance
        Exact variance reduction (:mod:`favorcore.balance`): balance queries against keys
        and shift all keys by one vector, which leaves exact attention unchanged and lowers
        the estimator's variance. ``True`` (``"matrix"``) or ``"scalar"`` computes the
        statistics from this call's tokens (bidirectional calls without
        ``state``/``return_state`` only); a :class:`Balance` (from
        :func:`balance_statistics` on a calibration batch) is applied as given, also in
        causal attention and across calls that share a state. ``None`` (the default) is
        ``"matrix"`` for the positive maps (:class:`PositiveFeatures` and its kin) in
        bidirectional calls without a state, ``False`` otherwise.
    query_mask : bool array, optional
        True = a real query, broadcastable to ``q.shape[:-2] + (Lq,)``: padded queries are
        left out of the statistics computed from the tokens (balance, FAVOR++'s ``A``).
        Their output rows are computed as usual. In self-attention over padded batches
        pass the same mask as ``key_mask``.

    Returns
    -------
    array, shape batch + (Lq, dv)
        In ``q``'s namespace, device and dtype (computed in float32 or wider). With
        ``return_state``, ``(out, state)``.

    Raises
    ------
    ValueError, TypeError
        For wrong ranks or shapes, non-floating or mixed dtypes, arrays of two frameworks,
        a mask of the wrong shape or dtype, ``chunk_size <= 0``, causal with ``Lq != Lk``,
        or a state of other shapes; the message names the argument.

    Examples
    --------
    >>> import numpy as np
    >>> from favorcore import OptimalPositiveFeatures, PositiveFeatures
    >>> from favorcore import favor_attention, softmax_attention
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 128, 16)) for _ in range(3))
    >>> q, k = 0.3 * q, 0.3 * k  # FAVOR's variance grows like exp(|q + k|^2 / sqrt(d))
    >>> ref = softmax_attention(q, k, v)
    >>> out = favor_attention(q, k, v, features=OptimalPositiveFeatures(m=256, seed=0))
    >>> print(f"{np.linalg.norm(out - ref) / np.linalg.norm(ref):.3f}")  # the default
    0.012
    >>> plus = favor_attention(q, k, v, features=PositiveFeatures(m=256, seed=0), balance=False)
    >>> print(f"{np.linalg.norm(plus - ref) / np.linalg.norm(ref):.3f}")  # plain FAVOR+
    0.040

    Process a sequence in two pieces, as one would prefill and then decode:

    >>> fm = PositiveFeatures(m=64, seed=1)
    >>> full = favor_attention(q, k, v, features=fm, causal=True)
    >>> a, st = favor_attention(q[:, :100], k[:, :100], v[:, :100], features=fm,
    ...                         causal=True, return_state=True)
    >>> b = favor_attention(q[:, 100:], k[:, 100:], v[:, 100:], features=fm,
    ...                     causal=True, state=st)
    >>> bool(np.allclose(np.concatenate([a, b], axis=1), full))
    True
    """
    if not isinstance(features, FeatureMap):
        raise TypeError(f"features must be a FeatureMap, got {type(features).__name__}")
    xp = namespace(q=q, k=k, v=v, key_mask=key_mask, projection=projection)
    _check_devices(xp, q=q, k=k, v=v, key_mask=key_mask, projection=projection)
    batch = _check_qkv(xp, q, k, v, ("q", "k", "v"))
    _check_causal(causal, q.shape[-2], k.shape[-2], ("q", "k"))
    mask = _check_mask(xp, key_mask, batch, k.shape[-2])
    _check_mask(xp, query_mask, batch, q.shape[-2], "query_mask")
    chunk = _check_chunk(chunk_size)
    root = math.sqrt(_check_scale(scale, q.shape[-1]))
    _check_projection(features, projection, q.shape[-1])
    dtype = compute_dtype(xp, q.dtype)
    m = features.num_features(q.shape[-1])
    kv0 = _check_state(xp, state, (*batch, m, v.shape[-1] + 1), dtype, q)
    if check_finite:
        _check_finite(xp, mask, q=q, k=k, v=v)
    x, y, vc = (xp.astype(a, dtype, copy=False) for a in (q, k, v))
    positive = isinstance(features, PositiveFeatures) and type(features) in _TILED_MAPS
    ops = lookup(xp, "tiled") if positive and math.prod(batch) > 0 else None
    # the adapter's settings for the whole estimate (NumPy: single-threaded BLAS, so that
    # no BLAS thread left spinning by the statistics competes with the engine's workers)
    with contextlib.nullcontext() if ops is None else ops.context():
        stats = _check_balance(xp, balance, features, causal, state, return_state, q, batch)
        given = isinstance(stats, Balance) and stats.spread is not None
        if features.data_dependent and not given and (causal or state is not None or return_state):
            raise ValueError(
                f"features: {type(features).__name__} computes statistics from each call's tokens, "
                "which in causal attention would use the future and across calls would change the "
                "carried state; give it fixed parameters (e.g. a=...) or pass balance= statistics "
                "with a spread (balance_statistics of a calibration batch)"
            )
        if isinstance(stats, str):
            stats = balance_statistics(
                q, k, key_mask=key_mask, query_mask=query_mask, scale=root * root, kind=stats
            )
        given_stats = stats if isinstance(stats, Balance) else None
        w = (
            features.projection_like(x)
            if projection is None
            else xp.astype(projection, dtype, copy=False)
        )
        a: float | Array = 0.0
        if positive:  # FAVOR+ (A = 0) and FAVOR++: one exponent, A from the map or the data
            a = features.coefficient(  # type: ignore[attr-defined]
                x, y, key_mask=key_mask, query_mask=query_mask, scale=root * root,
                spread=None if given_stats is None else given_stats.spread,
            )  # fmt: skip
        if ops is not None:  # the adapter's fast path: block by block (see favorcore._tiled)
            out, kv, small = tiled_attention(
                xp, ops, x, y, vc, w=w, root=root, a=a, causal=causal, mask=mask,
                chunk=ops.chunk if chunk_size is None else chunk,
                kv0=kv0, batch=batch, balance=given_stats,
            )  # fmt: skip
        else:
            if given_stats is not None:
                if mask is not None:  # padding may hold NaN: keep it out of the products
                    y = xp.where(mask, y, 0.0)
                x, y = apply_balance(x, y, given_stats, scale=root * root)
                root = 1.0
            if mask is not None:  # garbage in padding must not reach the features (or gradients)
                y, vc = xp.where(mask, y, 0.0), xp.where(mask, vc, 0.0)
            qf, kf = (
                _positive_pair(xp, x * root, y * root, _needs_projection(features, w), a)
                if positive
                else features.apply(
                    x * root, y * root, w, key_mask=key_mask, query_mask=query_mask, xp=xp
                )
            )
            out, kv, den = _linear_core(
                xp, qf, kf, vc, mask, causal=causal, chunk=chunk, kv0=kv0, batch=batch
            )
            small = den <= float(xp.finfo(den.dtype).smallest_normal)
    if check_finite and is_eager(small):
        _warn_small_normaliser(xp, small, mask, causal, features)
    out = xp.astype(out, q.dtype, copy=False)
    return (out, AttentionState(kv)) if return_state else out


def softmax_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: bool = False,
    key_mask: Array | None = None,
    scale: float | None = None,
    check_finite: bool = True,
) -> Array:
    r"""Exact softmax attention ``softmax(scale q k^T) v``, the reference for FAVOR.

    Same conventions as :func:`favor_attention` (masks, shapes, dtypes, scale); costs
    O(Lq Lk d) time and O(Lq Lk) memory. A query with no valid key returns 0.

    Examples
    --------
    >>> import numpy as np
    >>> q = k = np.eye(2)
    >>> v = np.array([[1.0], [3.0]])
    >>> softmax_attention(q, k, v, scale=1.0, causal=True).ravel().tolist()
    [1.0, 2.4621171572600096]
    """
    xp = namespace(q=q, k=k, v=v, key_mask=key_mask)
    _check_devices(xp, q=q, k=k, v=v, key_mask=key_mask)
    batch = _check_qkv(xp, q, k, v, ("q", "k", "v"))
    _check_causal(causal, q.shape[-2], k.shape[-2], ("q", "k"))
    mask = _check_mask(xp, key_mask, batch, k.shape[-2])
    scale = _check_scale(scale, q.shape[-1])
    if check_finite:
        _check_finite(xp, mask, q=q, k=k, v=v)
    dtype = compute_dtype(xp, q.dtype)
    x, y, vc = (xp.astype(a, dtype, copy=False) for a in (q, k, v))
    allowed = None
    if mask is not None:
        y, vc = xp.where(mask, y, 0.0), xp.where(mask, vc, 0.0)
        allowed = xp.matrix_transpose(mask)  # (..., 1, Lk)
    if causal:
        pos = xp.arange(q.shape[-2], device=device(q))
        tril = pos[:, None] >= pos[None, :]
        allowed = tril if allowed is None else (allowed & tril)
    logits = (x @ xp.matrix_transpose(y)) * scale
    if allowed is not None:
        logits = xp.where(allowed, logits, -math.inf)
    top = xp.max(logits, axis=-1, keepdims=True)
    top = xp.where(xp.isfinite(top), top, 0.0)
    weights = xp.exp(logits - top)
    num = weights @ vc
    den = xp.sum(weights, axis=-1, keepdims=True)
    ok = den > 0
    out = xp.where(ok, num / xp.where(ok, den, 1.0), 0.0)
    return xp.astype(out, q.dtype, copy=False)
