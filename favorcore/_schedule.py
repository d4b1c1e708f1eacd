r"""The schedule: one way to run attention block by block, for every namespace and map.

The rows are cut into **blocks** (:meth:`Steps.blocks`), so that no ``L x m`` array of
features is ever held and every pass over one stays in cache, and into **work items**: a
group of batch rows (one row for eager adapters, every row at once for
``Steps.vectorized``) and a segment of the sequence, ``Steps.workers`` segments when
there are fewer groups than workers.

* Bidirectional: each work item of keys sums ``phi(K_b)^T [V_b | 1]`` over its blocks
  (:meth:`Steps.keys`, :meth:`Steps.key_sums`); a group's sums (and a given state) are
  added; each work item of queries answers its blocks from them (:meth:`Steps.answer`).
  The backward pass runs the queries' blocks first (:meth:`Steps.answer_grad`: their
  cotangents and the sums' cotangent), then the keys' (:meth:`Steps.keys_grad`).
* Causal: the segments before the last sum their keys first; their running totals are
  the states the segments start from; each segment then runs its blocks in order
  (:meth:`Steps.causal`), carrying the state. A block is passed as its full chunks, then
  its last, shorter chunk (a *piece* each). The backward pass runs the pieces in reverse
  (:meth:`Steps.causal_grad`), from the states the forward started them from, carrying
  the state's cotangent.

Every operation goes through ``steps`` (one crossing per operation); nothing here knows
a framework or a feature map.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ._compat import Array, device
from .features import Form

if TYPE_CHECKING:
    from .steps import Steps

__all__ = ["Call", "backward", "flatten", "forward"]

Piece = tuple[int, int, int]  # rows start:end of a causal piece, and its chunk length


def _split(length: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """``parts`` segments of ``0:length`` (bounds on multiples of ``align``)."""
    parts = max(1, min(parts, -(-length // align)))
    bounds = [min(length, round(i * length / parts / align) * align) for i in range(parts)]
    bounds.append(length)
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a] or [(0, 0)]


def _pieces(lo: int, hi: int, chunk: int) -> list[Piece]:
    """Rows ``lo:hi`` as ``(start, end, chunk)``: the full chunks, then the rest."""
    split = lo + (hi - lo) // chunk * chunk
    out = [(lo, split, chunk)] if split > lo else []
    return out + ([(split, hi, hi - split)] if hi > split else [])


@dataclass
class Call:
    """One call as the schedule runs it: the rows flattened to ``(n_rows, L, width)``.

    ``x``, ``y``, ``v`` are the queries, keys and values (unscaled, compute dtype),
    ``mask`` the keys' ``(n_rows, Lk, 1)`` mask or None, ``kv0`` a state
    ``(n_rows, m, dv + 1)`` or None, ``form`` the feature map's form of the call.
    """

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
    batch: tuple[int, ...] = field(default=())
    group: int = 1  # query rows per key row in causal calls (grouped-query attention)

    def with_arrays(self, **arrays: Any) -> Call:
        """The call with other arrays (the same blocks, form and settings)."""
        return Call(**{**self.__dict__, **arrays})

    def groups(self) -> list[int | None]:
        """Batch rows one by one, or all at once (None)."""
        return [None] if self.steps.vectorized else list(range(self.x.shape[0]))

    def form_of(self, g: int | None) -> Form:
        return self.form if g is None else self.form.select(g)

    @staticmethod
    def rows(a: Array, g: int | None, lo: int, hi: int) -> Array:
        return a[:, lo:hi, :] if g is None else a[g, lo:hi, :]

    def query_rows(self, a: Array, g: int | None, lo: int, hi: int) -> Array:
        """The query rows (of ``x``, the output, its cotangent) of positions ``lo:hi``."""
        return self.rows(a, g, lo * self.group, hi * self.group)

    def of(self, a: Array | None, g: int | None) -> Array | None:
        """Group ``g``'s part of a ``(n_rows, ...)`` array."""
        return a if a is None or g is None else a[g, ...]

    def zeros(self, g: int | None) -> Array:
        lead = (self.x.shape[0],) if g is None else ()
        shape = (*lead, self.m, self.v.shape[-1] + 1)
        return self.xp.zeros(shape, dtype=self.x.dtype, device=device(self.x))

    def keep(self, g: int | None, lo: int, hi: int) -> Array | None:
        return None if self.mask is None else self.rows(self.mask, g, lo, hi)

    def keys(self, g: int | None, form: Form, lo: int, hi: int) -> tuple[Array, Array]:
        y, v = self.rows(self.y, g, lo, hi), self.rows(self.v, g, lo, hi)
        return self.steps.keys(self.xp, form, y, v, self.keep(g, lo, hi))

    def blocks(self, a: Array, lo: int, hi: int) -> list[tuple[int, int]]:
        return self.steps.blocks(a, lo, hi, self.chunk if self.causal else None)

    def key_sums(self, item: tuple[int | None, int, int]) -> Array | None:
        """The sums of a work item's keys (None: it has none)."""
        g, lo, hi = item
        form, total = self.form_of(g), None
        for s, e in self.blocks(self.y, lo, hi):
            part = self.steps.key_sums(self.xp, *self.keys(g, form, s, e))
            total = part if total is None else total + part
        return total

    def segments(self, length: int) -> list[tuple[int, int]]:
        parts = max(1, -(-self.steps.workers // len(self.groups())))
        return _split(length, parts, align=self.chunk if self.causal else 1)

    def join(self, per_group: list[list[Array]], width: int, dtype: Any) -> Array:
        """Each group's block results along the rows, the groups stacked: ``(n_rows, L, width)``."""
        xp, lead = self.xp, (self.x.shape[0],) if self.steps.vectorized else ()
        rows = [
            xp.zeros((*lead, 0, width), dtype=dtype, device=device(self.x)) if not pieces
            else pieces[0] if len(pieces) == 1 else xp.concat(pieces, axis=-2)
            for pieces in per_group
        ]  # fmt: skip
        return rows[0] if self.steps.vectorized else xp.stack(rows)

    def stack(self, per_group: list[Array]) -> Array:
        return per_group[0] if self.steps.vectorized else self.xp.stack(per_group)


def flatten(
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
    group: int = 1,
) -> Call:
    """The :class:`Call` of rows ``x``, ``y``, ``v`` broadcasting to ``batch`` (``mask``
    ``(..., Lk, 1)``, ``kv0`` ``batch + (m, dv + 1)``; ``group`` query rows per key row,
    interleaved by position, in causal calls)."""
    from .steps import Steps

    n_rows = math.prod(batch)

    def flat(a: Array, length: int) -> Array:
        shape = (*batch, length, a.shape[-1])
        return xp.reshape(xp.broadcast_to(a, shape), (n_rows, length, a.shape[-1]))

    lq, lk = x.shape[-2], y.shape[-2]
    if n_rows == 0:  # the standard steps (eager ones take one batch row at a time)
        steps = Steps(block=steps.block_size(max(lq, lk), causal), chunk=steps.chunk)
    return Call(
        xp, steps, form.flatten(batch), flat(x, lq), flat(y, lk), flat(v, lk),
        None if mask is None else flat(mask, lk),
        None if kv0 is None else xp.reshape(kv0, (n_rows, *kv0.shape[-2:])),
        chunk, causal, m, batch, group,
    )  # fmt: skip


# -- forward -------------------------------------------------------------------------------

Pieces = list[tuple[Array, Array]]  # (result, small) of each block of a group, in order


def forward(call: Call) -> tuple[Array, Array, Array, list[list[tuple[Piece, Array | None]]]]:
    """``(out, kv, small, states)``, flattened: normalised attention in the compute dtype,
    the state after the call, the rows whose normaliser was at most the smallest normal
    number (their output is 0), and (causal) each group's pieces with the state each
    started from, for :func:`backward`."""
    xp, lq, dv = call.xp, call.x.shape[-2], call.v.shape[-1]
    dest = call.steps.output(xp, (call.x.shape[0], lq, dv), call.x)
    per_group, kv, states = (_causal if call.causal else _bidirectional)(call, dest)
    small = call.join([[s for _, s in pieces] for pieces in per_group], 1, xp.bool)
    if dest is None:
        dest = call.join([[r for r, _ in pieces] for pieces in per_group], dv, call.x.dtype)
    return dest, kv, small, states


def _into(dest: Array | None, g: int | None, lo: int, hi: int) -> Array | None:
    return None if dest is None else Call.rows(dest, g, lo, hi)


def _query_into(call: Call, dest: Array | None, g: int | None, lo: int, hi: int) -> Array | None:
    return None if dest is None else call.query_rows(dest, g, lo, hi)


def _group_totals(call: Call, partial: list[Array | None], per: int) -> list[Array]:
    """Each group's given state plus its ``per`` partial sums."""
    totals = []
    for i, g in enumerate(call.groups()):
        total = call.of(call.kv0, g)
        for part in partial[i * per : (i + 1) * per]:
            if part is not None:
                total = part if total is None else total + part
        totals.append(call.zeros(g) if total is None else total)
    return totals


def _bidirectional(call: Call, dest: Array | None) -> tuple[list[Pieces], Array, list[Any]]:
    steps, groups = call.steps, call.groups()
    k_segs, q_segs = call.segments(call.y.shape[-2]), call.segments(call.x.shape[-2])
    partial = steps.map(call.key_sums, [(g, lo, hi) for g in groups for lo, hi in k_segs])
    totals = _group_totals(call, partial, len(k_segs))

    def answer(item: tuple[int, int | None, int, int]) -> Pieces:
        i, g, lo, hi = item
        form = call.form_of(g)
        return [
            steps.answer(call.xp, form, call.rows(call.x, g, s, e), totals[i], _into(dest, g, s, e))
            for s, e in call.blocks(call.x, lo, hi)
        ]

    answers = steps.map(answer, [(i, g, lo, hi) for i, g in enumerate(groups) for lo, hi in q_segs])
    n = len(q_segs)
    per_group = [list(itertools.chain(*answers[i * n : (i + 1) * n])) for i in range(len(groups))]
    return per_group, call.stack(totals), []


def _causal(call: Call, dest: Array | None) -> tuple[list[Pieces], Array, list[Any]]:
    steps, groups = call.steps, call.groups()
    segs = call.segments(call.y.shape[-2])
    before = [(g, lo, hi) for g in groups for lo, hi in segs[:-1]]
    partial = steps.map(call.key_sums, before) if before else []
    starts: list[list[Array | None]] = []
    for i, g in enumerate(groups):
        run, seg_starts = call.of(call.kv0, g), []
        for j in range(len(segs)):
            seg_starts.append(run)
            part = partial[i * (len(segs) - 1) + j] if j < len(segs) - 1 else None
            run = part if run is None else (run if part is None else run + part)
        starts.append(seg_starts)

    def segment(
        item: tuple[int, int | None, int, int, int],
    ) -> tuple[Pieces, list[Any], Array | None]:
        i, g, j, lo, hi = item
        form, state, pieces, started = call.form_of(g), starts[i][j], [], []
        for s, e in call.blocks(call.y, lo, hi):
            kf, vb = call.keys(g, form, s, e)
            for a, b, c in _pieces(s, e, call.chunk):
                started.append(((a, b, c), state))
                result, small, state = steps.causal(
                    call.xp, form, call.query_rows(call.x, g, a, b), kf[..., a - s : b - s, :],
                    vb[..., a - s : b - s, :], state, c, _query_into(call, dest, g, a, b),
                )  # fmt: skip
                pieces.append((result, small))
        return pieces, started, state

    items = [(i, g, j, lo, hi) for i, g in enumerate(groups) for j, (lo, hi) in enumerate(segs)]
    results = steps.map(segment, items)
    n = len(segs)
    per_group, states, totals = [], [], []
    for i, g in enumerate(groups):
        mine = results[i * n : (i + 1) * n]
        per_group.append(list(itertools.chain(*(p for p, _, _ in mine))))
        states.append(list(itertools.chain(*(st for _, st, _ in mine))))
        totals.append(call.zeros(g) if mine[-1][2] is None else mine[-1][2])
    return per_group, call.stack(totals), states


# -- backward ------------------------------------------------------------------------------


def backward(
    call: Call,
    out: Array,
    kv: Array,
    states: list[list[tuple[Piece, Array | None]]],
    g: Array,
    dkv: Array | None,
) -> tuple[Array, Array, Array, Array | None]:
    """The vector-Jacobian product of :func:`forward` (flattened): ``(dx, dy, dv, dkv0)``
    from the cotangents ``g`` of ``out`` and ``dkv`` of the returned state (None: 0), with
    ``out``, ``kv`` and ``states`` as :func:`forward` returned them. ``dkv0`` is None when
    the call had no state. Statistics and the projection are constants."""
    dx, dy, dv, dkv0 = (_causal_grad if call.causal else _bidirectional_grad)(
        call, out, kv, states, g, dkv
    )
    return dx, dy, dv, (dkv0 if call.kv0 is not None else None)


def _bidirectional_grad(
    call: Call, out: Array, kv: Array, states: Any, g: Array, dkv: Array | None
) -> tuple[Array, Array, Array, Array]:
    steps, groups, xp = call.steps, call.groups(), call.xp
    q_segs, k_segs = call.segments(call.x.shape[-2]), call.segments(call.y.shape[-2])

    def queries(item: tuple[int | None, int, int]) -> tuple[list[Array], Array | None]:
        grp, lo, hi = item
        form, kv_g, grads, total = call.form_of(grp), call.of(kv, grp), [], None
        for s, e in call.blocks(call.x, lo, hi):
            rows = (call.rows(a, grp, s, e) for a in (call.x, out, g))
            dx, part = steps.answer_grad(xp, form, next(rows), kv_g, next(rows), next(rows))
            grads.append(dx)
            total = part if total is None else total + part
        return grads, total

    first = steps.map(queries, [(grp, lo, hi) for grp in groups for lo, hi in q_segs])
    sums = []
    for i, grp in enumerate(groups):
        total = call.of(dkv, grp)
        for _, part in first[i * len(q_segs) : (i + 1) * len(q_segs)]:
            if part is not None:
                total = part if total is None else total + part
        sums.append(call.zeros(grp) if total is None else total)

    def keys(item: tuple[int, int | None, int, int]) -> list[tuple[Array, Array]]:
        i, grp, lo, hi = item
        form, grads = call.form_of(grp), []
        for s, e in call.blocks(call.y, lo, hi):
            y, v = call.rows(call.y, grp, s, e), call.rows(call.v, grp, s, e)
            grads.append(steps.keys_grad(xp, form, y, v, call.keep(grp, s, e), sums[i]))
        return grads

    second = steps.map(
        keys, [(i, grp, lo, hi) for i, grp in enumerate(groups) for lo, hi in k_segs]
    )
    nq, nk = len(q_segs), len(k_segs)
    dxs = [
        list(itertools.chain(*(d for d, _ in first[i * nq : (i + 1) * nq])))
        for i in range(len(groups))
    ]
    dkeys = [list(itertools.chain(*second[i * nk : (i + 1) * nk])) for i in range(len(groups))]
    dt, d, dv = call.x.dtype, call.x.shape[-1], call.v.shape[-1]
    return (
        call.join(dxs, d, dt),
        call.join([[a for a, _ in p] for p in dkeys], d, dt),
        call.join([[b for _, b in p] for p in dkeys], dv, dt),
        call.stack(sums),
    )


def _causal_grad(
    call: Call, out: Array, kv: Array, states: list[list[tuple[Piece, Array | None]]],
    g: Array, dkv: Array | None,
) -> tuple[Array, Array, Array, Array]:  # fmt: skip
    steps, groups, xp = call.steps, call.groups(), call.xp

    def one_group(i: int) -> tuple[list[Array], list[Array], list[Array], Array | None]:
        grp = groups[i]
        form, carried = call.form_of(grp), call.of(dkv, grp)
        dxs, dys, dvs = [], [], []
        for (a, b, c), state in reversed(states[i]):
            x, out_p, g_p = (call.query_rows(t, grp, a, b) for t in (call.x, out, g))
            y, v = call.rows(call.y, grp, a, b), call.rows(call.v, grp, a, b)
            dx, dy, dv, carried = steps.causal_grad(
                xp, form, x, y, v, call.keep(grp, a, b), state, out_p, g_p, carried, c
            )
            dxs.append(dx)
            dys.append(dy)
            dvs.append(dv)
        return dxs[::-1], dys[::-1], dvs[::-1], carried

    results = steps.map(one_group, list(range(len(groups))))
    dt, d, dv = call.x.dtype, call.x.shape[-1], call.v.shape[-1]
    return (
        call.join([r[0] for r in results], d, dt),
        call.join([r[1] for r in results], d, dt),
        call.join([r[2] for r in results], dv, dt),
        call.stack(
            [
                call.zeros(grp) if r[3] is None else r[3]
                for grp, r in zip(groups, results, strict=True)
            ]
        ),
    )
