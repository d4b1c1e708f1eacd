"""Dask adapter: FAVOR attention over a sequence chunked along L, on a cluster.

The core already runs on Dask arrays (lazily, as one graph). For sequences larger than a
machine, this module schedules the work block by block so that no task holds more than
one block of the sequence plus an ``m x (dv + 1)`` state:

* bidirectional: map-reduce. Each block of keys gives its sums ``phi(K_b)^T [V_b | 1]``
  (an :class:`~favorcore.AttentionState`); the sums are added in a tree; each block of
  queries is then answered from the total.
* causal: blockwise prefix. The block sums are computed in parallel, prefix-summed (small
  arrays), and each block runs causal attention with the sum of the blocks before it as
  its state.

Every block runs :func:`favorcore.favor_attention` on the block's arrays (NumPy, or CuPy
under ``dask`` with CuPy chunks); the adapter only schedules. Inputs must be chunked along
the sequence axis (-2) only; other axes are merged into one chunk.
"""

from __future__ import annotations

import functools
from typing import Any

import array_api_compat
import dask.array as da
from dask.delayed import Delayed, delayed

import favorcore
from favorcore import AttentionState, Balance, FeatureMap, PositiveFeatures

__all__ = ["favor_attention"]


def _stats(stats: Any) -> Balance | bool:
    return False if stats is None else Balance(*stats)


def _block_sums(k: Any, v: Any, mask: Any, stats: Any, **kw: Any) -> Any:
    """The block's key sums: a bidirectional call with no queries."""
    none = k[..., :0, :]
    _, state = favorcore.favor_attention(
        none, k, v, key_mask=mask, return_state=True, balance=_stats(stats), **kw
    )
    return state.kv


def _add(a: Any, b: Any) -> Any:
    return a + b


def _answer(q: Any, total: Any, stats: Any, **kw: Any) -> Any:
    """The queries of one block, attending to every key through their sums."""
    xp = array_api_compat.array_namespace(q)
    no_keys = q[..., :0, :]
    no_values = xp.zeros(
        (*q.shape[:-2], 0, total.shape[-1] - 1), dtype=q.dtype, device=array_api_compat.device(q)
    )
    return favorcore.favor_attention(
        q, no_keys, no_values, state=AttentionState(total), balance=_stats(stats), **kw
    )


def _causal_block(
    q: Any, k: Any, v: Any, mask: Any, prefix: Any, chunk_size: Any, stats: Any, **kw: Any
) -> Any:
    state = None if prefix is None else AttentionState(prefix)
    return favorcore.favor_attention(
        q, k, v, key_mask=mask, causal=True, state=state, chunk_size=chunk_size,
        balance=_stats(stats), **kw,
    )  # fmt: skip


def _blocks(x: da.Array) -> list[Delayed]:
    """The blocks of ``x`` along axis -2 (other axes in one chunk)."""
    x = x.rechunk({i: -1 for i in range(x.ndim) if i != x.ndim - 2})
    return list(x.to_delayed().reshape(-1))


def _tree_sum(items: list[Delayed]) -> Delayed:
    while len(items) > 1:
        pairs = [delayed(_add)(a, b) for a, b in zip(items[::2], items[1::2], strict=False)]
        items = pairs + ([items[-1]] if len(items) % 2 else [])
    return items[0]


def favor_attention(
    q: da.Array,
    k: da.Array,
    v: da.Array,
    *,
    features: FeatureMap,
    causal: bool = False,
    key_mask: da.Array | None = None,
    scale: float | None = None,
    chunk_size: int | None = None,
    balance: bool | Balance | None = None,
) -> da.Array:
    """FAVOR attention on Dask arrays chunked along the sequence, block by block.

    Parameters
    ----------
    q, k, v : dask.array.Array
        Shapes as in :func:`favorcore.favor_attention`, chunked along axis -2. For
        ``causal=True``, ``k`` and ``v`` must be chunked as ``q``.
    features, causal, scale, chunk_size
        As in :func:`favorcore.favor_attention`.
    key_mask : dask.array.Array, optional
        True = attend, shape ``batch + (Lk,)`` (chunked along its last axis as ``k``).
    balance : None, bool or Balance
        As in :func:`favorcore.favor_attention` (by default on for the positive maps in
        bidirectional attention): the statistics of the whole sequence are computed
        first (a reduction over the blocks, O(L d)) and every block applies them.
        A data-dependent FAVOR++ takes its ``A`` from these statistics.

    Returns
    -------
    dask.array.Array
        Lazy result with ``q``'s shape (last axis ``dv``), dtype and chunks along L.

    Examples
    --------
    >>> import dask.array as da, numpy as np
    >>> from favorcore import PositiveFeatures
    >>> x = da.from_array(np.random.default_rng(0).standard_normal((2, 1000, 16)), chunks=(2, 250, 16))
    >>> out = favor_attention(x, x, x, features=PositiveFeatures(m=64, seed=0), causal=True)
    >>> out.chunks[1]
    (250, 250, 250, 250)
    """
    for name, a in (("q", q), ("k", k), ("v", v)):
        if not isinstance(a, da.Array) or a.ndim < 2:
            raise TypeError(
                f"{name} must be a dask array of shape (..., L, dim), got {type(a).__name__}"
            )
        if a.shape[:-2] != q.shape[:-2]:
            raise ValueError(
                f"{name} must have q's batch dimensions {q.shape[:-2]}, got {a.shape[:-2]}"
            )
    if key_mask is not None and (
        not isinstance(key_mask, da.Array) or key_mask.shape[-1] != k.shape[-2]
    ):
        raise ValueError(
            f"key_mask must be a dask array of shape batch + (Lk,) = (..., {k.shape[-2]})"
        )
    if balance is None:
        balance = isinstance(features, PositiveFeatures) and not causal
    stats: Any = None  # the statistics as a list of delayed arrays (None: no balance)
    if balance is True:
        if causal:
            raise ValueError(
                "balance=True computes its statistics from the tokens, which in causal "
                "attention would use the future; pass Balance statistics"
            )
        balance = favorcore.balance_statistics(q, k, key_mask=key_mask, scale=scale)
    if features.data_dependent and not (
        isinstance(balance, Balance) and balance.spread is not None
    ):
        raise ValueError(
            f"features: {type(features).__name__} computes statistics from each call's tokens, "
            "but every block is its own call here; balance it (its statistics fix A) or give "
            "it fixed parameters (e.g. a=...)"
        )
    if isinstance(balance, Balance):
        stats = [
            None if s is None else da.asarray(s).rechunk(-1).to_delayed().reshape(-1)[0]
            for s in balance
        ]
    kw = {"features": features, "scale": scale}
    dv = v.shape[-1]
    qb, kb, vb = _blocks(q), _blocks(k), _blocks(v)
    mb: list[Any] = [None] * len(kb)
    if key_mask is not None:
        mask = key_mask.rechunk(dict.fromkeys(range(key_mask.ndim - 1), -1))
        mask = mask.rechunk({key_mask.ndim - 1: k.chunks[-2]})
        mb = list(mask.to_delayed().reshape(-1))
    batch = tuple(int(s) for s in q.shape[:-2])
    if causal:
        if (
            q.shape[-2] != k.shape[-2]
            or q.chunks[-2] != k.chunks[-2]
            or k.chunks[-2] != v.chunks[-2]
        ):
            raise ValueError(
                "causal attention needs q, k and v of one length, chunked alike along L"
            )
        sums = [
            delayed(functools.partial(_block_sums, **kw))(kk, vv, mm, stats)
            for kk, vv, mm in zip(kb, vb, mb, strict=True)
        ]
        prefixes: list[Any] = [None]
        for s in sums[:-1]:
            prefixes.append(s if prefixes[-1] is None else delayed(_add)(prefixes[-1], s))
        outs = [
            delayed(functools.partial(_causal_block, **kw))(qq, kk, vv, mm, pp, chunk_size, stats)
            for qq, kk, vv, mm, pp in zip(qb, kb, vb, mb, prefixes, strict=True)
        ]
    else:
        sums = [
            delayed(functools.partial(_block_sums, **kw))(kk, vv, mm, stats)
            for kk, vv, mm in zip(kb, vb, mb, strict=True)
        ]
        total = _tree_sum(sums)
        outs = [delayed(functools.partial(_answer, **kw))(qq, total, stats) for qq in qb]
    arrays = [
        da.from_delayed(o, shape=(*batch, n, dv), dtype=q.dtype, meta=q._meta)
        for o, n in zip(outs, q.chunks[-2], strict=True)
    ]
    return da.concatenate(arrays, axis=-2)
