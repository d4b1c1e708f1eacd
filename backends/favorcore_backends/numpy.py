"""NumPy adapter: the fast path of the tiled engine, and a scikit-learn transformer.

Importing this module (the core does it when it first meets NumPy arrays) registers
:class:`NumpyOps` as the ``"tiled"`` step of NumPy: ``favorcore.favor_attention`` on NumPy
arrays with :class:`~favorcore.PositiveFeatures` then runs :mod:`favorcore._tiled` with

* each block's exponent from one matmul into a per-thread buffer (``out=``), ``exp`` and
  the row-max shift in place: no allocation and one pass per step;
* work items (batch rows, segments of the sequence) on every core, each with a
  single-threaded BLAS (``threadpoolctl``), so that the exponentials, which NumPy runs on
  one core, use them all.

:class:`FavorFeatures` (scikit-learn, imported on first use) maps samples to random
features of the softmax or Gaussian kernel.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from favorcore import register_step
from favorcore._tiled import TiledOps

from ._fenv import flush_to_zero

__all__ = ["FavorFeatures", "NumpyOps"]  # noqa: F822 (FavorFeatures: module __getattr__)

#: rows per block, measured at L = 16384, 8 heads, 2 workers (medians of 18 calls,
#: bidirectional / causal ms): 512 -> 158 / 258, 1024 -> 149 / 209, 2048 -> 151 / 195,
#: 4096 -> 148 / 204
BLOCK = 2048
#: causal chunk length, measured at L = 16384 (causal / bidirectional time):
#: 32 -> 1.24x, 64 -> 1.30x, 128 -> 1.46x, 256 -> 1.64x; 64 keeps the chunks' matmuls larger
CHUNK = 64
#: query rows whose exponents may fall more than GAP below the bound take the exact row max
GAP = 40.0
#: rows above the norm limit looked at (the largest norms) before the bound is trusted
PROBE = 8


@functools.lru_cache(maxsize=4)
def _floor(dtype: Any) -> float:
    """The smallest exponent whose ``exp`` is a normal number of ``dtype`` (float32: -87.3)."""
    dt = np.dtype(dtype)
    tiny = np.finfo(dt).smallest_normal
    x = dt.type(np.log(tiny))
    while np.exp(x) < tiny:
        x = np.nextafter(x, dt.type(0))
    return float(x)


def _exp(e: Any, lower: float) -> Any:
    """``exp(e)`` in place, with the features below the smallest normal number set to 0.

    x86 computes denormal numbers 10-100x slower: an ``exp`` that returns them and every
    product they enter (keys of four times unit variance made a call 4x slower). ``lower``
    bounds ``e`` from below (from the rows' norms): only when it is under :func:`_floor`
    is ``e`` read for its min, and only if that is too are the exponents clamped to the
    floor and the features from under it zeroed, as a flush-to-zero mode would (NaN stays).
    """
    floor = _floor(e.dtype)
    if lower >= floor or e.size == 0 or e.min() >= floor:
        return np.exp(e, out=e)
    keep = e >= floor
    np.maximum(e, floor, out=e)
    np.exp(e, out=e)
    return np.multiply(e, keep, out=e)


def _radius(w: Any) -> float:
    """The largest column norm of ``w``."""
    return float(np.sqrt(np.einsum("ij,ij->j", w, w).max())) if w.size else 0.0


def _weak(qf: Any, den: Any, checked: Any, kv: Any) -> Any:
    """The ``checked`` rows of ``qf`` whose largest feature is below ``exp(-GAP)`` (or NaN).

    Their normalisers ``den = qf . s`` (``s = kv[:, -1]``, the key features' sums) pick
    the candidates first: ``den <= max(qf) sum(s)``, so a row with
    ``den >= exp(-GAP) sum(s)`` is not one; only the others' rows are read.
    """
    floor = math.exp(-GAP) * float(kv[:, -1].sum(dtype=np.float64))
    rows = checked[~(den[checked] >= floor)]
    return rows[~(qf[rows].max(axis=1) >= math.exp(-GAP))]


class _Keys(NamedTuple):
    """The NumPy fast path's keys' exponent matrix and its constants."""

    matrix: Any  # (d + 2, m)
    radius: float  # the largest column norm of its first d rows
    low: float  # the smallest entry of its last row


class _Queries(NamedTuple):
    """The NumPy fast path's queries' exponent matrix and its constants."""

    matrix: Any  # [wq; 1]: the last row multiplies the shift column
    radius: float  # the largest column norm of the projection rows
    top: float  # the largest bias
    spread: float  # the largest bias minus the smallest
    limit: float  # rows with |x| >= limit may fall GAP below the bound


def _limit(norms: np.ndarray, bias: np.ndarray) -> float:
    """The query norm below which a row's largest exponent is provably within ``GAP`` of
    the bound ``|x| R + max c + 1`` (see ``NumpyOps._features``).

    Feature ``j``'s exponent is ``>= c_j - |x| n_j`` (``n_j`` its column norm), so the row
    max minus the bound is ``>= c_j - |x| (n_j + R) - max c - 1`` for every ``j``: that is
    ``>= -GAP`` when ``|x| <= (GAP - 1 - (max c - c_j)) / (n_j + R)`` for some ``j``.
    """
    radius = float(norms.max())
    if radius <= 0:  # every exponent is c_j: the row max is the bound minus 1
        return math.inf
    return float(((GAP - 1 - (bias.max() - bias)) / (norms + radius)).max())


@functools.lru_cache(maxsize=8)
def _ones(n: int, dtype: Any) -> np.ndarray:
    """A read-only vector of ``n`` ones."""
    ones = np.ones(n, dtype=dtype)
    ones.flags.writeable = False
    return ones


def _unflush(qc: Any, kc: Any, vc: Any, pre: Any, oc: Any) -> None:
    """Recompute without flush-to-zero the chunks' rows whose results it may have changed.

    The scores ``qc kc^T`` of ``n`` chunks of ``c`` rows were computed with results below
    the smallest normal number ``u`` flushed to 0 (:mod:`._fenv`): a score is a sum of
    ``m`` products of features, all >= 0, so it lost at most ``m u``; a row's normaliser
    (its scores' sum plus ``qf . prefix``) at most ``c m u``, its numerator ``c m u max|v|``.
    Rows whose normaliser is at least ``c m u / eps`` thus changed by at most ``eps``
    times ``(max|v| + |result|)``, as much as rounding changes them; the others (rare:
    every feature product of the row's keys in its chunk so small, and little before
    them) are recomputed here from their chunk's prefix, exactly as without the flush.
    """
    _, c, m = qc.shape
    info = np.finfo(qc.dtype)
    limit = c * m * float(info.smallest_normal) / float(info.eps)
    chunks, rows = np.nonzero(oc[:, :, -1] < limit)
    for i in np.unique(chunks):
        r = rows[chunks == i]
        s = qc[i, r] @ kc[i].T
        s[np.arange(c) > r[:, None]] = 0.0  # the keys after each row
        oc[i, r] = qc[i, r] @ pre[i] + s @ vc[i]


@functools.lru_cache(maxsize=8)
def _future(c: int) -> np.ndarray:
    """``(c, c)`` boolean: True above the diagonal (key after query)."""
    return np.triu(np.ones((c, c), dtype=bool), 1)


class NumpyOps(TiledOps):
    """Tiled-engine steps for NumPy: ``out=`` buffers, in-place ``exp``, all cores."""

    chunk = CHUNK

    def __init__(self, workers: int | None = None, block: int = BLOCK) -> None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self.workers = workers or cores or 1
        self.block = block
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._blas: Any = None

    def prepare_keys(self, xp: ModuleType, wk: Any) -> _Keys:
        """The keys' exponent matrix and the constants of its lower bound."""
        d = wk.shape[0] - 2
        return _Keys(wk, _radius(wk[:d]), float(wk[d + 1].min()) if wk.size else 0.0)

    def key_block(
        self, xp: ModuleType, y: Any, v: Any, keep: Any, wk: Any, c: float
    ) -> tuple[Any, Any]:
        """Keys' features in this thread's buffer, and ``v`` itself (no copy) unless masked."""
        wk, radius, low = wk
        rows, d = y.shape
        aug = self.buffer(np, "k_in", rows, d + 2, y)
        aug[:, :d] = y
        np.einsum("ij,ij->i", y, y, out=aug[:, d])
        big = float(aug[:, d].max()) if rows else 0.0  # the largest |y|^2
        aug[:, d] *= -c
        aug[:, d + 1] = 1.0
        kf = np.matmul(aug, wk, out=self.buffer(np, "k", rows, wk.shape[1], y))
        # every exponent is >= -|y| R - c |y|^2 + min of the last row
        _exp(kf, low - math.sqrt(big) * radius - c * big)
        if keep is not None:  # garbage (even NaN) in masked rows is overwritten
            drop = ~keep[:, 0]
            kf[drop] = 0.0
            vb = self.buffer(np, "v", rows, v.shape[1], v)
            np.copyto(vb, v)
            vb[drop] = 0.0
            return kf, vb
        return kf, v

    def causal(
        self, xp: ModuleType, qf: Any, kf: Any, vb: Any, kv0: Any, chunk: int
    ) -> tuple[Any, Any]:
        """Causal attention of a block, chunk by chunk, in this thread's buffers.

        As :func:`favorcore._linear.causal_sums` of ``[V | 1]`` (copied into a buffer),
        with every product written in place: the chunks' key sums prefix-summed by in-place
        adds starting from the carried state (``np.cumsum`` over a leading axis runs its
        inner loop along that short axis, one element at a time: as slow as a matmul of
        the block here), the future masked out of the scores in place, and the
        intra-chunk product added into the output.
        """
        rows, m = qf.shape
        dv = vb.shape[1]
        v1 = self.buffer(np, "v1", rows, dv + 1, vb)
        v1[:, :dv] = vb
        v1[:, dv] = 1.0
        o = self.buffer(np, "o", rows, dv + 1, qf)
        kv = np.zeros((m, dv + 1), dtype=qf.dtype) if kv0 is None else kv0
        split = rows - rows % chunk
        for lo, hi, c in ((0, split, chunk), (split, rows, rows - split)):
            if hi > lo:
                kv = self._chunks(qf[lo:hi], kf[lo:hi], v1[lo:hi], kv, c, o[lo:hi])
        return o, kv

    def _chunks(self, qf: Any, kf: Any, v1: Any, kv: Any, c: int, o: Any) -> Any:
        """``n`` chunks of ``c`` rows into ``o``; returns the state after them (a new array)."""
        rows, m = qf.shape
        n, e = rows // c, v1.shape[1]
        qc, kc, vc = qf.reshape(n, c, m), kf.reshape(n, c, m), v1.reshape(n, c, e)
        pre = self.buffer(np, "prefix", (n + 1) * m, e, qf).reshape(n + 1, m, e)
        np.matmul(kc.transpose(0, 2, 1), vc, out=pre[1:])
        pre[0] = kv
        for i in range(n):
            pre[i + 1] += pre[i]
        scores = self.buffer(np, "scores", rows, c, qf).reshape(n, c, c)
        with flush_to_zero() as flush:  # (of the chunks' products, the one that underflows)
            np.matmul(qc, kc.transpose(0, 2, 1), out=scores)
        np.copyto(scores, 0.0, where=_future(c))
        oc = o.reshape(n, c, e)
        np.matmul(qc, pre[:n], out=oc)
        oc += np.matmul(scores, vc, out=self.buffer(np, "intra", rows, e, qf).reshape(n, c, e))
        if flush.underflowed:
            _unflush(qc, kc, vc, pre, oc)
        return pre[n].copy()

    def transform(self, xp: ModuleType, y: Any, t: Any) -> Any:
        """Balanced keys ``[y, 1] @ t`` in this thread's buffer."""
        out = np.matmul(y, t[:-1], out=self.buffer(np, "kt", y.shape[0], t.shape[1], y))
        out += t[-1]
        return out

    def prepare(self, xp: ModuleType, wq: Any) -> _Queries:
        """The queries' exponent matrix with a row for the shift, and its constants."""
        d = wq.shape[0] - 1
        bias = wq[d]
        norms = np.sqrt((wq[:d] ** 2).sum(axis=0))
        return _Queries(
            np.concatenate([wq, np.ones((1, wq.shape[1]), dtype=wq.dtype)]),
            float(norms.max()),
            float(bias.max()),
            float(bias.max() - bias.min()),
            _limit(norms, bias),
        )

    def query_block(self, xp: Any, x: Any, wq: Any) -> Any:
        """Queries' features in this thread's buffer (:meth:`_features`; rows that may
        fall far below the bound take the exact row max up front)."""
        return self._features(x, wq, check=False)[0]

    def _features(self, x: Any, wq: _Queries, check: bool) -> tuple[Any, Any]:
        """``(phi(Q_b), rows to check)``: one matmul, one ``exp``, in this thread's buffer.

        Any per-row shift is exact for queries. Instead of a pass for the row max, the
        shift ``s(x) = |x| R + max c + 1`` (``R`` the largest column norm of the
        projection, ``c`` the bias row) is an upper bound of the row's exponents computed
        from ``x`` alone and enters the matmul as one more column, so every exponent is
        <= 0 (no overflow, whatever ``x``). A row's largest feature must also stay far
        from underflow: below a norm limit computed once per matrix (:func:`_limit`) it
        is provably within ``exp(-GAP)`` of 1. Rows above it (unit-variance inputs are,
        for ``d = 64``) are usually within it too, as the bound assumes ``x`` aligned
        with the longest projection row: the largest-norm ones (``PROBE``) are looked at;
        if any falls more than ``GAP`` below the bound, the rows above the limit
        take the exact row max now (every row of the block in place once they are more
        than an eighth of it: gathering and scattering them costs more). Otherwise, with
        ``check``, they are returned as the rows whose normalisers the caller checks
        (:func:`_weak`); without it, they take the exact max.
        """
        rows, d = x.shape
        aug = self.buffer(np, "q_in", rows, d + 2, x)
        aug[:, :d] = x
        aug[:, d] = 1.0
        norm = aug[:, d + 1]
        np.einsum("ij,ij->i", x, x, out=norm)
        np.sqrt(norm, out=norm)
        far = np.flatnonzero(norm >= wq.limit)
        # every shifted exponent is >= -(2 |x| R + the bias's spread + 1)
        lower = -(2 * float(norm.max()) * wq.radius + wq.spread + 1.0) if rows else 0.0
        probe = far[np.argpartition(norm[far], -PROBE)[-PROBE:]] if far.size > PROBE else far
        norm *= -wq.radius
        norm -= wq.top + 1.0
        e = np.matmul(aug, wq.matrix, out=self.buffer(np, "q", rows, wq.matrix.shape[1], x))
        checked = None
        if far.size and check and e[probe].max(axis=1).min() >= -GAP:
            checked = far
        elif far.size * 8 > rows:
            np.subtract(e, e.max(axis=1, keepdims=True), out=e)
        elif far.size:
            e[far] -= e[far].max(axis=1, keepdims=True)
        return _exp(e, lower), checked

    @staticmethod
    def _exact(x: Any, wq: _Queries) -> Any:
        """Features of the rows ``x`` with the exact row max (a new array)."""
        d = x.shape[1]
        e = x @ wq.matrix[:d] + wq.matrix[d]
        e -= e.max(axis=1, keepdims=True)
        return _exp(e, -math.inf)

    def attend(self, xp: ModuleType, x: Any, wq: Any, kv: Any, out: Any) -> tuple[Any, Any]:
        """:meth:`answer` of :meth:`_features`; checked rows whose largest feature is
        below ``exp(-GAP)`` (:func:`_weak`) are recomputed from features with the exact
        row max."""
        qf, checked = self._features(x, wq, check=True)
        den = self._products(qf, kv, out)
        if checked is not None:
            weak = _weak(qf, den, checked, kv)
            if weak.size:
                self._products(self._exact(x[weak], wq), kv, out, weak, den)
        return out, self._normalise_rows(out, den)

    def attend_causal(
        self, xp: ModuleType, x: Any, wq: Any, kf: Any, vb: Any, kv0: Any, chunk: int,
        out: Any,
    ) -> tuple[tuple[Any, Any], Any]:  # fmt: skip
        """:meth:`causal` of :meth:`_features`; checked rows whose largest feature is
        below ``exp(-GAP)`` (:func:`_weak`, against the key sums after the block: they
        bound every row's) are recomputed from features with the exact row max, one by
        one (:meth:`_causal_rows`) or, once more than an eighth of the block, all."""
        qf, checked = self._features(x, wq, check=True)
        o, kv = self.causal(xp, qf, kf, vb, kv0, chunk)
        if checked is not None:
            weak = _weak(qf, o[:, vb.shape[1]], checked, kv)
            if weak.size * 8 > x.shape[0]:
                o, kv = self.causal(xp, self._exact(x, wq), kf, vb, kv0, chunk)
            elif weak.size:
                o[weak] = self._causal_rows(self._exact(x[weak], wq), weak, kf, vb, kv0)
        return self.finish(xp, o, kv, out), kv

    @staticmethod
    def _causal_rows(qw: Any, rows: Any, kf: Any, vb: Any, kv0: Any) -> Any:
        """``[phi(Q) ... | D]`` of the block's ``rows`` (features ``qw``) from the state
        before the block and the block's keys up to each row, directly."""
        scores = qw @ kf.T
        scores[np.arange(kf.shape[0]) > rows[:, None]] = 0.0  # the keys after each row
        o = np.empty((rows.size, vb.shape[1] + 1), dtype=qw.dtype)
        np.matmul(scores, vb, out=o[:, :-1])
        o[:, -1] = scores.sum(axis=1)
        if kv0 is not None:
            o += qw @ kv0
        return o

    def key_sums(self, xp: ModuleType, kf: Any, vb: Any) -> Any:
        """``kf^T [V | 1]``: ``kf^T V`` and the column sums as a vector-matrix product."""
        m, dv = kf.shape[1], vb.shape[1]
        kv = np.empty((m, dv + 1), dtype=kf.dtype)
        np.matmul(kf.T, vb, out=kv[:, :dv])
        np.matmul(_ones(kf.shape[0], kf.dtype), kf, out=kv[:, dv])
        return kv

    def answer(self, xp: ModuleType, qf: Any, kv: Any, out: Any) -> tuple[Any, Any]:
        """``qf kv[:, :dv]`` straight into ``out``, divided in place by ``qf kv[:, dv]``."""
        den = self._products(qf, kv, out)
        return out, self._normalise_rows(out, den)

    @staticmethod
    def _products(qf: Any, kv: Any, out: Any, rows: Any = None, den: Any = None) -> Any:
        """``out = qf kv[:, :dv]``; returns ``qf kv[:, dv]``. With ``rows``, ``qf`` holds
        only those rows: their results go into ``out[rows]`` and ``den[rows]``."""
        dv = kv.shape[1] - 1
        if rows is None:
            np.matmul(qf, kv[:, :dv], out=out)
            return np.matmul(qf, kv[:, dv])
        out[rows] = qf @ kv[:, :dv]
        den[rows] = qf @ kv[:, dv]
        return den

    @staticmethod
    def _normalise_rows(out: Any, den: Any) -> Any:
        """Divide ``out``'s rows by ``den`` in place; ``(rows, 1)``: whose normaliser was
        <= the smallest normal number (their result is 0, as
        :func:`favorcore._linear.normalise`; a NaN normaliser stays NaN)."""
        small = den <= np.finfo(den.dtype).smallest_normal
        if small.any():  # (errstate costs 20 us a call: only here)
            with np.errstate(divide="ignore", over="ignore"):
                np.reciprocal(den, out=den)
            den[small] = 0.0
        else:
            np.reciprocal(den, out=den)
        np.multiply(out, den[:, None], out=out)
        return small[:, None]

    def normalise(self, xp: ModuleType, o: Any, dv: int, out: Any, kv: Any = None) -> Any:
        """``o[:, :dv] / o[:, dv:]`` into ``out``; rows with a normaliser <= 0 give 0."""
        den = o[:, dv:]
        bad = den[:, 0] <= np.finfo(den.dtype).smallest_normal  # as favorcore._linear.normalise
        if not bad.any():  # (no zero to divide by: no need for errstate, 20 us a call)
            return np.divide(o[:, :dv], den, out=out)
        with np.errstate(divide="ignore", invalid="ignore"):
            np.divide(o[:, :dv], den, out=out)
        out[bad] = 0.0
        return out

    def output(self, xp: ModuleType, shape: tuple[int, ...], *inputs: Any) -> Any:
        """An uninitialised array: every row is written by :meth:`normalise`."""
        return np.empty(shape, dtype=inputs[0].dtype)

    def context(self) -> contextlib.AbstractContextManager[Any]:
        """One BLAS thread for the whole call (the engine runs its own workers).

        Not only inside :meth:`map`: OpenBLAS's threads spin for a while after each
        multi-threaded call, so the small matmuls and eigendecompositions of the balance
        statistics, run with every BLAS thread just before the engine, left a thread
        spinning on the core a worker needed (the default estimator ran 1.8x slower on
        two cores than with this, and slower than on one).
        """
        if self.workers <= 1:
            return contextlib.nullcontext()
        with self._lock:
            if self._blas is None:
                from threadpoolctl import ThreadpoolController

                self._blas = ThreadpoolController()  # scans the loaded libraries once
        limited: contextlib.AbstractContextManager[Any] = self._blas.limit(
            limits=1, user_api="blas"
        )
        return limited

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """Items on ``workers`` threads, each with one BLAS thread."""
        if self.workers <= 1 or len(items) <= 1:
            return [fn(i) for i in items]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="favorcore")
        with self.context():
            return list(self._pool.map(fn, items))


register_step("array_api_compat.numpy", "tiled", NumpyOps())


def __getattr__(name: str) -> Any:
    if name == "FavorFeatures":  # scikit-learn is imported only when asked for
        from ._sklearn import FavorFeatures

        return FavorFeatures
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
