r"""The tiled engine: FAVOR+ and FAVOR++ attention block by block.

The plain core computes ``phi(Q)`` and ``phi(K)`` for the whole sequence and then two
products. This engine computes them for blocks of ``block`` rows at a time, so that the
``L x m`` features are never held at once and every pass over them stays in cache:

* the whole exponent of a block comes out of one matmul, its scales and shifts folded in
  as extra input columns: ``[y, -s^2/2 |y|^2, 1] @ [s W^T; 1; -c - log sqrt(m)]`` for keys,
  ``[x, 1] @ [s W^T; c]`` for queries (``s = sqrt(scale)``, ``c`` the data-independent key
  offset of :class:`~favorcore.PositiveFeatures`; FAVOR++ scales ``W`` by
  ``sqrt(1 - 4A)`` and adds ``A |w|^2`` to both constant rows); then one ``exp`` (queries
  first take their row max out, exactly as the feature map does);
* keys' sums ``phi(K_b)^T [V_b | 1]`` accumulate in an :class:`~favorcore.AttentionState`,
  queries are answered from it; causal blocks run :meth:`TiledOps.causal` (chunked prefix
  sums, :func:`favorcore._linear.causal_sums`) with the state carried from block to block;
* work items are (a group of batch rows, a segment of the sequence): one row per item for
  eager adapters, every row at once when :attr:`TiledOps.vectorized` (JAX: one traced
  copy of the block computation per block); bidirectional segments add their sums, causal
  segments first sum their keys, prefix-sum them, then run with their prefix.

It uses only the standard. A backend's adapter makes it fast through a :class:`TiledOps`
registered as the step ``"tiled"``: matmuls into reused buffers (:meth:`TiledOps.buffer`),
``exp`` and the causal products in place, constants of the query matrix prepared once,
work items on several cores.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from ._compat import Array, device, stop_gradient
from ._linear import causal_sums, normalise
from .balance import Balance
from .features import _key_bound

__all__ = ["TiledOps", "tiled_attention"]


class TiledOps:
    """How the engine computes one block; the defaults use only the standard.

    A backend's adapter subclasses it (buffers, in-place operations, threads) and
    registers an instance as the step ``"tiled"`` of its namespace.

    Attributes
    ----------
    workers : int
        Work items run concurrently by :meth:`map` (1: in order).
    block : int
        Rows per block.
    chunk : int
        Chunk length of causal attention when the caller gives none.
    vectorized : bool
        Blocks hold every batch row at once (``(n_rows, rows, d)``; the default steps
        accept both) instead of one row at a time (``(rows, d)``, what the eager adapters'
        steps expect).
    """

    workers: int = 1
    block: int = 512
    chunk: int = 128
    vectorized: bool = False

    def buffer(self, xp: ModuleType, role: str, rows: int, cols: int, like: Array) -> Array:
        """This thread's ``(rows, cols)`` array for ``role`` in ``like``'s dtype and device,
        contents undefined (for adapters' steps: reused from call to call, grown as needed,
        so large blocks cost no fresh allocation and page faults every time)."""
        local = self.__dict__.get("_buffers")
        if local is None:
            local = self.__dict__.setdefault("_buffers", threading.local())
        cache = local.__dict__
        buf: Array | None = cache.get(role)
        if (buf is None or buf.shape[1] != cols or buf.shape[0] < rows
                or buf.dtype != like.dtype or buf.device != like.device):  # fmt: skip
            shape = (max(rows, self.block), cols)
            buf = cache[role] = xp.empty(shape, dtype=like.dtype, device=like.device)
        return buf[:rows, ...]

    def block_size(self, length: int, causal: bool) -> int:
        """Rows per block for a sequence of ``length`` rows (:attr:`block`)."""
        return self.block

    def fits(self, *inputs: Array) -> bool:
        """Whether these steps can run a call on ``inputs`` (every array the result
        depends on); when not, the engine runs the standard steps with the same block
        size (e.g. PyTorch while autograd records: in-place steps on reused buffers would
        overwrite tensors it saved for the backward pass)."""
        return True

    def context(self) -> contextlib.AbstractContextManager[Any]:
        """Entered around a whole call: its statistics, coefficients and the engine."""
        return contextlib.nullcontext()

    def key_block(
        self, xp: ModuleType, y: Array, v: Array, keep: Array | None, wk: Any, c: float
    ) -> tuple[Array, Array]:
        """``(phi(K_b), V_b)`` of a block, masked rows zero in both.

        ``phi = exp([y, -c |y|^2, 1] @ wk)`` (``wk`` as :meth:`prepare_keys` returned it);
        ``keep`` is ``(rows, 1)`` boolean or None.
        The arrays may live in buffers that the next call of this thread reuses, or be
        ``v`` itself.
        """
        if keep is not None:
            y, v = xp.where(keep, y, 0.0), xp.where(keep, v, 0.0)
        col = xp.ones((*y.shape[:-1], 1), dtype=y.dtype, device=device(y))
        sq = xp.sum(y * y, axis=-1, keepdims=True) * (-c)
        kf = xp.exp(xp.concat([y, sq, col], axis=-1) @ wk)
        if keep is not None:
            kf = xp.where(keep, kf, 0.0)
        return kf, v

    def causal(
        self, xp: ModuleType, qf: Array, kf: Array, vb: Array, kv0: Array | None, chunk: int
    ) -> tuple[Array, Array]:
        """Unnormalised causal attention ``[phi(Q) ... | D]`` of a block and the state after
        it, ``(o, kv)`` (:func:`favorcore._linear.causal_sums` of ``[V_b | 1]``; ``o`` may
        be a buffer, ``kv`` is new)."""
        return causal_sums(xp, qf, kf, _with_ones(xp, vb), kv0, chunk)

    def transform(self, xp: ModuleType, y: Array, t: Array) -> Array:
        """Rows ``[y, 1] @ t`` for ``t`` ``(d + 1, d')``: the balanced keys (may be a buffer)."""
        return y @ t[..., :-1, :] + t[..., -1:, :]

    def prepare_keys(self, xp: ModuleType, wk: Array) -> Any:
        """What :meth:`key_block` takes for the keys' exponent matrix ``wk``: run once per
        matrix, not per block (adapters precompute constants of ``wk`` here)."""
        return wk

    def prepare(self, xp: ModuleType, wq: Array) -> Any:
        """What :meth:`query_block` takes for the queries' exponent matrix ``wq``: run once
        per matrix, not per block (adapters precompute constants of ``wq`` here)."""
        return wq

    def query_block(self, xp: ModuleType, x: Array, wq: Any) -> Array:
        """``phi(Q_b) = exp(e - max_row(e))`` with ``e = [x, 1] @ wq`` (may be a buffer);
        ``wq`` as :meth:`prepare` returned it."""
        col = xp.ones((*x.shape[:-1], 1), dtype=x.dtype, device=device(x))
        e = xp.concat([x, col], axis=-1) @ wq
        if x.shape[-2]:
            e = e - stop_gradient(xp, xp.max(e, axis=-1, keepdims=True))
        return xp.exp(e)

    def key_sums(self, xp: ModuleType, kf: Array, vb: Array) -> Array:
        """``phi(K_b)^T [V_b | 1]`` (a new array): one product, the normaliser's sums from
        the column of ones (under XLA a separate sum was 15 % slower at L = 16384). The NumPy
        and PyTorch adapters instead take ``phi(K_b)^T V_b`` and the column sums apart:
        their BLAS runs ``dv + 1 = 65`` columns up to 20 % slower than 64."""
        return xp.matrix_transpose(kf) @ _with_ones(xp, vb)

    def answer(
        self, xp: ModuleType, qf: Array, kv: Array, out: Array | None
    ) -> tuple[Array, Array]:
        """Normalised attention of a block of queries from the key sums ``kv``:
        ``(result, small)`` as :meth:`finish` (``result`` may be ``out``)."""
        return self.finish(xp, qf @ kv, kv, out)

    def attend(
        self, xp: ModuleType, x: Array, wq: Any, kv: Array, out: Array | None
    ) -> tuple[Array, Array]:
        """A block of queries ``x`` (``wq`` as :meth:`prepare` returned it) answered from
        the key sums ``kv``: :meth:`answer` of :meth:`query_block`."""
        return self.answer(xp, self.query_block(xp, x, wq), kv, out)

    def attend_causal(
        self, xp: ModuleType, x: Array, wq: Any, kf: Array, vb: Array, kv0: Array | None,
        chunk: int, out: Array | None,
    ) -> tuple[tuple[Array, Array], Array]:  # fmt: skip
        """A causal block: ``((result, small), state after it)``, :meth:`causal` of
        :meth:`query_block`, then :meth:`finish`."""
        o, kv = self.causal(xp, self.query_block(xp, x, wq), kf, vb, kv0, chunk)
        return self.finish(xp, o, kv, out), kv

    def finish(self, xp: ModuleType, o: Array, kv: Array, out: Array | None) -> tuple[Array, Array]:
        """``(normalised o, small)``: ``small`` ``(..., rows, 1)`` marks rows whose
        normaliser (``o``'s last column) was <= the smallest normal number (their result
        is 0)."""
        dv = kv.shape[-1] - 1
        small = o[..., dv:] <= float(xp.finfo(o.dtype).smallest_normal)
        return self.normalise(xp, o, dv, out, kv), small

    def normalise(
        self, xp: ModuleType, o: Array, dv: int, out: Array | None, kv: Array | None = None
    ) -> Array:
        """``o[:, :dv] / o[:, dv:]`` (0 where that is <= 0), into ``out`` if :meth:`output` gave one."""
        return normalise(xp, o, dv, kv)

    def output(self, xp: ModuleType, shape: tuple[int, ...], *inputs: Array) -> Array | None:
        """A writable output array (``inputs[0]``'s dtype and device) that :meth:`normalise`
        fills, or None (blocks are joined); ``inputs`` are every array the result depends on."""
        return None

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """``[fn(i) for i in items]``, possibly concurrently."""
        return [fn(i) for i in items]


def _with_ones(xp: ModuleType, v: Array) -> Array:
    """``[v | 1]``."""
    return xp.concat([v, xp.ones((*v.shape[:-1], 1), dtype=v.dtype, device=device(v))], axis=-1)


def _segments(length: int, parts: int) -> list[tuple[int, int]]:
    parts = max(1, min(parts, length))
    bounds = [round(i * length / parts) for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


def _exponent_matrices(
    xp: ModuleType,
    w: Array,
    root: float,
    a: float | Array,
    batch: tuple[int, ...],
    n_rows: int,
    query: Array | None = None,
) -> tuple[Array, Array]:
    """The keys' and queries' exponent matrices ``(R, d + 2, m)``, ``(R, d + 1, m)``.

    ``R`` is 1 for a float ``a`` (and no ``query``), else one per batch row. With
    ``b = sqrt(1 - 4A)`` and the map's terms (:func:`favorcore.features._positive_pair`):
    keys ``[y, -root^2 |y|^2 / 2, 1] @ [b root W^T; 1; A |w|^2 - c - log sqrt(m)]``,
    queries ``[x, 1] @ [Q b root W^T; A |w|^2 + c]`` with ``Q`` the balance's query matrix
    per batch row ``(n_rows, d, d)`` (identity when None).
    """
    dtype, dev, m = w.dtype, device(w), w.shape[0]
    sq = xp.reshape(xp.sum(w * w, axis=-1), (1, 1, m))
    if isinstance(a, float | int):
        coef = xp.full((1, 1, 1), float(a), dtype=dtype, device=dev)
    else:
        coef = xp.reshape(xp.broadcast_to(a, (*batch, 1, 1)), (n_rows, 1, 1))
        coef = stop_gradient(xp, xp.astype(coef, dtype, copy=False))
    b = xp.sqrt(1 - 4 * coef)
    bias = coef * sq
    top = bias + (1 - 4 * coef) * sq / 2
    bound = _key_bound(xp, dtype)
    offset = xp.where(top > bound, top - bound, 0.0)
    w_t = xp.matrix_transpose(w)[None, ...] * (b * root)
    ones = xp.ones((w_t.shape[0], 1, m), dtype=dtype, device=dev)
    wk = xp.concat([w_t, ones, bias - offset - 0.5 * math.log(m)], axis=1)
    if query is not None:
        w_t = query @ w_t
    wq = xp.concat([w_t, xp.broadcast_to(bias + offset, (w_t.shape[0], 1, m))], axis=1)
    return wk, wq


def tiled_attention(
    xp: ModuleType,
    ops: TiledOps,
    x: Array,
    y: Array,
    v: Array,
    *,
    w: Array,
    root: float,
    a: float | Array,
    causal: bool,
    mask: Array | None,
    chunk: int,
    kv0: Array | None,
    batch: tuple[int, ...],
    balance: Balance | None = None,
) -> tuple[Array, Array, Array]:
    """Normalised FAVOR+ attention ``(out, kv, small)`` in the compute dtype of ``x``.

    ``small`` is ``(..., Lq, 1)``: rows whose normaliser was <= the smallest normal number
    (their output is 0).

    ``x``, ``y``, ``v`` are unscaled, in the compute dtype; ``mask`` is ``(..., Lk, 1)``
    boolean or None; ``w`` is the map's matrix (``[W; -W]`` if antithetic); ``a`` the
    exponent's ``A`` (0: FAVOR+; FAVOR++: a float or an array ``batch + (1, 1)``).
    ``balance`` is applied on the way: its query matrix folded into the queries' exponent
    matrix, its key transform run on each block of keys (:meth:`TiledOps.transform`), so
    that the balanced rows are never stored.
    """
    dtype, dev = x.dtype, device(x)
    n_rows = math.prod(batch)
    lq, lk, d, dv = x.shape[-2], y.shape[-2], x.shape[-1], v.shape[-1]
    m = w.shape[0]

    def flat(a: Array, length: int, width: int) -> Array:
        return xp.reshape(xp.broadcast_to(a, (*batch, length, width)), (n_rows, length, width))

    x3, y3, v3 = flat(x, lq, d), flat(y, lk, d), flat(v, lk, dv)
    m3 = None if mask is None else flat(mask, lk, 1)
    kv3 = None if kv0 is None else xp.reshape(kv0, (n_rows, m, dv + 1))

    tk = None  # keys' transform [root M^-1; -c] per batch row
    if balance is None:
        wk, wq = _exponent_matrices(xp, w, root, a, batch, n_rows)
        half_root_sq = 0.5 * root * root
    else:  # keys enter already balanced and scaled; M (and root) fold into the queries'

        def rows_of(t: Array, shape: tuple[int, int]) -> Array:
            t = xp.astype(t, dtype, copy=False)
            return xp.reshape(xp.broadcast_to(t, (*batch, *shape)), (n_rows, *shape))

        wk, _ = _exponent_matrices(xp, w, 1.0, a, batch, n_rows)
        _, wq = _exponent_matrices(
            xp, w, 1.0, a, batch, n_rows, rows_of(balance.query, (d, d)) * root
        )
        tk = xp.concat(
            [rows_of(balance.key, (d, d)) * root, -rows_of(balance.shift, (1, d))], axis=1
        )
        half_root_sq = 0.5

    extra = [a for a in (tk, kv3) if a is not None]
    if not ops.fits(x3, y3, v3, wk, wq, *extra):
        plain = TiledOps()
        plain.block = ops.block_size(max(lq, lk), causal)
        plain.vectorized = ops.vectorized
        ops = plain

    # a group of batch rows is one row ``n`` (eager adapters: 2-D blocks, buffers) or
    # every row at once (``ops.vectorized``: 3-D blocks, e.g. under jax.jit, so that the
    # traced program has one copy of the block computation per block, not per row)
    groups: list[Any] = [slice(None)] if ops.vectorized else list(range(n_rows))
    lead: tuple[int, ...] = (n_rows,) if ops.vectorized else ()

    def pick(a: Array, g: Any) -> Array:
        """``a`` (``(R, ...)``, R = 1 or n_rows) for group ``g``."""
        return a if not isinstance(g, int) else a[g % a.shape[0], ...]

    def keys(g: Any, lo: int, hi: int) -> tuple[Array, Array]:
        keep = None if m3 is None else m3[g, lo:hi, :]
        y = y3[g, lo:hi, :] if tk is None else ops.transform(xp, y3[g, lo:hi, :], pick(tk, g))
        return ops.key_block(xp, y, v3[g, lo:hi, :], keep, chosen(prepared_keys, g), half_root_sq)

    def prepare_all(fn: Callable[[ModuleType, Array], Any], w: Array) -> list[Any]:
        return [fn(xp, w)] if ops.vectorized else [fn(xp, w[r, ...]) for r in range(w.shape[0])]

    prepared_keys, prepared = prepare_all(ops.prepare_keys, wk), prepare_all(ops.prepare, wq)

    def chosen(p: list[Any], g: Any) -> Any:
        """The prepared matrix of group ``g`` (one per batch row, or one for all)."""
        return p[g % len(p) if isinstance(g, int) else 0]

    size = ops.block_size(max(lq, lk), causal)

    def blocks(lo: int, hi: int) -> list[tuple[int, int]]:
        return [(s, min(s + size, hi)) for s in range(lo, hi, size)]

    def zeros() -> Array:
        return xp.zeros((*lead, m, dv + 1), dtype=dtype, device=dev)

    def key_sums(item: tuple[Any, int, int]) -> Array:
        g, lo, hi = item
        kv = zeros()
        for s, e in blocks(lo, hi):
            kf, vb = keys(g, s, e)
            kv = kv + ops.key_sums(xp, kf, vb)
        return kv

    parts = max(1, -(-ops.workers // len(groups)))
    dest = ops.output(xp, (n_rows, lq, dv), x3, y3, v3, wk, wq, *extra)

    def into(g: Any, s: int, e: int) -> Array | None:
        return None if dest is None else dest[g, s:e, :]

    if not causal:
        k_segs = _segments(lk, parts)
        partial = ops.map(key_sums, [(g, lo, hi) for g in groups for lo, hi in k_segs])
        totals = []
        for i, g in enumerate(groups):
            total = zeros() if kv3 is None else kv3[g, ...]
            for kv in partial[i * len(k_segs) : (i + 1) * len(k_segs)]:
                total = total + kv
            totals.append(total)

        def answer(item: tuple[int, Any, int, int]) -> list[tuple[Array, Array]]:
            i, g, lo, hi = item
            return [
                ops.attend(xp, x3[g, s:e, :], chosen(prepared, g), totals[i], into(g, s, e))
                for s, e in blocks(lo, hi)
            ]

        answers = ops.map(
            answer,
            [(i, g, lo, hi) for i, g in enumerate(groups) for lo, hi in _segments(lq, parts)],
        )
    else:
        segs = _segments(lq, parts)
        starts: list[list[Array | None]] = []
        if len(segs) > 1:
            partial = ops.map(key_sums, [(g, lo, hi) for g in groups for lo, hi in segs[:-1]])
        for i, g in enumerate(groups):
            run: Array | None = None if kv3 is None else kv3[g, ...]
            seg_starts = [run]
            for j in range(len(segs) - 1):
                kv = partial[i * (len(segs) - 1) + j]
                run = kv if run is None else run + kv
                seg_starts.append(run)
            starts.append(seg_starts)

        def run_causal(
            item: tuple[int, Any, int, int, int],
        ) -> tuple[list[tuple[Array, Array]], Array | None]:
            i, g, j, lo, hi = item
            state, outs = starts[i][j], []
            for s, e in blocks(lo, hi):
                kf, vb = keys(g, s, e)
                done, state = ops.attend_causal(
                    xp, x3[g, s:e, :], chosen(prepared, g), kf, vb, state, chunk, into(g, s, e)
                )
                outs.append(done)
            return outs, state

        results = ops.map(
            run_causal,
            [(i, g, j, lo, hi) for i, g in enumerate(groups) for j, (lo, hi) in enumerate(segs)],
        )
        answers = [outs for outs, _ in results]
        totals = []
        for i in range(len(groups)):
            last = results[i * len(segs) + len(segs) - 1][1]
            totals.append(zeros() if last is None else last)
    kv = xp.reshape(xp.stack(totals), (*batch, m, dv + 1))
    per_group = len(answers) // len(groups)

    def join(part: int, width: int, kind: Any) -> Array:
        rows = []
        for i in range(len(groups)):
            pieces = [
                b[part] for item in answers[i * per_group : (i + 1) * per_group] for b in item
            ]
            rows.append(pieces[0] if len(pieces) == 1 else xp.concat(pieces, axis=-2) if pieces else
                        xp.zeros((*lead, 0, width), dtype=kind, device=dev))  # fmt: skip
        return xp.reshape(xp.stack(rows), (*batch, lq, width))

    small = join(1, 1, xp.bool)
    out = xp.reshape(dest, (*batch, lq, dv)) if dest is not None else join(0, dv, dtype)
    return out, kv, small
