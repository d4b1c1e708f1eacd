r"""The schedule: one way to run attention block by block, for every namespace and map.

The work is cut into **groups**: a batch row (eager adapters), every batch row at once
(``Steps.vectorized``), or, in packed sequences, one segment (document) of one batch row.
Each group's rows are cut into **blocks** (:meth:`Steps.blocks`), so that no ``L x m``
array of features is ever held and every pass over one stays in cache, and into
``Steps.workers`` **work items** (segments of it) when there are fewer groups than workers.

* Bidirectional: each work item of keys sums ``phi(K_b)^T [V_b | 1]`` over its blocks
  (:meth:`Steps.keys`, :meth:`Steps.key_sums`); a group's sums (and a given state) are
  added; each work item of queries answers its blocks from them (:meth:`Steps.answer`).
  The backward pass runs the queries' blocks first (:meth:`Steps.answer_grad`: their
  cotangents and the sums' cotangent), then the keys' (:meth:`Steps.keys_grad`).
* Causal: the work items before the last sum their keys first; their running totals are
  the states the items start from; each item then runs its blocks in order
  (:meth:`Steps.causal`), carrying the state. A block is passed as its full chunks, then
  its last, shorter chunk (a *piece* each). The backward pass runs the pieces in reverse
  (:meth:`Steps.causal_grad`), from the states the forward started them from, carrying
  the state's cotangent. A row's first group starts from the given state; in packed
  sequences every other group starts from none (the state resets where a document starts).

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

__all__ = ["Call", "Group", "backward", "flatten", "forward"]

Piece = tuple[int, int, int]  # positions start:end of a causal piece, and its chunk length
#: what a bidirectional forward keeps of a group's block ``start:end``: ``("q", start, end)``
#: its query features, ``("d", ...)`` their normalisers, ``("k", ...)`` its key features
Kept = dict[tuple[str, int, int], Array]


def _split(lo: int, hi: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """``parts`` segments of ``lo:hi`` (bounds on multiples of ``align`` from ``lo``)."""
    length = hi - lo
    parts = max(1, min(parts, -(-length // align)))
    bounds = [min(length, round(i * length / parts / align) * align) for i in range(parts)]
    bounds.append(length)
    segs = [(lo + a, lo + b) for a, b in itertools.pairwise(bounds) if b > a]
    return segs or [(lo, lo)]


def _pieces(lo: int, hi: int, chunk: int) -> list[Piece]:
    """Positions ``lo:hi`` as ``(start, end, chunk)``: the full chunks, then the rest."""
    split = lo + (hi - lo) // chunk * chunk
    out = [(lo, split, chunk)] if split > lo else []
    return out + ([(split, hi, hi - split)] if hi > split else [])


@dataclass(frozen=True)
class Group:
    """A unit of the schedule: a batch row (None: every row at once), the positions of its
    queries and keys, its form (an index into the call's per-segment forms, or None: the
    row's), and whether it starts from the given state and ends the row."""

    row: int | None
    q: tuple[int, int]
    k: tuple[int, int]
    form: int | None = None
    first: bool = True
    last: bool = True


@dataclass
class Call:
    """One call as the schedule runs it: the rows flattened to ``(n_rows, L, width)``.

    ``x``, ``y``, ``v`` are the queries, keys and values (unscaled, compute dtype),
    ``mask`` the keys' ``(n_rows, Lk, 1)`` mask or None, ``kv0`` a state
    ``(n_rows, m, dv + 1)`` or None, ``form`` the feature map's form of the call (with a
    leading dimension of segments when ``packed`` groups have forms of their own);
    ``group`` query rows per key row (grouped-query attention, interleaved by position).
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
    group: int = 1
    packed: list[Group] | None = None
    #: ``(n_rows, L, 1)`` boolean, True where a document starts: packed sequences whose
    #: boundaries are traced (causal; each group runs as one work item)
    resets: Array | None = None
    #: bidirectional: the forward keeps each block's features for the backward (which
    #: then does not recompute them); the adapter decides, within its memory budget
    keep_features: bool = False

    #: the groups, made once (:meth:`groups`)
    _groups: list[Group] | None = field(default=None, repr=False, compare=False)

    def with_arrays(self, **arrays: Any) -> Call:
        """The call with other arrays (the same blocks, form and settings)."""
        return Call(**{**self.__dict__, "_groups": None, **arrays})

    def groups(self) -> list[Group]:
        if self.packed is not None:
            return self.packed
        if self._groups is None:
            lq, lk = self.x.shape[-2] // self.group, self.y.shape[-2]
            rows = [None] if self.steps.vectorized else list(range(self.x.shape[0]))
            self._groups = [Group(r, (0, lq), (0, lk)) for r in rows]
        return self._groups

    def form_of(self, g: Group) -> Form:
        if g.form is not None:
            return self.form.select(g.form)
        return self.form if g.row is None else self.form.select(g.row)

    @staticmethod
    def rows(a: Array, g: Group, lo: int, hi: int) -> Array:
        return a[:, lo:hi, :] if g.row is None else a[g.row, lo:hi, :]

    def query_rows(self, a: Array, g: Group, lo: int, hi: int) -> Array:
        """The query rows (of ``x``, the output, its cotangent) of positions ``lo:hi``."""
        return self.rows(a, g, lo * self.group, hi * self.group)

    def state(self, a: Array | None, g: Group) -> Array | None:
        """The group's part of a ``(n_rows, m, dv + 1)`` state if it is the row's first."""
        if a is None or not g.first:
            return None
        return a if g.row is None else a[g.row, ...]

    def zeros(self, g: Group) -> Array:
        lead = (self.x.shape[0],) if g.row is None else ()
        shape = (*lead, self.m, self.v.shape[-1] + 1)
        return self.xp.zeros(shape, dtype=self.x.dtype, device=device(self.x))

    def keep(self, g: Group, lo: int, hi: int) -> Array | None:
        return None if self.mask is None else self.rows(self.mask, g, lo, hi)

    def keys(self, g: Group, form: Form, lo: int, hi: int) -> tuple[Array, Array]:
        y, v = self.rows(self.y, g, lo, hi), self.rows(self.v, g, lo, hi)
        return self.steps.keys(self.xp, form, y, v, self.keep(g, lo, hi))

    def blocks(self, a: Array, lo: int, hi: int) -> list[tuple[int, int]]:
        return self.steps.blocks(a, lo, hi, self.chunk if self.causal else None)

    def key_sums(self, item: tuple[Group, int, int], kept: Kept | None = None) -> Array | None:
        """The sums of a work item's keys (None: it has none); with ``kept``, each block's
        features are kept there (a copy: they may be in a buffer)."""
        g, lo, hi = item
        form, total = self.form_of(g), None
        for s, e in self.blocks(self.y, lo, hi):
            kf, vb = self.keys(g, form, s, e)
            if kept is not None:
                kept["k", s, e] = self.xp.asarray(kf, copy=True)
            part = self.steps.key_sums(self.xp, kf, vb)
            total = part if total is None else total + part
        return total

    def items(self, g: Group, span: tuple[int, int]) -> list[tuple[int, int]]:
        """The work items of one group's ``span`` of positions."""
        parts = 1 if self.resets is not None else -(-self.steps.workers // len(self.groups()))
        parts = max(1, parts)
        return _split(*span, parts, align=self.chunk if self.causal else 1)

    def join(self, per_group: list[list[Array]], width: int, dtype: Any) -> Array:
        """The groups' block results along the rows, the batch rows stacked:
        ``(n_rows, L, width)``."""
        xp, groups = self.xp, self.groups()
        if groups and groups[0].row is None:
            return _concat(xp, per_group[0], (self.x.shape[0], 0, width), dtype, self.x)
        by_row: dict[int, list[Array]] = {}
        for g, pieces in zip(groups, per_group, strict=True):
            assert g.row is not None
            by_row.setdefault(g.row, []).extend(pieces)
        return xp.stack([_concat(xp, by_row.get(r, []), (0, width), dtype, self.x)
                         for r in range(self.x.shape[0])])  # fmt: skip

    def per_row(self, per_group: list[Array], first: bool = False) -> Array:
        """One state per batch row: the last (or ``first``) group's of each row."""
        groups = self.groups()
        if groups and groups[0].row is None:
            return per_group[0]
        pick = {
            g.row: a
            for g, a in zip(groups, per_group, strict=True)
            if (g.first if first else g.last)
        }
        return self.xp.stack([pick[r] for r in range(self.x.shape[0])])


def _concat(
    xp: ModuleType, pieces: list[Array], empty: tuple[int, ...], dtype: Any, like: Array
) -> Array:
    if not pieces:
        return xp.zeros(empty, dtype=dtype, device=device(like))
    return pieces[0] if len(pieces) == 1 else xp.concat(pieces, axis=-2)


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
    packed: list[Group] | None = None,
    form_batch: tuple[int, ...] | None = None,
    resets: Array | None = None,
) -> Call:
    """The :class:`Call` of rows ``x``, ``y``, ``v`` broadcasting to ``batch`` (``mask``
    ``(..., Lk, 1)``, ``kv0`` ``batch + (m, dv + 1)``; ``group`` query rows per key row,
    interleaved by position; ``packed`` the groups of packed sequences, whose forms have
    the leading dimensions ``form_batch`` when each has its own; ``resets`` ``(n_rows, L,
    1)`` where documents start, when their boundaries are traced)."""
    from .steps import Steps

    n_rows = math.prod(batch)

    def flat(a: Array, length: int) -> Array:
        shape = (*batch, length, a.shape[-1])
        return xp.reshape(xp.broadcast_to(a, shape), (n_rows, length, a.shape[-1]))

    lq, lk = x.shape[-2], y.shape[-2]
    if n_rows == 0:  # the standard steps (eager ones take one batch row at a time)
        steps = Steps(block=steps.block_size(max(lq, lk), causal), chunk=steps.chunk)
    return Call(
        xp, steps, form.flatten(batch if form_batch is None else form_batch),
        flat(x, lq), flat(y, lk), flat(v, lk),
        None if mask is None else flat(mask, lk),
        None if kv0 is None else xp.reshape(kv0, (n_rows, *kv0.shape[-2:])),
        chunk, causal, m, batch, group, packed, resets,
    )  # fmt: skip


# -- forward -------------------------------------------------------------------------------

Pieces = list[tuple[Array, Array]]  # (result, small) of each block of a group, in order
#: what the backward pass needs of the forward, per group: causal, its pieces and the
#: states they started from; bidirectional, the sums it answered from and the blocks'
#: features when the call keeps them (else None)
States = list[Any]


def forward(call: Call) -> tuple[Array, Array, Array, States]:
    """``(out, kv, small, states)``, flattened: normalised attention in the compute dtype,
    the state after the call (each row's last group's), the rows whose normaliser was at
    most the smallest normal number (their output is 0), and (causal) each group's pieces
    with the state each started from, for :func:`backward`."""
    xp, lq, dv = call.xp, call.x.shape[-2], call.v.shape[-1]
    dest = call.steps.output(xp, (call.x.shape[0], lq, dv), call.x)
    if call.resets is not None and not call.causal:
        per_group, kv, states = _bidirectional_documents(call)
    else:
        per_group, kv, states = (_causal if call.causal else _bidirectional)(call, dest)
    small = call.join([[s for _, s in pieces] for pieces in per_group], 1, xp.bool)
    if dest is None:
        dest = call.join([[r for r, _ in pieces] for pieces in per_group], dv, call.x.dtype)
    return dest, kv, small, states


def _into(call: Call, dest: Array | None, g: Group, lo: int, hi: int) -> Array | None:
    return None if dest is None else call.query_rows(dest, g, lo, hi)


def _totals(
    call: Call, start: list[Array | None], partial: list[Array | None], counts: list[int]
) -> list[Array]:
    """Each group's starting state plus its partial sums (``counts`` of them per group)."""
    totals, i = [], 0
    for g, begin, n in zip(call.groups(), start, counts, strict=True):
        total = begin
        for part in partial[i : i + n]:
            if part is not None:
                total = part if total is None else total + part
        i += n
        totals.append(call.zeros(g) if total is None else total)
    return totals


def _bidirectional(call: Call, dest: Array | None) -> tuple[list[Pieces], Array, States]:
    steps, groups = call.steps, call.groups()
    kept: list[Kept | None] = [{} if call.keep_features else None for _ in groups]
    k_items = [[(g, lo, hi) for lo, hi in call.items(g, g.k)] for g in groups]
    partial = steps.map(
        lambda a: call.key_sums(*a),
        [(it, kept[i]) for i, its in enumerate(k_items) for it in its],
    )
    totals = _totals(
        call, [call.state(call.kv0, g) for g in groups], partial, [len(i) for i in k_items]
    )

    def answer(item: tuple[int, int, int]) -> Pieces:
        i, lo, hi = item
        g, mine = groups[i], kept[i]
        form, pieces = call.form_of(g), []
        for s, e in call.blocks(call.x, lo, hi):
            x, into = call.query_rows(call.x, g, s, e), _into(call, dest, g, s, e)
            found: list[Array] | None = None if mine is None else []
            pieces.append(steps.answer(call.xp, form, x, totals[i], into, found))
            if mine is not None and found:
                mine["q", s, e], mine["d", s, e] = found
        return pieces

    q_items = [[(i, lo, hi) for lo, hi in call.items(g, g.q)] for i, g in enumerate(groups)]
    answers = steps.map(answer, list(itertools.chain(*q_items)))
    per_group, i = [], 0
    for items in q_items:
        per_group.append(list(itertools.chain(*answers[i : i + len(items)])))
        i += len(items)
    return per_group, call.per_row(totals), list(zip(totals, kept, strict=True))


def _causal(call: Call, dest: Array | None) -> tuple[list[Pieces], Array, States]:
    steps, groups = call.steps, call.groups()
    items = [call.items(g, g.q) for g in groups]
    before = [(g, lo, hi) for g, its in zip(groups, items, strict=True) for lo, hi in its[:-1]]
    partial = steps.map(call.key_sums, before) if before else []
    starts: list[Array | None] = []  # each work item's starting state, in order
    i = 0
    for g, its in zip(groups, items, strict=True):
        run = call.state(call.kv0, g)
        for j in range(len(its)):
            starts.append(run)
            if j < len(its) - 1:
                part = partial[i]
                i += 1
                run = part if run is None else (run if part is None else run + part)

    def segment(
        item: tuple[Group, int, int, Array | None],
    ) -> tuple[Pieces, list[Any], Array | None]:
        g, lo, hi, state = item
        form, pieces, started = call.form_of(g), [], []
        for s, e in call.blocks(call.y, lo, hi):
            kf, vb = call.keys(g, form, s, e)
            for a, b, c in _pieces(s, e, call.chunk):
                started.append(((a, b, c), state))
                resets = None if call.resets is None else call.rows(call.resets, g, a, b)
                result, small, state = steps.causal(
                    call.xp, form, call.query_rows(call.x, g, a, b), kf[..., a - s : b - s, :],
                    vb[..., a - s : b - s, :], state, c, _into(call, dest, g, a, b), resets,
                )  # fmt: skip
                pieces.append((result, small))
        return pieces, started, state

    flat_items = [(g, lo, hi) for g, its in zip(groups, items, strict=True) for lo, hi in its]
    results = steps.map(segment, [(*it, st) for it, st in zip(flat_items, starts, strict=True)])
    per_group, states, totals, i = [], [], [], 0
    for g, its in zip(groups, items, strict=True):
        mine = results[i : i + len(its)]
        i += len(its)
        per_group.append(list(itertools.chain(*(p for p, _, _ in mine))))
        states.append(list(itertools.chain(*(st for _, st, _ in mine))))
        totals.append(call.zeros(g) if mine[-1][2] is None else mine[-1][2])
    return per_group, call.per_row(totals), states


def _bidirectional_documents(call: Call) -> tuple[list[Pieces], Array, States]:
    """Bidirectional attention within documents whose boundaries are traced: a row's
    numerator and normaliser are the chunked scan of its document up to it (restarting
    where a document starts) plus the same scan run from the end of the sequence over the
    keys after it (restarting where a document ends), normalised once."""
    from .steps import causal_sums, normalise, with_ones

    xp, chunk, group, resets = call.xp, call.chunk, call.group, call.resets
    assert resets is not None
    # where the reversed sequence's documents start: the original's ends
    ends = xp.concat([resets[:, 1:, :], xp.zeros_like(resets[:, :1, :])], axis=1)
    per_group = []
    for g in call.groups():
        form = call.form_of(g)
        pieces = [p for s, e in call.blocks(call.y, 0, call.y.shape[-2])
                  for p in _pieces(s, e, chunk)]  # fmt: skip
        sums: list[list[Array]] = [[] for _ in pieces]
        features: list[tuple[Array, Array, Array]] = []  # each piece's, for the second scan
        bound = None  # the largest sums met: the gradient's guard of each row (normalise)
        for reverse in (False, True):
            state, marks = None, ends if reverse else resets
            for i in reversed(range(len(pieces))) if reverse else range(len(pieces)):
                a, b, c = pieces[i]
                if not reverse:
                    qf = form.queries(xp, call.query_rows(call.x, g, a, b))
                    features.append((qf, *call.keys(g, form, a, b)))

                def rows(t: Array, per: int = 1, reverse: bool = reverse) -> Array:
                    return _reversed(xp, t, per) if reverse else t

                qf, kf, vb = features[i]
                o, state = causal_sums(xp, rows(qf, group), rows(kf), with_ones(xp, rows(vb)),
                                       state, c, rows(call.rows(marks, g, a, b)),
                                       strict=reverse)  # fmt: skip
                sums[i].append(rows(o, group))
                bound = xp.abs(state) if bound is None else xp.maximum(bound, xp.abs(state))
        assert bound is not None or not pieces
        per_group.append([normalise(xp, f + r, bound) for f, r in sums])
    return per_group, call.per_row([call.zeros(g) for g in call.groups()]), []


def _reversed(xp: ModuleType, a: Array, group: int) -> Array:
    """Rows ``(..., L G, w)`` (``G`` per position, interleaved) with the positions reversed."""
    shape = a.shape
    a = xp.reshape(a, (*shape[:-2], shape[-2] // group, group, shape[-1]))
    return xp.reshape(xp.flip(a, axis=-3), shape)


# -- backward ------------------------------------------------------------------------------


def backward(
    call: Call, out: Array, kv: Array, states: States, g: Array, dkv: Array | None
) -> tuple[Array, Array, Array, Array | None]:
    """The vector-Jacobian product of :func:`forward` (flattened): ``(dx, dy, dv, dkv0)``
    from the cotangents ``g`` of ``out`` and ``dkv`` of the returned state (None: 0), with
    ``out``, ``kv`` and ``states`` as :func:`forward` returned them. ``dkv0`` is None when
    the call had no state. Statistics and the projection are constants."""
    grads = (_causal_grad if call.causal else _bidirectional_grad)(call, out, kv, states, g, dkv)
    dx, dy, dv, dkv0 = grads
    return dx, dy, dv, (dkv0 if call.kv0 is not None else None)


def _row_state(call: Call, a: Array | None, g: Group) -> Array | None:
    """The row's part of the returned state's cotangent, for the row's last group."""
    if a is None or not g.last:
        return None
    return a if g.row is None else a[g.row, ...]


def _bidirectional_grad(
    call: Call, out: Array, kv: Array, states: States, g: Array, dkv: Array | None
) -> tuple[Array, Array, Array, Array]:
    steps, groups, xp = call.steps, call.groups(), call.xp
    sums_of, kept = [t for t, _ in states], [k or {} for _, k in states]
    dest_x, dest_y, dest_v = _destinations(call)

    def queries(item: tuple[int, int, int]) -> tuple[list[Array], Array | None]:
        i, lo, hi = item
        grp = groups[i]
        form, total = call.form_of(grp), None
        grads: list[Array] = []
        for s, e in call.blocks(call.x, lo, hi):
            x, o, gg = (call.query_rows(a, grp, s, e) for a in (call.x, out, g))
            qf, den = kept[i].get(("q", s, e)), kept[i].get(("d", s, e))
            dx, part = steps.answer_grad(xp, form, x, sums_of[i], o, gg, qf, den)
            _keep(grads, dest_x, call.query_rows, grp, s, e, dx)
            total = part if total is None else total + part
        return grads, total

    q_items = [[(i, lo, hi) for lo, hi in call.items(grp, grp.q)] for i, grp in enumerate(groups)]
    first = steps.map(queries, list(itertools.chain(*q_items)))
    counts = [len(i) for i in q_items]
    sums = _totals(
        call, [_row_state(call, dkv, grp) for grp in groups], [p for _, p in first], counts
    )

    def keys(item: tuple[int, int, int]) -> list[tuple[Array, Array]]:
        i, lo, hi = item
        grp = groups[i]
        form, grads = call.form_of(grp), []
        for s, e in call.blocks(call.y, lo, hi):
            y, v = call.rows(call.y, grp, s, e), call.rows(call.v, grp, s, e)
            kf = kept[i].get(("k", s, e))
            dy, dv = steps.keys_grad(xp, form, y, v, call.keep(grp, s, e), sums[i], kf)
            if dest_y is None:
                grads.append((dy, dv))
            else:
                _keep([], dest_y, call.rows, grp, s, e, dy)
                _keep([], dest_v, call.rows, grp, s, e, dv)
        return grads

    k_items2 = [[(i, lo, hi) for lo, hi in call.items(grp, grp.k)] for i, grp in enumerate(groups)]
    second = steps.map(keys, list(itertools.chain(*k_items2)))
    dxs, dkeys, i, j = [], [], 0, 0
    for qi, ki in zip(q_items, k_items2, strict=True):
        dxs.append(list(itertools.chain(*(d for d, _ in first[i : i + len(qi)]))))
        dkeys.append(list(itertools.chain(*second[j : j + len(ki)])))
        i, j = i + len(qi), j + len(ki)
    dt, d, dv = call.x.dtype, call.x.shape[-1], call.v.shape[-1]
    return (
        call.join(dxs, d, dt) if dest_x is None else dest_x,
        call.join([[a for a, _ in p] for p in dkeys], d, dt) if dest_y is None else dest_y,
        call.join([[b for _, b in p] for p in dkeys], dv, dt) if dest_v is None else dest_v,
        call.per_row(sums, first=True),  # the given state entered the row's first group
    )


def _causal_grad(
    call: Call, out: Array, kv: Array, states: States, g: Array, dkv: Array | None
) -> tuple[Array, Array, Array, Array]:
    steps, groups, xp = call.steps, call.groups(), call.xp
    dest_x, dest_y, dest_v = _destinations(call)

    def one_group(i: int) -> tuple[list[Array], list[Array], list[Array], Array | None]:
        grp = groups[i]
        form, carried = call.form_of(grp), _row_state(call, dkv, grp)
        dxs: list[Array] = []
        dys: list[Array] = []
        dvs: list[Array] = []
        for (a, b, c), state in reversed(states[i]):
            x, out_p, g_p = (call.query_rows(t, grp, a, b) for t in (call.x, out, g))
            y, v = call.rows(call.y, grp, a, b), call.rows(call.v, grp, a, b)
            dx, dy, dv, carried = steps.causal_grad(
                xp, form, x, y, v, call.keep(grp, a, b), state, out_p, g_p, carried, c
            )
            _keep(dxs, dest_x, call.query_rows, grp, a, b, dx)
            _keep(dys, dest_y, call.rows, grp, a, b, dy)
            _keep(dvs, dest_v, call.rows, grp, a, b, dv)
        return dxs[::-1], dys[::-1], dvs[::-1], carried

    results = steps.map(one_group, list(range(len(groups))))
    dt, d, dv = call.x.dtype, call.x.shape[-1], call.v.shape[-1]
    starts = [
        call.zeros(grp) if r[3] is None else r[3] for grp, r in zip(groups, results, strict=True)
    ]
    return (
        call.join([r[0] for r in results], d, dt) if dest_x is None else dest_x,
        call.join([r[1] for r in results], d, dt) if dest_y is None else dest_y,
        call.join([r[2] for r in results], dv, dt) if dest_v is None else dest_v,
        call.per_row(starts, first=True),  # the given state entered the row's first group
    )


def _destinations(call: Call) -> tuple[Array | None, Array | None, Array | None]:
    """Arrays for ``dx``, ``dy``, ``dv`` that the backward fills block by block (packed: zero
    where no group writes, keys no query attends to), when the steps give an :meth:`output`;
    else None, and the blocks' gradients are joined (then they are all held at once)."""
    n, xp = call.x.shape[0], call.xp
    shapes = ((call.x.shape[-2], call.x.shape[-1]), (call.y.shape[-2], call.y.shape[-1]),
              (call.y.shape[-2], call.v.shape[-1]))  # fmt: skip
    dests = [call.steps.output(xp, (n, *shape), call.x) for shape in shapes]
    if call.packed is not None:  # (else every row is some block's)
        for dest in dests:
            if dest is not None:
                dest[...] = 0.0
    return dests[0], dests[1], dests[2]


def _keep(
    pieces: list[Array], dest: Array | None, rows: Any, g: Group, lo: int, hi: int, grad: Array
) -> None:
    """Write a block's gradient into its rows of ``dest``, or keep it to be joined."""
    if dest is None:
        pieces.append(grad)
    else:
        rows(dest, g, lo, hi)[...] = grad
