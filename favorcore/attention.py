r"""FAVOR attention, bidirectional and causal, linear attention, and exact softmax attention.

Shapes follow PyTorch's ``scaled_dot_product_attention``: ``q`` is ``(..., Lq, d)``,
``k`` is ``(..., Lk, d)``, ``v`` is ``(..., Lk, dv)``, with any leading batch/head
dimensions that broadcast. ``key_mask`` is boolean, **True = attend**, with exactly
``q.ndim - 1`` dimensions, each ``q``'s or 1, the last ``Lk`` (fewer are refused, never
broadcast: a ``(batch, Lk)`` mask on ``(batch, heads, L, d)`` inputs is
``key_mask[:, None, :]``); masked keys are removed
with ``where`` (never multiplied), so padding may hold anything, NaN included, and a query
with no valid key returns 0.

The normaliser comes out of the same products as the numerator: ``[v | 1]`` is multiplied
by the features, and its last column is the denominator. Causal attention is chunked:
within a chunk of ``C`` positions the masked ``C x C`` product, across chunks the running
sums ``phi(K_c)^T [V_c | 1]``. An :class:`AttentionState` carries the sums from one call to
the next, so a long sequence can be processed in pieces (prefill, streaming, one-token
decoding) with the result of one call.

Every call runs the same engine (:mod:`favorcore.steps`): blocks of rows, the feature
map's form, and the operations of the namespace's adapter or the standard ones.
"""

from __future__ import annotations

import math
import warnings
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from ._checks import (
    check_causal,
    check_chunk,
    check_devices,
    check_finite,
    check_mask,
    check_qkv,
    check_scale,
    check_shape,
)
from ._compat import Array, compute_dtype, device, is_eager, is_tracer, namespace, to_host
from ._packed import check_ids, groups_of, resets_of, segment_form
from ._schedule import Call, Group, backward, flatten, forward
from .balance import BALANCE_KINDS, Balance, BalanceKind, balance_statistics
from .features import AccuracyWarning, FeatureMap, Form, OptimalPositiveFeatures
from .steps import steps_for

__all__ = [
    "DEFAULT_FEATURES",
    "AttentionState",
    "favor_attention",
    "favor_attention_vjp",
    "linear_attention",
    "resolve",
    "softmax_attention",
]

#: What ``features=None`` means: FAVOR++ with 256 features, orthogonal ``+-w`` pairs and a
#: fixed seed, with ``A`` and the matrix balance from each bidirectional call's tokens. In
#: causal calls and calls that carry a state it takes ``A`` and the balance from given
#: statistics, or, without them, runs in its causal form (``A = 0``, no balance).
DEFAULT_FEATURES = OptimalPositiveFeatures(m=256, seed=0)


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


def resolve(
    features: FeatureMap | None,
    *,
    causal: bool = False,
    balance: bool | BalanceKind | Balance | None = None,
    state: AttentionState | None = None,
    return_state: bool = False,
) -> tuple[FeatureMap, BalanceKind | Balance | None]:
    """The feature map and the balance a call of :func:`favor_attention` uses.

    Reads no array: every configuration error is raised here, before any pass over the
    data. Returns the map (``features``, :data:`DEFAULT_FEATURES`, or its causal form) and
    the balance: a kind to compute from the call's tokens, given statistics, or None.
    """
    if features is not None and not isinstance(features, FeatureMap):
        raise TypeError(f"features must be a FeatureMap or None, got {type(features).__name__}")
    fmap = DEFAULT_FEATURES if features is None else features
    carried = causal or state is not None or return_state
    stats: BalanceKind | Balance | None
    if balance is None:  # the default: on where it is exact and helps, from the call's tokens
        stats = "matrix" if fmap.positive and fmap.softmax and not carried else None
    elif balance is False:
        stats = None
    elif balance is True or balance in BALANCE_KINDS:
        if carried:
            raise ValueError(
                f"balance={balance!r} computes its statistics from this call's tokens, which in "
                "causal attention would use the future and across calls would change the "
                "carried state; pass Balance statistics (balance_statistics on a calibration "
                "batch)"
            )
        stats = "matrix" if balance is True else balance
    elif isinstance(balance, Balance):
        stats = balance
    else:
        raise TypeError(
            f"balance must be None, a bool, one of {BALANCE_KINDS} or a Balance, got {balance!r}"
        )
    if stats is not None and not fmap.softmax:
        raise ValueError(
            f"balance: {type(fmap).__name__} does not estimate the softmax kernel, and the "
            "balance leaves only softmax attention unchanged; pass balance=False"
        )
    fixed = isinstance(stats, str) or (isinstance(stats, Balance) and stats.spread is not None)
    if fmap.data_dependent and carried and not fixed:
        if features is not None:
            raise ValueError(
                f"features: {type(fmap).__name__} computes statistics from each call's tokens, "
                "which in causal attention would use the future and across calls would change "
                "the carried state; give it fixed parameters (e.g. a=...) or pass balance= "
                "statistics with a spread (balance_statistics of a calibration batch)"
            )
        fmap = fmap.causal_form()
    return fmap, stats


class _Given(Form):
    """The form of :func:`linear_attention`: the rows are the features."""

    def queries(self, xp: ModuleType, x: Array) -> Array:
        return x

    def keys(self, xp: ModuleType, y: Array) -> Array:
        return y

    def flatten(self, batch: tuple[int, ...]) -> Form:
        return self

    def select(self, r: int) -> Form:
        return self


def _check_state(
    xp: ModuleType, state: AttentionState | None, expected: tuple[int, ...], dtype: Any, like: Array
) -> Array | None:
    if state is None:
        return None
    if not isinstance(state, AttentionState):
        raise TypeError(f"state must be an AttentionState, got {type(state).__name__}")
    namespace(state=state.kv, inputs=like)  # same framework as the inputs
    if tuple(state.kv.shape) != expected:
        raise ValueError(
            f"state.kv has shape {tuple(state.kv.shape)}, but these inputs need batch + "
            f"(m, dv + 1) = {expected}; was the state made with other shapes?"
        )
    return xp.astype(state.kv, dtype, copy=False)


def _check_projection(fmap: FeatureMap, projection: Array | None, d: int) -> None:
    if projection is None:
        return
    rows = fmap.feature_matrix(d)
    if rows is None:
        raise ValueError(f"projection: {type(fmap).__name__} with m=None uses no projection")
    if tuple(projection.shape) != rows.shape:
        raise ValueError(
            f"projection must have shape {rows.shape} (features.feature_matrix(d)), got "
            f"{tuple(projection.shape)}"
        )


def _check_balance(stats: Balance, batch: tuple[int, ...], d: int, like: Array) -> None:
    for name, tail in (("query", (d, d)), ("key", (d, d)), ("shift", (1, d)), ("spread", (1, 1))):
        arr = getattr(stats, name)
        if arr is not None:
            check_shape(f"balance.{name}", arr, tail, batch, like)


def _packed_has_key(call: Call) -> Array:
    """``(..., rows, 1)``: the query rows of a packed call that have a valid key (their
    document's, causal: up to them)."""
    xp, packed = call.xp, call.packed
    assert packed is not None
    n_rows, lk = call.x.shape[0], call.y.shape[-2]
    valid = np.ones((n_rows, lk), bool) if call.mask is None else to_host(call.mask)[..., 0]
    has = np.zeros((n_rows, call.x.shape[-2] // call.group), bool)
    for g in packed:
        assert g.row is not None
        (a, b), (c, e) = g.q, g.k
        if call.causal:
            has[g.row, a:b] = np.cumsum(valid[g.row, c:e]) > 0
        else:
            has[g.row, a:b] = valid[g.row, c:e].any()
    has = np.repeat(has, call.group, axis=1)
    dev = device(call.x)
    return xp.reshape(xp.asarray(has, device=dev), (*call.batch, has.shape[1], 1))


def _warn_small_normaliser(
    xp: ModuleType, bad: Array, mask: Array | None, causal: bool, fmap: FeatureMap, group: int = 1
) -> None:
    """Warn when query rows with valid keys got no usable normaliser (their output is 0);
    ``group`` query rows per position (grouped-query attention)."""
    if mask is not None:
        valid = xp.astype(mask[..., 0], xp.int32)
        if causal:
            has_key = xp.cumulative_sum(valid, axis=-1) > 0
            if group > 1:  # each position's G query rows
                has_key = xp.broadcast_to(has_key[..., None], (*has_key.shape, group))
                has_key = xp.reshape(has_key, (*has_key.shape[:-2], -1))
        else:
            has_key = xp.sum(valid, axis=-1, keepdims=True) > 0
        bad = bad & has_key[..., None]
    count = int(xp.sum(xp.astype(bad, xp.int32)))
    if not count:
        return
    if not fmap.positive:
        why = (f"<= 0 from {type(fmap).__name__}, which are not positive; use PositiveFeatures "
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
        True = attend, shape ``batch + (Lk,)``: exactly ``kf.ndim - 1`` dimensions, each
        ``kf``'s or 1. Masked
        rows of ``kf`` and ``v`` are removed with ``where``, so both numerator and
        denominator ignore them.
    chunk_size : int, optional
        Chunk length of causal attention (by default the backend's); the result does not
        depend on it beyond rounding.
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
    check_devices(xp, qf=qf, kf=kf, v=v, key_mask=key_mask)
    batch = check_qkv(xp, qf, kf, v, ("qf", "kf", "v"))
    check_causal(causal, qf.shape[-2], kf.shape[-2], ("qf", "kf"))
    mask = check_mask(xp, key_mask, batch, kf.shape[-2], "key_mask")
    chunk = check_chunk(chunk_size)
    dtype = compute_dtype(xp, qf.dtype)
    kv0 = _check_state(xp, state, (*batch, qf.shape[-1], v.shape[-1] + 1), dtype, qf)
    if check_finite:
        _finite(xp, mask, qf=qf, kf=kf, v=v)
    steps = steps_for(xp)
    x, y, vc = (xp.astype(a, dtype, copy=False) for a in (qf, kf, v))
    call = flatten(
        xp, steps, _Given(), x, y, vc, mask=mask, kv0=kv0, causal=causal,
        chunk=steps.chunk if chunk is None else chunk, batch=batch, m=qf.shape[-1],
    )  # fmt: skip
    out, kv, _ = steps.run(call)
    out = xp.astype(xp.reshape(out, (*batch, qf.shape[-2], v.shape[-1])), v.dtype, copy=False)
    kv = xp.reshape(kv, (*batch, *kv.shape[-2:]))
    return (out, AttentionState(kv)) if return_state else out


_finite = check_finite  # (the name is taken by favor_attention's argument)


def _group(q: Array, k: Array, enable_gqa: bool) -> int:
    """Query heads per key head (1 without ``enable_gqa``)."""
    if not enable_gqa:
        return 1
    if q.ndim < 3 or k.ndim < 3:
        raise ValueError(
            "enable_gqa needs q and k with a heads axis (-3): q (..., H, Lq, d), "
            f"k (..., H_kv, Lk, d); got q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}"
        )
    heads, kv_heads = q.shape[-3], k.shape[-3]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(
            f"enable_gqa: q's heads ({heads}) must be a multiple of k's and v's ({kv_heads})"
        )
    return int(heads // kv_heads)


def _interleave(xp: ModuleType, a: Array, group: int) -> Array:
    """``(..., H_kv G, L, w)`` -> ``(..., H_kv, L G, w)``: the ``G`` query heads of a key head
    as its rows, interleaved by position (row ``i G + h`` is head ``h`` at position ``i``)."""
    if group == 1:
        return a
    *lead, heads, length, width = a.shape
    n = len(lead)
    a = xp.reshape(a, (*lead, heads // group, group, length, width))
    a = xp.permute_dims(a, (*range(n), n, n + 2, n + 1, n + 3))
    return xp.reshape(a, (*lead, heads // group, length * group, width))


def _deinterleave(xp: ModuleType, a: Array, group: int) -> Array:
    """The inverse of :func:`_interleave`."""
    if group == 1:
        return a
    *lead, kv_heads, rows, width = a.shape
    n = len(lead)
    a = xp.reshape(a, (*lead, kv_heads, rows // group, group, width))
    a = xp.permute_dims(a, (*range(n), n, n + 2, n + 1, n + 3))
    return xp.reshape(a, (*lead, kv_heads * group, rows // group, width))


def _plan(
    q: Array,
    k: Array,
    v: Array,
    *,
    features: FeatureMap | None,
    causal: bool,
    key_mask: Array | None,
    scale: float | None,
    chunk_size: int | None,
    state: AttentionState | None,
    return_state: bool,
    projection: Array | None,
    check_finite: bool,
    balance: bool | BalanceKind | Balance | None,
    query_mask: Array | None,
    enable_gqa: bool = False,
    segment_ids: Array | None = None,
    kv_segment_ids: Array | None = None,
) -> tuple[Call, FeatureMap]:
    """A call of :func:`favor_attention` checked, resolved and flattened for the engine
    (with ``enable_gqa``, the query heads of a key head become its rows; with
    ``segment_ids``, each document of each row is a group of its own)."""
    xp = namespace(q=q, k=k, v=v, key_mask=key_mask, query_mask=query_mask,
                   projection=projection)  # fmt: skip
    check_devices(xp, q=q, k=k, v=v, key_mask=key_mask, query_mask=query_mask,
                  projection=projection)  # fmt: skip
    check_qkv(xp, q, q, q, ("q", "q", "q"))
    group = _group(q, k, enable_gqa)
    check_causal(causal, q.shape[-2], k.shape[-2], ("q", "k"))
    q_batch = tuple(q.shape[:-2])
    if group > 1:  # the query heads of a key head become its rows
        check_mask(xp, query_mask, tuple(q.shape[:-2]), q.shape[-2], "query_mask")
        if query_mask is not None:
            full = xp.broadcast_to(query_mask[..., None], (*q.shape[:-1], 1))
            query_mask = _interleave(xp, full, group)[..., 0]
        q = _interleave(xp, q, group)
    batch = check_qkv(xp, q, k, v, ("q", "k", "v"))
    d, dv = q.shape[-1], v.shape[-1]
    mask = check_mask(xp, key_mask, batch, k.shape[-2], "key_mask")
    check_mask(xp, query_mask, batch, q.shape[-2], "query_mask")
    chunk = check_chunk(chunk_size)
    root = math.sqrt(check_scale(scale, d))
    fmap, stats = resolve(
        features, causal=causal, balance=balance, state=state, return_state=return_state
    )
    if isinstance(stats, Balance):
        _check_balance(stats, batch, d, q)
    _check_projection(fmap, projection, d)
    dtype = compute_dtype(xp, q.dtype)
    kv0 = _check_state(xp, state, (*batch, fmap.num_features(d), dv + 1), dtype, q)
    own = isinstance(stats, str) or (
        fmap.data_dependent and not (isinstance(stats, Balance) and stats.spread is not None)
    )
    packed = resets = None
    if segment_ids is None and kv_segment_ids is not None:
        raise ValueError("kv_segment_ids needs segment_ids (the queries' documents)")
    if segment_ids is not None and not causal and (state is not None or return_state):
        raise ValueError(
            "segment_ids: a bidirectional state holds the sums of one sequence; with packed "
            "documents pass no state and return none (causal calls carry the last document's)"
        )
    if segment_ids is not None and is_tracer(segment_ids):  # under jax.jit: traced boundaries
        resets = _traced_resets(xp, segment_ids, kv_segment_ids, q_batch, batch, group,
                                q.shape[-2] // group, k.shape[-2], own)  # fmt: skip
    elif segment_ids is not None:  # read before any other pass
        packed = _packed_groups(xp, segment_ids, kv_segment_ids, q_batch, batch, group,
                                q.shape[-2] // group, k.shape[-2], causal, own)  # fmt: skip
    if check_finite:  # the first pass over the data
        _finite(xp, mask, q=q, k=k, v=v)
    if isinstance(stats, str) and packed is None:
        stats = balance_statistics(
            q, k, key_mask=key_mask, query_mask=query_mask, scale=root * root, kind=stats
        )
    x, y, vc = (xp.astype(a, dtype, copy=False) for a in (q, k, v))
    w = fmap.projection_like(x) if projection is None else xp.astype(projection, dtype, copy=False)
    steps = steps_for(xp)
    chunk = steps.chunk if chunk is None else chunk
    if packed is not None and own:  # each document's statistics: a form per segment
        flat = flatten(xp, steps, _Given(), x, y, vc, mask=mask, kv0=None, causal=causal,
                       chunk=chunk, batch=batch, m=0, group=group)  # fmt: skip
        qm = None
        if query_mask is not None:
            qm = xp.reshape(xp.broadcast_to(query_mask[..., None], (*batch, q.shape[-2], 1)),
                            (math.prod(batch), q.shape[-2], 1))  # fmt: skip
        form = segment_form(xp, fmap, packed, flat.x, flat.y, w, root=root, kind=stats,
                            mask=flat.mask, query_mask=qm, group=group)  # fmt: skip
        call = flatten(
            xp, steps, form, x, y, vc, mask=mask, kv0=kv0, causal=causal, chunk=chunk,
            batch=batch, m=fmap.num_features(d), group=group, packed=packed,
            form_batch=(len(packed),),
        )  # fmt: skip
        return call, fmap
    assert not isinstance(stats, str)
    form = fmap.form(xp, x, y, w, root=root, balance=stats, key_mask=key_mask,
                     query_mask=query_mask)  # fmt: skip
    call = flatten(
        xp, steps, form, x, y, vc, mask=mask, kv0=kv0, causal=causal, chunk=chunk, batch=batch,
        m=fmap.num_features(d), group=group, packed=packed, resets=resets,
    )  # fmt: skip
    return call, fmap


def _traced_resets(
    xp: ModuleType,
    segment_ids: Array,
    kv_segment_ids: Array | None,
    q_batch: tuple[int, ...],
    batch: tuple[int, ...],
    group: int,
    length: int,
    lk: int,
    own: bool,
) -> Array:
    """Where the documents of traced ``segment_ids`` start (every check before any pass
    over q, k, v)."""
    if kv_segment_ids is not None or lk != length:
        raise ValueError(
            "kv_segment_ids: under jax.jit (traced ids) the keys' documents must be the "
            "queries' (Lq == Lk, segment_ids alone); compute the ids outside jit"
        )
    if own:
        raise ValueError(
            "segment_ids: under jax.jit each document's statistics (the balance, FAVOR++'s "
            "A) cannot be computed from traced boundaries; pass balance=False or statistics "
            "computed beforehand (balance=favorcore.balance_statistics(q, k) of a "
            "calibration batch), or compute the ids outside jit"
        )
    return resets_of(xp, segment_ids, q_batch, batch, length, group)


def _packed_groups(
    xp: ModuleType,
    segment_ids: Array,
    kv_segment_ids: Array | None,
    q_batch: tuple[int, ...],
    batch: tuple[int, ...],
    group: int,
    lq: int,
    lk: int,
    causal: bool,
    own: bool,
) -> list[Group]:
    """The groups of a packed call (every check of the ids comes before any pass over q,
    k, v)."""
    if kv_segment_ids is None:
        if lq != lk:
            raise ValueError("segment_ids: Lq != Lk, so pass kv_segment_ids for the keys")
        kv_segment_ids = segment_ids
    elif causal:
        raise ValueError("kv_segment_ids: causal attention has one sequence; pass segment_ids")
    q_ids = check_ids(xp, segment_ids, q_batch, lq, "segment_ids")
    if group > 1:  # one row of ids per key head: its query heads' must agree
        grouped = q_ids.reshape(-1, q_batch[-1] // group, group, lq)
        if (grouped != grouped[:, :, :1]).any():
            raise ValueError(
                "segment_ids: with enable_gqa the query heads of a key head must share "
                "their documents (give the heads axis size 1)"
            )
        q_ids = grouped[:, :, 0].reshape(*q_batch[:-1], q_batch[-1] // group, lq)
        q_ids = np.broadcast_to(q_ids, (*batch, lq)).reshape(-1, lq)
    else:
        q_ids = np.broadcast_to(q_ids.reshape(*q_batch, lq), (*batch, lq)).reshape(-1, lq)
    k_ids = check_ids(xp, kv_segment_ids, batch, lk, "kv_segment_ids")
    return groups_of(q_ids, k_ids, causal=causal, own_forms=own)


def _unbroadcast(xp: ModuleType, grad: Array, shape: tuple[int, ...]) -> Array:
    """``grad`` (the broadcast shape) summed down to ``shape``, as a broadcast's backward."""
    lead = grad.ndim - len(shape)
    if lead:
        grad = xp.sum(grad, axis=tuple(range(lead)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return xp.sum(grad, axis=axes, keepdims=True) if axes else grad


def favor_attention_vjp(
    q: Array,
    k: Array,
    v: Array,
    grad: Array,
    *,
    grad_state: AttentionState | None = None,
    features: FeatureMap | None = None,
    causal: bool = False,
    key_mask: Array | None = None,
    scale: float | None = None,
    chunk_size: int | None = None,
    state: AttentionState | None = None,
    projection: Array | None = None,
    check_finite: bool = True,
    balance: bool | BalanceKind | Balance | None = None,
    query_mask: Array | None = None,
    enable_gqa: bool = False,
    segment_ids: Array | None = None,
    kv_segment_ids: Array | None = None,
) -> tuple[Array, Array, Array, AttentionState | None]:
    r"""The vector-Jacobian product of :func:`favor_attention`: its gradients, block by block.

    Given the cotangent ``grad`` of the output (and ``grad_state``, the cotangent of the
    returned state, when the call returns one), returns ``(dq, dk, dv, dstate)``:
    the cotangents of ``q``, ``k``, ``v`` and of ``state`` (None without one). The other
    arguments are :func:`favor_attention`'s. Statistics the call uses (the balance, the
    key shift, FAVOR++'s ``A``, the queries' row max) and the projection are constants,
    as under autodiff of :func:`favor_attention`.

    With ``g^_i = [g_i ; -(g_i . o_i)] / D_i`` and ``[S | z]`` the key sums: bidirectional,
    ``dphi(q_i) = [S | z] g^_i``, the sums' cotangent is ``sum_i phi(q_i) g^_i^T`` (plus
    ``grad_state``), and each key's and value's follow from it; causal, the same with the
    chunks' prefixes in the forward terms and suffixes in the backward ones, as a reverse
    chunked scan. The features are recomputed block by block, never held whole. Only the
    positive maps (their features are ``exp`` of affine maps of the rows) have the
    formulas; other maps raise ``NotImplementedError`` (differentiate them with your
    framework's autodiff).

    Examples
    --------
    >>> import numpy as np
    >>> from favorcore import PositiveFeatures, favor_attention, favor_attention_vjp
    >>> rng = np.random.default_rng(0)
    >>> q, k, v, g = (rng.standard_normal((40, 8)) / 2 for _ in range(4))
    >>> fm = PositiveFeatures(m=16, seed=0)
    >>> dq, dk, dv, _ = favor_attention_vjp(q, k, v, g, features=fm, causal=True)
    >>> e = np.zeros_like(q)
    >>> e[3, 1] = 1e-6  # a finite difference in one entry of q
    >>> loss = lambda q: float((favor_attention(q, k, v, features=fm, causal=True) * g).sum())
    >>> bool(abs((loss(q + e) - loss(q - e)) / 2e-6 - dq[3, 1]) < 1e-7)
    True
    """
    call, _ = _plan(
        q, k, v, features=features, causal=causal, key_mask=key_mask, scale=scale,
        chunk_size=chunk_size, state=state, return_state=grad_state is not None,
        projection=projection, check_finite=check_finite, balance=balance,
        query_mask=query_mask, enable_gqa=enable_gqa, segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids,
    )  # fmt: skip
    if call.resets is not None:
        raise ValueError(
            "favor_attention_vjp: segment_ids are traced here; differentiate favor_attention "
            "with jax.grad instead (it takes JAX's autodiff), or pass eager ids"
        )
    xp, batch, group = call.xp, call.batch, call.group
    n_rows, lq, dv = math.prod(batch), call.x.shape[-2], v.shape[-1]
    check_shape("grad", grad, (q.shape[-2], dv), tuple(q.shape[:-2]), q)
    grad = xp.broadcast_to(grad, (*q.shape[:-1], dv)) if group > 1 else grad
    g = xp.astype(_interleave(xp, grad, group), call.x.dtype, copy=False)
    g = xp.reshape(xp.broadcast_to(g, (*batch, lq, dv)), (n_rows, lq, dv))
    dkv = None
    if grad_state is not None:
        expected = (*batch, call.m, dv + 1)
        dkv_in = _check_state(xp, grad_state, expected, call.x.dtype, q)
        dkv = xp.reshape(dkv_in, (n_rows, call.m, dv + 1))
    out, kv, _, states = forward(call)
    dx, dy, dvv, dkv0 = backward(call, out, kv, states, g, dkv)

    def back(a: Array, like: Array) -> Array:
        a = xp.reshape(a, (*batch, *a.shape[-2:]))
        return xp.astype(_unbroadcast(xp, a, tuple(like.shape)), like.dtype, copy=False)

    dstate = None if dkv0 is None or state is None else AttentionState(back(dkv0, state.kv))
    dq = _deinterleave(xp, xp.reshape(dx, (*batch, *dx.shape[-2:])), group)
    dq = xp.astype(_unbroadcast(xp, dq, tuple(q.shape)), q.dtype, copy=False)
    return dq, back(dy, k), back(dvv, v), dstate


def favor_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    features: FeatureMap | None = None,
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
    enable_gqa: bool = False,
    segment_ids: Array | None = None,
    kv_segment_ids: Array | None = None,
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
    features : FeatureMap, optional
        The feature map, e.g. ``PositiveFeatures(m=256, seed=0)``. By default
        :data:`DEFAULT_FEATURES`, FAVOR++ with ``m = 256`` (``seed=0``) and the matrix
        balance from the call's tokens; in causal calls and calls that carry a state it
        takes both from ``balance`` statistics, or runs without them as FAVOR+ with
        antithetic pairs (``A = 0``, no balance).
    causal : bool
        Query ``i`` attends to keys ``j <= i`` only (needs ``Lq == Lk``).
    key_mask : bool array, optional
        True = attend, shape ``batch + (Lk,)``: exactly ``q.ndim - 1`` dimensions, each
        ``q``'s or 1 (a ``(batch, Lk)`` mask on ``(batch, heads, L, d)`` inputs is
        ``key_mask[:, None, :]``; fewer dimensions are refused, not broadcast).
    scale : float, optional
        Logit scale; ``1/sqrt(d)`` when omitted, as in ``scaled_dot_product_attention``.
    chunk_size : int, optional
        Chunk length of causal attention; the result does not depend on it beyond
        rounding. By default the backend's (NumPy and PyTorch: 64, otherwise 128).
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
        On eager arrays, raise ``ValueError`` if ``q``, or ``k``/``v`` at unmasked
        positions, hold NaN or inf, and warn (:class:`AccuracyWarning`) when query rows
        get a normaliser too small to use (their output is 0). Lazy arrays (under
        ``jax.jit``, Dask, PyTorch meta and fake tensors) are never read: there NaN
        propagates to the rows it touches.
    balance : None, bool, {"matrix", "scalar"} or Balance
        Exact variance reduction (:mod:`favorcore.balance`): balance queries against keys
        and shift all keys by one vector, which leaves exact attention unchanged and lowers
        the estimator's variance. ``True`` (``"matrix"``) or ``"scalar"`` computes the
        statistics from this call's tokens (bidirectional calls without
        ``state``/``return_state`` only); a :class:`Balance` (from
        :func:`balance_statistics` on a calibration batch) is applied as given, also in
        causal attention and across calls that share a state. ``None`` (the default) is
        ``"matrix"`` for the positive softmax maps in bidirectional calls without a
        state, ``False`` otherwise. Maps that do not estimate the softmax kernel
        (:class:`GeneralizedFeatures`) take no balance.
    query_mask : bool array, optional
        True = a real query, shape ``batch + (Lq,)``, exactly ``q.ndim - 1`` dimensions
        (each ``q``'s or 1) as ``key_mask``: padded queries are
        left out of the statistics computed from the tokens (balance, FAVOR++'s ``A``).
        Their output rows are computed as usual. In self-attention over padded batches
        pass the same mask as ``key_mask``.
    enable_gqa : bool
        Grouped-query attention (PyTorch SDPA's name and layout): ``k`` and ``v`` have
        ``H_kv`` heads on axis -3 for ``q``'s ``H = G H_kv``, and query head ``h`` attends
        with key head ``h // G``. Key features and sums are computed once per key head;
        statistics computed from the tokens are pooled over a key head's query heads;
        ``key_mask``, ``state`` and ``balance`` have ``H_kv`` heads (or 1), ``query_mask``
        ``H`` (or 1).
    segment_ids : integer array, optional
        Packed sequences: documents packed one after another, shape ``batch + (Lq,)``,
        exactly ``q.ndim - 1`` dimensions (each ``q``'s or 1) as ``key_mask``; a document is a run of equal ids (the per-token form of
        flash-attention's ``cu_seqlens``), and ids must not decrease. A token attends only
        to its own document (causal: to its earlier tokens; the state resets where a
        document starts, a given ``state`` continues the first document of each row and
        the returned state holds the last one's sums). Statistics computed from the
        tokens (the balance, the shift, FAVOR++'s ``A``) are each document's own. Combined
        with ``key_mask`` by AND. The ids are read (eager arrays; a Dask array of ids is
        computed); bidirectional calls with them take no state. Under ``jax.jit`` (traced
        ids) they are the places where the chunked scan restarts (bidirectional: a second
        scan from the end adds the keys after each row); a document is then any run of
        equal ids, no ``kv_segment_ids``, statistics given rather than computed from the
        tokens (``balance=False`` or a :class:`~favorcore.Balance`), and with ``enable_gqa``
        the ids' heads axis has size 1.
    kv_segment_ids : integer array, optional
        The keys' documents when ``Lq != Lk`` (bidirectional): query document ``s``
        attends to the key document with the same id (none: its rows are 0).

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
        a configuration that would use the future, or a state of other shapes; the
        message names the argument. All of them before any pass over the data.

    Examples
    --------
    >>> import numpy as np
    >>> from favorcore import PositiveFeatures, favor_attention, softmax_attention
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 128, 16)) for _ in range(3))
    >>> q, k = 0.3 * q, 0.3 * k  # FAVOR's variance grows like exp(|q + k|^2 / sqrt(d))
    >>> ref = softmax_attention(q, k, v)
    >>> out = favor_attention(q, k, v)  # the default estimator
    >>> print(f"{np.linalg.norm(out - ref) / np.linalg.norm(ref):.3f}")
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
    call, fmap = _plan(
        q, k, v, features=features, causal=causal, key_mask=key_mask, scale=scale,
        chunk_size=chunk_size, state=state, return_state=return_state, projection=projection,
        check_finite=check_finite, balance=balance, query_mask=query_mask,
        enable_gqa=enable_gqa, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
    )  # fmt: skip
    xp, batch, rows, group = call.xp, call.batch, call.x.shape[-2], call.group
    out, kv, small = call.steps.run(call)
    small = xp.reshape(small, (*batch, rows, 1))
    if check_finite and is_eager(small):
        mask = None if call.mask is None else xp.reshape(call.mask, (*batch, k.shape[-2], 1))
        if call.packed is not None:
            small = small & _packed_has_key(call)
            mask = None
        _warn_small_normaliser(xp, small, mask, causal, fmap, group)
    out = _deinterleave(xp, xp.reshape(out, (*batch, rows, v.shape[-1])), group)
    out = xp.astype(out, q.dtype, copy=False)
    kv = xp.reshape(kv, (*batch, *kv.shape[-2:]))
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

    Same conventions as :func:`favor_attention` (shapes, dtypes, scale); costs
    O(Lq Lk d) time and O(Lq Lk) memory. A query with no valid key returns 0.

    Parameters
    ----------
    q, k, v : array, shapes (..., Lq, d), (..., Lk, d), (..., Lk, dv)
        Queries, keys and values, any leading batch/head dimensions that broadcast.
    causal : bool
        Query ``i`` attends to keys ``j <= i`` only (needs ``Lq == Lk``).
    key_mask : bool array, optional
        True = attend, shape ``batch + (Lk,)``: exactly ``q.ndim - 1`` dimensions, each
        ``q``'s or 1 (a ``(batch, Lk)`` mask on ``(batch, heads, L, d)`` inputs is
        ``key_mask[:, None, :]``; fewer dimensions are refused, not broadcast).
    scale : float, optional
        Logit scale; ``1/sqrt(d)`` when omitted.
    check_finite : bool
        On eager arrays, raise ``ValueError`` if ``q``, or ``k``/``v`` at unmasked
        positions, hold NaN or inf (meta and fake tensors are never read).

    Examples
    --------
    >>> import numpy as np
    >>> q = k = np.eye(2)
    >>> v = np.array([[1.0], [3.0]])
    >>> softmax_attention(q, k, v, scale=1.0, causal=True).ravel().tolist()
    [1.0, 2.4621171572600096]
    """
    xp = namespace(q=q, k=k, v=v, key_mask=key_mask)
    check_devices(xp, q=q, k=k, v=v, key_mask=key_mask)
    batch = check_qkv(xp, q, k, v, ("q", "k", "v"))
    check_causal(causal, q.shape[-2], k.shape[-2], ("q", "k"))
    mask = check_mask(xp, key_mask, batch, k.shape[-2], "key_mask")
    scale = check_scale(scale, q.shape[-1])
    if check_finite:
        _finite(xp, mask, q=q, k=k, v=v)
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
