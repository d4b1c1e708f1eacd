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

import dataclasses
import itertools
from types import ModuleType
from typing import Any, cast

import array_api_compat
import numpy as np

from ._checks import check_rank
from ._compat import Array, device, is_eager, take_rows, to_host
from ._schedule import Group
from .balance import SAMPLE, Balance, BalanceKind, balance_statistics
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
    own tokens, sampled as :func:`~favorcore.balance_statistics` samples that segment
    alone (a side longer than ``SAMPLE`` rows: every ``ceil(n / SAMPLE)``-th row), so that
    they are the segment's own call's. ``x``, ``y`` are the flattened rows
    ``(n_rows, L, d)`` (queries ``group`` rows per position), ``mask`` and ``query_mask``
    ``(n_rows, L, 1)`` or None. Segments are computed in buckets of similar sampled
    lengths (powers of two), each padded to its longest: padding every segment to the
    call's longest would multiply the work."""
    spans = []  # each segment's query rows and key rows: (row, lo, hi)
    for g in groups:
        assert g.row is not None
        spans.append(((g.row, g.q[0] * group, g.q[1] * group), (g.row, g.k[0], g.k[1])))
    buckets: dict[int, list[int]] = {}
    for i, (qs, ks) in enumerate(spans):
        width = max(1, *(-(-(hi - lo) // _step(hi - lo)) for _, lo, hi in (qs, ks)))
        buckets.setdefault(1 << (width - 1).bit_length(), []).append(i)
    forms, counts, order = [], [], []
    for key in sorted(buckets):
        members = buckets[key]
        xs, qmask = _gather(xp, x, query_mask, [spans[i][0] for i in members])
        ys, kmask = _gather(xp, y, mask, [spans[i][1] for i in members])
        stats: Any = kind
        if isinstance(kind, str):  # (the rows are sampled already)
            stats = balance_statistics(xs, ys, key_mask=kmask, query_mask=qmask,
                                       scale=root * root, kind=kind, sample=None)  # fmt: skip
        forms.append(fmap.form(xp, xs, ys, w, root=root, balance=stats, key_mask=kmask,
                               query_mask=qmask))  # fmt: skip
        counts.append(len(members))
        order += members
    if order == sorted(order):
        return forms[0] if len(forms) == 1 else _joined(xp, forms, counts, None)
    where = np.empty(len(order), dtype=np.int64)
    where[order] = np.arange(len(order))  # segment i is row where[i] of the buckets' rows
    return _joined(xp, forms, counts, where)


def _step(n: int) -> int:
    """How :func:`~favorcore.balance_statistics` samples a side of ``n`` rows: every
    ``_step(n)``-th row, ``-(-n // _step(n))`` of them."""
    return -(-n // SAMPLE) or 1


def _gather(
    xp: ModuleType, a: Array, mask: Array | None, spans: list[tuple[int, int, int]]
) -> tuple[Array, Array]:
    """The sampled rows of each span ``(row, lo, hi)`` of ``a`` ``(n_rows, L, w)``, padded
    to the longest: ``(len(spans), width, w)``, and where a row is a valid token
    ``(len(spans), width)`` (in the span and, with ``mask`` ``(n_rows, L, 1)``, kept).
    The padding repeats a row of ``a``: the statistics read only valid rows."""
    n_rows, length, cols = a.shape
    picked = [np.arange(r * length + lo, r * length + hi, _step(hi - lo)) for r, lo, hi in spans]
    width = max([1] + [p.size for p in picked])
    index, valid = np.zeros((len(spans), width), np.int64), np.zeros((len(spans), width), bool)
    for i, rows in enumerate(picked):
        index[i, : rows.size], valid[i, : rows.size] = rows, True
    flat = index.reshape(-1)
    rows = take_rows(xp, xp.reshape(a, (n_rows * length, cols)), flat)
    keep = xp.asarray(valid, device=device(a))
    if mask is not None:
        keep = keep & xp.reshape(take_rows(xp, xp.reshape(mask, (-1,)), flat), valid.shape)
    return xp.reshape(rows, (len(spans), width, cols)), keep


def _joined(xp: ModuleType, forms: list[Form], counts: list[int], where: np.ndarray | None) -> Form:
    """One form of the buckets' forms (``counts`` segments each, in turn): every field
    with a leading dimension of segments concatenated, then taken at ``where`` (None: in
    order already); fields without one (the projection's, the same in every bucket) kept."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cast(Any, forms[0])):
        if not f.init or f.name == "memo":
            continue
        parts = [getattr(form, f.name) for form in forms]
        lead = [p for p in parts if _is_array(p) and p.ndim > 2]
        if not lead:
            values[f.name] = parts[0]
            continue
        tail = tuple(lead[0].shape[1:])
        whole = xp.concat(
            [xp.broadcast_to(p, (n, *tail)) for p, n in zip(parts, counts, strict=True)]
        )
        values[f.name] = whole if where is None else take_rows(xp, whole, where)
    return type(forms[0])(**values)


def _is_array(a: Any) -> bool:
    return array_api_compat.is_array_api_obj(a)
