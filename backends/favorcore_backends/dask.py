"""Dask adapter: FAVOR attention over a sequence chunked along L, block by block.

The core runs on Dask arrays lazily, as one graph. Importing this module (the core does it
when it first meets Dask arrays) registers :class:`DaskSteps`, whose blocks of the
sequence are the arrays' chunks along L: the engine's schedule then makes a graph in
which every task reads one chunk of the inputs and at most an ``m x (dv + 1)`` state.

* bidirectional: each chunk of keys gives its sums ``phi(K_b)^T [V_b | 1]``; the sums are
  added; each chunk of queries is answered from the total;
* causal: each chunk runs causal attention from the state of the chunks before it (their
  features and sums are computed in parallel; only the additions of the states chain).

The statistics a call computes from its tokens (the balance, FAVOR++'s ``A``) are
reductions over every chunk, computed first. :func:`favor_attention` checks the chunking
and gives the result the chunks of ``q`` along L.
"""

from __future__ import annotations

from typing import Any

import dask.array as da

import favorcore
from favorcore import Balance, Steps, register_steps

__all__ = ["DaskSteps", "favor_attention"]


class DaskSteps(Steps):
    """The standard operations on blocks that are the arrays' chunks along L."""

    def __init__(self) -> None:
        super().__init__(vectorized=True)

    def blocks(self, x: Any, lo: int, hi: int, chunk: int | None) -> list[tuple[int, int]]:
        """The chunks of ``x`` along L that rows ``lo:hi`` overlap, cut to ``lo:hi``."""
        bounds, start = [], 0
        for size in x.chunks[-2]:
            end = start + size
            if end > lo and start < hi:
                bounds.append((max(start, lo), min(end, hi)))
            start = end
        return bounds


register_steps("array_api_compat.dask.array", DaskSteps())


def favor_attention(q: da.Array, k: da.Array, v: da.Array, **kwargs: Any) -> Any:
    """:func:`favorcore.favor_attention` on Dask arrays chunked along the sequence.

    ``q``, ``k``, ``v`` (and ``key_mask``, ``query_mask``) must be Dask arrays; their other
    axes are merged into one chunk. For ``causal=True``, ``k`` and ``v`` must be chunked
    as ``q``. Every other argument is :func:`favorcore.favor_attention`'s; the result has
    ``q``'s chunks along L.

    Examples
    --------
    >>> import dask.array as da, numpy as np
    >>> from favorcore import PositiveFeatures
    >>> x = da.from_array(np.random.default_rng(0).standard_normal((2, 1000, 16)), chunks=(2, 250, 16))
    >>> out = favor_attention(x, x, x, features=PositiveFeatures(m=64, seed=0), causal=True)
    >>> out.chunks[1]
    (250, 250, 250, 250)
    """
    arrays = {"q": q, "k": k, "v": v}
    masks = {n: kwargs[n] for n in ("key_mask", "query_mask") if kwargs.get(n) is not None}
    for name, a in {**arrays, **masks}.items():
        if not isinstance(a, da.Array) or a.ndim < 1:
            raise TypeError(f"{name} must be a dask array, got {type(a).__name__}")
    if kwargs.get("causal") and not (q.chunks[-2] == k.chunks[-2] == v.chunks[-2]):
        raise ValueError(
            "causal attention needs q, k and v chunked alike along L; rechunk k and v as q"
        )
    q, k, v = (a.rechunk({i: -1 for i in range(a.ndim) if i != a.ndim - 2}) for a in (q, k, v))
    for name, mask in masks.items():
        along = (k if name == "key_mask" else q).chunks[-2]
        if mask.shape[-1] == sum(along):  # (else the core says what is wrong)
            kwargs[name] = mask.rechunk(
                {**dict.fromkeys(range(mask.ndim - 1), -1), mask.ndim - 1: along}
            )
    stats = kwargs.get("balance")
    if isinstance(stats, Balance):  # statistics of a calibration batch, e.g. NumPy arrays
        kwargs["balance"] = Balance(*(None if t is None else da.asarray(t) for t in stats))
    result = favorcore.favor_attention(q, k, v, **kwargs)
    out = result[0] if isinstance(result, tuple) else result
    out = out.rechunk({out.ndim - 2: q.chunks[-2]})
    return (out, result[1]) if isinstance(result, tuple) else out
