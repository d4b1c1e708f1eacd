"""Packed sequences: documents packed one after another, given as ``segment_ids``.

A segment is a run of equal ids along the sequence. Each (batch row, segment) becomes a
:class:`~favorcore._schedule.Group` of the schedule: its tokens attend only to its own
keys (causal: the state resets where it starts), and statistics computed from the tokens
(the balance, the shift, FAVOR++'s ``A``) are each segment's own, so that no document
changes another's estimate. The boundaries are read from the ids, so the ids must be
concrete: eager arrays, or Dask arrays (computed, once per call: they are small).

Ids traced by JAX (inside ``jit``) cannot be read: the call then marks where each document
starts (:func:`resets_of`) and the chunked scan restarts there
(:func:`favorcore.steps.causal_sums`; bidirectional, a second scan from the end adds the
keys after each row); the statistics must then be given, not computed per document.
"""

from __future__ import annotations

import itertools
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

from ._checks import check_rank
from ._compat import Array, device, is_eager, to_host
from ._schedule import Group
from .balance import Balance, BalanceKind, balance_statistics
from .features import FeatureMap, Form

__all__ = ["check_ids", "groups_of", "resets_of", "segment_form"]


def check_ids(
    xp: ModuleType, ids: Array, batch: tuple[int, ...], length: int, name: str
) -> np.ndarray:
    """The ids of every flattened batch row on the host, ``(n_rows, length)``: integers of
    exactly ``len(batch) + 1`` dimensions (each the batch's or 1), not decreasing."""
    _check_dtype_rank(xp, ids, batch, length, name)
    if not (is_eager(ids) or array_api_compat.is_dask_array(ids)):  # Dask's: computed, small
        raise ValueError(
            f"{name}: the documents' boundaries are read from the ids, which are not eager "
            "here (a meta or fake tensor: torch.compile's tracing); pass concrete ids, or pad "
            "the documents into a batch with key_mask"
        )
    host = np.broadcast_to(to_host(ids), (*batch, length)).reshape(-1, length)
    if length > 1 and (np.diff(host, axis=1) < 0).any():
        raise ValueError(
            f"{name} must not decrease along the sequence (documents packed one after "
            "another); number them in order, or mask instead"
        )
    return host


def resets_of(
    xp: ModuleType,
    ids: Array,
    q_batch: tuple[int, ...],
    batch: tuple[int, ...],
    length: int,
    group: int,
) -> Array:
    """Where the documents of traced ``ids`` (``q_batch + (length,)``) start: ``(n_rows,
    length, 1)`` boolean for the flattened ``batch`` (a run of equal ids is a document; the
    first position continues the call's state). With ``group`` query heads per key head,
    the heads axis must have size 1 (the heads' agreement cannot be checked)."""
    _check_dtype_rank(xp, ids, q_batch, length, "segment_ids")
    if group > 1 and ids.shape[-2] != 1:
        raise ValueError(
            "segment_ids: with enable_gqa under jax.jit the query heads of a key head must "
            "share their documents, which traced ids cannot show: give the heads axis size 1"
        )
    rows = xp.reshape(xp.broadcast_to(ids, (*batch, length)), (-1, length))
    first = xp.zeros((rows.shape[0], min(length, 1)), dtype=xp.bool, device=device(ids))
    starts = xp.concat([first, rows[:, 1:] != rows[:, :-1]], axis=1)
    return starts[..., None]


def _check_dtype_rank(
    xp: ModuleType, ids: Array, batch: tuple[int, ...], length: int, name: str
) -> None:
    if not xp.isdtype(ids.dtype, "integral"):
        raise TypeError(f"{name} must be an integer array (one id per document), got {ids.dtype}")
    check_rank(ids, batch, length, name)


def _runs(row: np.ndarray) -> list[tuple[int, int, int]]:
    """``(id, start, end)`` of each run of equal ids."""
    if not row.size:
        return []
    cuts = [0, *(np.flatnonzero(np.diff(row) != 0) + 1).tolist(), row.size]
    return [(int(row[a]), a, b) for a, b in itertools.pairwise(cuts)]


def groups_of(
    q_ids: np.ndarray, k_ids: np.ndarray, *, causal: bool, own_forms: bool
) -> list[Group]:
    """The schedule's groups: each row's query segments with the key segment of the same
    id (none: no keys); ``own_forms`` numbers them for per-segment forms."""
    groups: list[Group] = []
    for r, (q_row, k_row) in enumerate(zip(q_ids, k_ids, strict=True)):
        keys = {sid: (a, b) for sid, a, b in _runs(k_row)}
        runs = _runs(q_row)
        for j, (sid, a, b) in enumerate(runs):
            span = (a, b) if causal else keys.get(sid, (0, 0))
            form = len(groups) if own_forms else None
            groups.append(Group(r, (a, b), span, form, first=j == 0, last=j == len(runs) - 1))
    return groups


def segment_form(
    xp: ModuleType,
    fmap: FeatureMap,
    groups: list[Group],
    x: Array,
    y: Array,
    w: Array | None,
    *,
    root: float,
    kind: BalanceKind | Balance | None,
    mask: Array | None,
    query_mask: Array | None,
    group: int,
) -> Form:
    """The form with a leading dimension of segments: each segment's statistics from its
    own tokens. ``x``, ``y`` are the flattened rows ``(n_rows, L, d)`` (queries ``group``
    rows per position), ``mask`` and ``query_mask`` ``(n_rows, L, 1)`` or None."""
    dt, dev = x.dtype, device(x)
    lq = max((g.q[1] - g.q[0]) * group for g in groups)
    lk = max(g.k[1] - g.k[0] for g in groups)

    def padded(a: Array, m: Array | None, lo: int, hi: int, width: int) -> tuple[Array, Array]:
        part = a[lo:hi, :]
        keep = xp.ones((hi - lo,), dtype=xp.bool, device=dev) if m is None else m[lo:hi, 0]
        pad = width - (hi - lo)
        if pad:
            part = xp.concat([part, xp.zeros((pad, a.shape[-1]), dtype=dt, device=dev)])
            keep = xp.concat([keep, xp.zeros((pad,), dtype=xp.bool, device=dev)])
        return part, keep

    qs, qm, ks, km = [], [], [], []
    for g in groups:
        assert g.row is not None
        a, b = padded(x[g.row, ...], None if query_mask is None else query_mask[g.row, ...],
                      g.q[0] * group, g.q[1] * group, lq)  # fmt: skip
        c, e = padded(y[g.row, ...], None if mask is None else mask[g.row, ...], g.k[0], g.k[1], lk)
        qs.append(a)
        qm.append(b)
        ks.append(c)
        km.append(e)
    xs, ys, qmask, kmask = xp.stack(qs), xp.stack(ks), xp.stack(qm), xp.stack(km)
    stats: Any = kind
    if isinstance(kind, str):
        stats = balance_statistics(xs, ys, key_mask=kmask, query_mask=qmask, scale=root * root,
                                   kind=kind)  # fmt: skip
    return fmap.form(xp, xs, ys, w, root=root, balance=stats, key_mask=kmask, query_mask=qmask)
