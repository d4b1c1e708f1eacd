r"""The schedule: one way to run attention block by block, for every namespace and map.

The rows are cut into **blocks** (:meth:`Steps.blocks`), so that no ``L x m`` array of
features is ever held and every pass over one stays in cache, and into **work items**: a
group of batch rows (one row for eager adapters, every row at once for
``Steps.vectorized``) and a segment of the sequence, ``Steps.workers`` segments when
there are fewer groups than workers.

* Bidirectional: each work item of keys sums ``phi(K_b)^T [V_b | 1]`` over its blocks
  (:meth:`Steps.keys`, :meth:`Steps.key_sums`); a group's sums (and a given state) are
  added; each work item of queries answers its blocks from them (:meth:`Steps.answer`).
* Causal: the segments before the last sum their keys first; their running totals are
  the states the segments start from; each segment then runs its blocks in order
  (:meth:`Steps.causal`), carrying the state. A block is passed as its full chunks, then
  its last, shorter chunk.

Every operation goes through ``steps`` (one crossing per operation); nothing here knows
a framework or a feature map.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ._compat import Array, device
from .features import Form
from .steps import Steps

__all__ = ["run"]


def _split(length: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """``parts`` segments of ``0:length`` (bounds on multiples of ``align``)."""
    parts = max(1, min(parts, -(-length // align)))
    bounds = [min(length, round(i * length / parts / align) * align) for i in range(parts)]
    bounds.append(length)
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a] or [(0, 0)]


def _pieces(lo: int, hi: int, chunk: int) -> list[tuple[int, int, int]]:
    """Rows ``lo:hi`` as ``(start, end, chunk)``: the full chunks, then the rest."""
    split = lo + (hi - lo) // chunk * chunk
    out = [(lo, split, chunk)] if split > lo else []
    return out + ([(split, hi, hi - split)] if hi > split else [])


@dataclass
class _Call:
    """One call's flattened rows ``(n_rows, L, width)`` and its steps."""

    xp: ModuleType
    steps: Steps
    form: Form
    x: Array
    y: Array
    v: Array
    mask: Array | None
    kv0: Array | None
    chunk: int
    causal: bool
    m: int

    def groups(self) -> list[int | None]:
        """Batch rows one by one, or all at once (None)."""
        return [None] if self.steps.vectorized else list(range(self.x.shape[0]))

    def form_of(self, g: int | None) -> Form:
        return self.form if g is None else self.form.select(g)

    @staticmethod
    def rows(a: Array, g: int | None, lo: int, hi: int) -> Array:
        return a[:, lo:hi, :] if g is None else a[g, lo:hi, :]

    def state(self, g: int | None) -> Array | None:
        if self.kv0 is None:
            return None
        return self.kv0 if g is None else self.kv0[g, ...]

    def zeros(self, g: int | None) -> Array:
        lead = (self.x.shape[0],) if g is None else ()
        shape = (*lead, self.m, self.v.shape[-1] + 1)
        return self.xp.zeros(shape, dtype=self.x.dtype, device=device(self.x))

    def keys(self, g: int | None, form: Form, lo: int, hi: int) -> tuple[Array, Array]:
        keep = None if self.mask is None else self.rows(self.mask, g, lo, hi)
        y, v = self.rows(self.y, g, lo, hi), self.rows(self.v, g, lo, hi)
        return self.steps.keys(self.xp, form, y, v, keep)

    def key_sums(self, item: tuple[int | None, int, int]) -> Array | None:
        """The sums of a work item's keys (None: it has none)."""
        g, lo, hi = item
        form, total = self.form_of(g), None
        for s, e in self.steps.blocks(self.y, lo, hi, self.chunk if self.causal else None):
            part = self.steps.key_sums(self.xp, *self.keys(g, form, s, e))
            total = part if total is None else total + part
        return total


def run(
    xp: ModuleType,
    steps: Steps,
    form: Form,
    x: Array,
    y: Array,
    v: Array,
    *,
    mask: Array | None,
    kv0: Array | None,
    causal: bool,
    chunk: int,
    batch: tuple[int, ...],
    m: int,
) -> tuple[Array, Array, Array]:
    """Normalised attention ``(out, kv, small)`` in the compute dtype of ``x``.

    ``x``, ``y``, ``v`` are the call's rows (broadcasting to ``batch``), ``mask``
    ``(..., Lk, 1)`` boolean or None, ``kv0`` a state ``batch + (m, dv + 1)`` or None (``m`` features);
    ``kv`` is the state after the call and ``small`` ``batch + (Lq, 1)`` marks rows whose
    normaliser was at most the smallest normal number (their output is 0).
    """
    n_rows = math.prod(batch)
    lq, lk, dv = x.shape[-2], y.shape[-2], v.shape[-1]

    def flat(a: Array | None, length: int) -> Array | None:
        if a is None:
            return None
        shape = (*batch, length, a.shape[-1])
        return xp.reshape(xp.broadcast_to(a, shape), (n_rows, length, a.shape[-1]))

    x3, y3, v3, m3 = flat(x, lq), flat(y, lk), flat(v, lk), flat(mask, lk)
    assert x3 is not None
    assert y3 is not None
    assert v3 is not None
    kv3 = None if kv0 is None else xp.reshape(kv0, (n_rows, *kv0.shape[-2:]))
    inputs = [a for a in (x3, y3, v3, kv3) if a is not None]
    if n_rows == 0 or not steps.fits(*inputs):  # the standard steps, on the same blocks
        steps = Steps(block=steps.block_size(max(lq, lk), causal), chunk=steps.chunk)
    call = _Call(xp, steps, form.flatten(batch), x3, y3, v3, m3, kv3, chunk, causal, m)
    dest = steps.output(xp, (n_rows, lq, dv), x3)
    run_items = _causal if causal else _bidirectional
    per_group, kv = run_items(call, dest)
    small = _join(call, [[s for _, s in pieces] for pieces in per_group], 1, xp.bool)
    if dest is None:
        out = _join(call, [[r for r, _ in pieces] for pieces in per_group], dv, x3.dtype)
    else:
        out = dest
    return (
        xp.reshape(out, (*batch, lq, dv)),
        xp.reshape(kv, (*batch, *kv.shape[-2:])),
        xp.reshape(small, (*batch, lq, 1)),
    )


Pieces = list[tuple[Array, Array]]  # (result, small) of each block of a group, in order


def _into(dest: Array | None, g: int | None, lo: int, hi: int) -> Array | None:
    if dest is None:
        return None
    return dest[:, lo:hi, :] if g is None else dest[g, lo:hi, :]


def _bidirectional(call: _Call, dest: Array | None) -> tuple[list[Pieces], Array]:
    steps, groups = call.steps, call.groups()
    parts = max(1, -(-steps.workers // len(groups)))
    k_segs, q_segs = _split(call.y.shape[-2], parts), _split(call.x.shape[-2], parts)
    partial = steps.map(call.key_sums, [(g, lo, hi) for g in groups for lo, hi in k_segs])
    totals = []
    for i, g in enumerate(groups):
        total = call.state(g)
        for part in partial[i * len(k_segs) : (i + 1) * len(k_segs)]:
            if part is not None:
                total = part if total is None else total + part
        totals.append(call.zeros(g) if total is None else total)

    def answer(item: tuple[int, int | None, int, int]) -> Pieces:
        i, g, lo, hi = item
        form = call.form_of(g)
        return [
            steps.answer(call.xp, form, call.rows(call.x, g, s, e), totals[i], _into(dest, g, s, e))
            for s, e in steps.blocks(call.x, lo, hi, None)
        ]

    items = [(i, g, lo, hi) for i, g in enumerate(groups) for lo, hi in q_segs]
    answers = steps.map(answer, items)
    n = len(q_segs)
    per_group: list[Pieces] = [
        list(itertools.chain.from_iterable(answers[i * n : (i + 1) * n]))
        for i in range(len(groups))
    ]
    return per_group, _stack(call, totals)


def _causal(call: _Call, dest: Array | None) -> tuple[list[Pieces], Array]:
    steps, groups = call.steps, call.groups()
    parts = max(1, -(-steps.workers // len(groups)))
    segs = _split(call.x.shape[-2], parts, align=call.chunk)
    before = [(g, lo, hi) for g in groups for lo, hi in segs[:-1]]
    partial = steps.map(call.key_sums, before) if before else []
    starts: list[list[Array | None]] = []
    for i, g in enumerate(groups):
        run: Array | None = call.state(g)
        seg_starts = [run]
        for part in partial[i * (len(segs) - 1) : (i + 1) * (len(segs) - 1)]:
            run = part if run is None else (run if part is None else run + part)
            seg_starts.append(run)
        starts.append(seg_starts)

    def segment(item: tuple[int, int | None, int, int, int]) -> tuple[Pieces, Array | None]:
        i, g, j, lo, hi = item
        form, state, pieces = call.form_of(g), starts[i][j], []
        for s, e in steps.blocks(call.x, lo, hi, call.chunk):
            kf, vb = call.keys(g, form, s, e)
            for a, b, c in _pieces(s, e, call.chunk):
                x = call.rows(call.x, g, a, b)
                result, small, state = steps.causal(
                    call.xp, form, x, kf[..., a - s : b - s, :], vb[..., a - s : b - s, :],
                    state, c, _into(dest, g, a, b),
                )  # fmt: skip
                pieces.append((result, small))
        return pieces, state

    items = [(i, g, j, lo, hi) for i, g in enumerate(groups) for j, (lo, hi) in enumerate(segs)]
    results = steps.map(segment, items)
    n = len(segs)
    per_group: list[Pieces] = [
        list(itertools.chain.from_iterable(p for p, _ in results[i * n : (i + 1) * n]))
        for i in range(len(groups))
    ]
    totals = []
    for i, g in enumerate(groups):
        last = results[(i + 1) * n - 1][1]
        totals.append(call.zeros(g) if last is None else last)
    return per_group, _stack(call, totals)


def _stack(call: _Call, per_group: list[Array]) -> Array:
    return (
        per_group[0] if len(per_group) == 1 and call.steps.vectorized else call.xp.stack(per_group)
    )


def _join(call: _Call, per_group: list[list[Array]], width: int, dtype: Any) -> Array:
    """Each group's block results along the rows, the groups stacked: ``(n_rows, L, width)``."""
    xp = call.xp
    lead = (call.x.shape[0],) if call.steps.vectorized else ()
    rows = []
    for pieces in per_group:
        if not pieces:
            rows.append(xp.zeros((*lead, 0, width), dtype=dtype, device=device(call.x)))
        else:
            rows.append(pieces[0] if len(pieces) == 1 else xp.concat(pieces, axis=-2))
    return rows[0] if call.steps.vectorized else xp.stack(rows)
