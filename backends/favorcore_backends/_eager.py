r"""The operations of the eager adapters (NumPy, PyTorch): in place, into reused buffers.

Each operation of :class:`favorcore.steps.Steps` is done here whole, from the fields of
the call's :class:`~favorcore.features.Exponent` (forms of other maps take the standard
operations), with every product written into a buffer and every elementwise step in
place, so that a block costs no allocation and one pass per step:

* **keys**: ``[k', -half |k'|^2, 1] @ [key; 1; key_bias]``, one product (``k'`` the
  balanced keys: one more product when balanced), then ``exp`` in place;
* **queries**: ``[x, 1, -s(x)] @ [query; query_bias; 1]``, whose shift ``s(x)`` is an
  upper bound of the row's exponents computed from its norm (any per-row shift is exact
  for queries, and this one costs no pass over the block). Below a limit of the norm
  (:func:`norm_limit`) the row's largest feature provably stays within ``exp(-GAP)`` of
  1; rows beyond it take their exact row max;
* **causal**: the chunks' sums prefix-summed by in-place adds from the carried state, the
  scores of each chunk with the future set to 0 in place, the chunk products added into
  the output;
* features below the smallest normal number are set to 0 (x86 computes denormal numbers
  10-100x slower, in ``exp`` and in every product they enter); the block is read for that
  only when a lower bound from the rows' norms says they can occur.

On a device other than the host (a GPU) nothing is read back: queries take their exact
row max and no flush is needed. A framework differs from another in a few operations
only, given by a :class:`Lib`. Buffers come from workspaces that :meth:`EagerSteps.map`
lends the threads running a call's work items and takes back when they finish.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from favorcore.features import Exponent, Form
from favorcore.steps import Steps, differentiable

__all__ = ["GAP", "EagerSteps", "Lib", "norm_limit"]

#: query rows whose largest exponent may fall more than GAP below the bound take the
#: exact row max (``exp(-GAP)`` is far above the smallest normal number of float32)
GAP = 40.0
#: rows beyond the norm limit looked at (the largest norms) before the bound is trusted
PROBE = 8


@dataclass(frozen=True)
class Lib:
    """The operations in which the eager frameworks differ."""

    #: the Array API namespace (array-api-compat's)
    xp: ModuleType
    #: the framework's own module: ``matmul``, ``exp``, ``multiply``, ``subtract``,
    #: ``reciprocal`` and ``sqrt`` with ``out=``
    native: ModuleType
    #: ``out[:] = |y_i|^2`` for the rows of ``y``
    sq_norms: Callable[[Any, Any], None]
    #: ``a`` set to ``value`` where ``cond`` (broadcast), in place, without reading it back
    fill_where: Callable[[Any, Any, float], None]
    #: ``e = max(e, floor)`` in place
    clamp_min: Callable[[Any, float], None]
    #: the future of each ``(c G, c)`` matrix of scores set to 0 in place (query row ``r``
    #: is position ``r // G``)
    zero_future: Callable[[Any, int], None]
    #: ``kf^T [v | 1]`` (a new array)
    key_sums: Callable[[Any, Any], Any]
    #: ``o += a @ b`` (``tmp``: a buffer of ``o``'s shape)
    add_product: Callable[[Any, Any, Any, Any], None]
    #: ``out = a @ b`` of 3-D arrays (a batch of products), returned
    bmm: Callable[[Any, Any, Any], Any]
    #: ``out = x @ w + b`` (``b`` a row), returned
    affine: Callable[[Any, Any, Any, Any], Any]
    #: whether the array lives in host memory (its values can be read cheaply)
    on_host: Callable[[Any], bool]
    #: queries shifted by the bound from their norms (instead of their row max, which
    #: costs a framework with cheap reductions no more than the bound's own steps)
    bound_queries: bool = True


@functools.lru_cache(maxsize=8)
def _floor(dtype_name: str) -> float:
    """The smallest exponent whose ``exp`` is a normal number (float32: about -87.3)."""
    dt = np.dtype(dtype_name)
    tiny = np.finfo(dt).smallest_normal
    x = dt.type(np.log(tiny))
    while np.exp(x) < tiny:
        x = np.nextafter(x, dt.type(0))
    return float(x)


@functools.lru_cache(maxsize=16)
def _tiny(xp: ModuleType, dtype: Any) -> float:
    """The smallest normal number of ``dtype``."""
    return float(xp.finfo(dtype).smallest_normal)


def _dtype_name(a: Any) -> str:
    return str(a.dtype).removeprefix("torch.")


def norm_limit(norms: np.ndarray, bias: np.ndarray) -> float:
    """The query norm below which a row's largest exponent is provably within ``GAP`` of
    its bound ``|x| R + max c + 1`` (``R`` the largest column norm ``n_j`` of the query
    matrix, ``c`` its bias row).

    Feature ``j``'s exponent is ``>= c_j - |x| n_j``, so the row max minus the bound is
    ``>= c_j - |x| (n_j + R) - max c - 1`` for every ``j``: at least ``-GAP`` when
    ``|x| <= (GAP - 1 - (max c - c_j)) / (n_j + R)`` for some ``j``.
    """
    radius = float(norms.max()) if norms.size else 0.0
    if radius <= 0:  # every exponent is c_j: the row max is the bound minus 1
        return math.inf
    return float(((GAP - 1 - (bias.max() - bias)) / (norms + radius)).max())


@dataclass(frozen=True)
class _Keys:
    matrix: Any  # [key; 1; key_bias], (d + 2, m)
    radius: float  # the largest column norm of ``key``
    low: float  # the smallest key bias


@dataclass(frozen=True)
class _Queries:
    matrix: Any  # [query; query_bias; 1], (d + 2, m)
    radius: float  # the largest column norm of ``query``
    top: float  # the largest bias
    spread: float  # the largest bias minus the smallest
    limit: float  # rows of norm >= limit take the exact row max


class _Workspaces:
    """Buffers reused from block to block and call to call: one workspace (a dict of
    arrays by role) per thread running work items, from a free list shared by calls."""

    def __init__(self, keep: int) -> None:
        self.keep, self.lock = keep, threading.Lock()
        self.free: list[dict[str, Any]] = []
        self.local = threading.local()
        if hasattr(os, "register_at_fork"):  # a lock held at fork would stay held
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self.lock, self.free = threading.Lock(), []

    def current(self) -> dict[str, Any]:
        ws: dict[str, Any] | None = getattr(self.local, "ws", None)
        return {} if ws is None else ws  # outside map: fresh buffers

    def run(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` with a workspace lent to this thread."""
        with self.lock:
            ws = self.free.pop() if self.free else {}
        before, self.local.ws = getattr(self.local, "ws", None), ws
        try:
            return fn()
        finally:
            self.local.ws = before
            with self.lock:
                if len(self.free) < self.keep:
                    self.free.append(ws)


class EagerSteps(Steps):
    """The engine's operations for an eager framework, in place and into buffers."""

    def __init__(self, lib: Lib, *, block: int, chunk: int, workers: int = 1) -> None:
        super().__init__(block=block, chunk=chunk, vectorized=False)
        self.lib, self.max_workers = lib, workers
        self._spaces = _Workspaces(keep=max(2, workers))

    @property
    def workers(self) -> int:  # type: ignore[override]
        """Work items run concurrently by :meth:`map`."""
        return self.max_workers

    # -- buffers --------------------------------------------------------------------------

    def buffer(self, role: str, rows: int, cols: int, like: Any) -> Any:
        """This thread's ``(rows, cols)`` buffer for ``role`` in ``like``'s dtype and
        device, contents undefined."""
        cache = self._spaces.current()
        key = (cols, like.dtype, like.device)
        entry = cache.get(role)
        if entry is None or entry[0] != key or entry[1].shape[0] < rows:
            xp = self.lib.xp
            buf = xp.empty((max(rows, self.block), cols), dtype=like.dtype, device=like.device)
            entry = cache[role] = [key, buf, -1, None]
        if entry[2] != rows:  # the last view of its leading rows, kept (not one per block)
            entry[2], entry[3] = rows, entry[1][:rows, ...]
        return entry[3]

    def output(self, xp: ModuleType, shape: tuple[int, ...], like: Any) -> Any:
        """An uninitialised array: every row is written by :meth:`answer` or :meth:`causal`."""
        return self.lib.xp.empty(shape, dtype=like.dtype, device=like.device)

    # -- constants of the form, once per call ---------------------------------------------

    def _key_constants(self, form: Exponent) -> _Keys:
        if "keys" not in form.memo:
            form.memo["keys"] = self._constants(form, "keys", self._keys_of)
        keys: _Keys = form.memo["keys"]
        return keys

    def _query_constants(self, form: Exponent) -> _Queries:
        if "queries" not in form.memo:
            form.memo["queries"] = self._constants(form, "queries", self._queries_of)
        queries: _Queries = form.memo["queries"]
        return queries

    def _constants(self, form: Exponent, kind: str, of: Callable[[Any], list[Any]]) -> Any:
        """The constants of a form; those of a row of a form with a row axis are derived
        for every row at once (kept in the whole form's memo)."""
        whole = form.memo.get("row_of")
        if whole is None:
            return of(self._matrix(form, kind))[0]
        full, r = whole
        key = f"{kind} of rows"
        if key not in full.memo:
            full.memo[key] = of(self._matrix(full, kind))
        rows = full.memo[key]
        return rows[r % len(rows)]

    def _matrix(self, form: Exponent, kind: str) -> Any:
        """The form's key or query matrix (:meth:`~favorcore.features.Exponent.key_matrix`,
        :meth:`~favorcore.features.Exponent.query_matrix`), ``(n, d + 2, m)``; the query
        matrix with a last row of ones, which meets the rows' shift ``-s(x)``."""
        xp = self.lib.xp
        matrix = form.key_matrix(xp) if kind == "keys" else form.query_matrix(xp)
        if matrix.ndim == 2:
            matrix = matrix[None, ...]
        if kind == "queries":
            ones = xp.ones((*matrix.shape[:-2], 1, matrix.shape[-1]), dtype=matrix.dtype,
                           device=matrix.device)  # fmt: skip
            matrix = xp.concat([matrix, ones], axis=1)
        return matrix

    def _keys_of(self, matrix: Any) -> list[_Keys]:
        """The key constants of every row of a key matrix ``[key; 1; key_bias]``."""
        xp = self.lib.xp
        n, d, m = matrix.shape[0], matrix.shape[1] - 2, matrix.shape[2]
        key, bias = matrix[:, :d, :], matrix[:, d + 1 :, :]
        radius, low = [math.inf] * n, [0.0] * n
        if self.lib.on_host(key) and m:
            radius = np.sqrt(_host(xp.max(xp.sum(key * key, axis=1), axis=1))).tolist()
            low = np.asarray(_host(xp.min(bias, axis=(1, 2)))).tolist()
        return [_Keys(matrix[i], float(radius[i]), float(low[i])) for i in range(n)]

    def _queries_of(self, matrix: Any) -> list[_Queries]:
        """The query constants of every row of a query matrix ``[query; query_bias; 1]``."""
        xp = self.lib.xp
        n, d, m = matrix.shape[0], matrix.shape[1] - 2, matrix.shape[2]
        query, bias = matrix[:, :d, :], matrix[:, d : d + 1, :]
        if not (self.lib.bound_queries and self.lib.on_host(query) and m):
            # every row takes its exact max (no bound, no reading back)
            return [_Queries(matrix[i], math.inf, 0.0, 0.0, -math.inf) for i in range(n)]
        all_norms = np.sqrt(np.asarray(_host(xp.sum(query * query, axis=1)), np.float64))
        all_c = np.asarray(_host(bias[:, 0, :]), np.float64)
        out = []
        for i, (norms, c) in enumerate(zip(all_norms, all_c, strict=True)):
            out.append(_Queries(matrix[i], float(norms.max()), float(c.max()),
                                float(c.max() - c.min()), norm_limit(norms, c)))  # fmt: skip
        return out

    # -- the operations -------------------------------------------------------------------

    def _exp(self, e: Any, lower: float) -> Any:
        """``exp(e)`` in place, features below the smallest normal number set to 0 (NaN
        stays); ``lower`` bounds ``e`` from below, so that ``e`` is read only when it can
        go under the floor."""
        native, xp = self.lib.native, self.lib.xp
        floor = _floor(_dtype_name(e))
        if (lower >= floor or not self.lib.on_host(e) or e.shape[0] * e.shape[1] == 0
                or float(xp.min(e)) >= floor):  # fmt: skip
            return native.exp(e, out=e)
        keep = e >= floor
        self.lib.clamp_min(e, floor)
        native.exp(e, out=e)
        return native.multiply(e, keep, out=e)

    def keys(self, xp: ModuleType, form: Form, y: Any, v: Any, keep: Any) -> tuple[Any, Any]:
        """Keys' features in this thread's buffer, and ``v`` itself unless masked."""
        if not isinstance(form, Exponent):
            return super().keys(xp, form, y, v, keep)
        lib, consts = self.lib, self._key_constants(form)
        rows, d = y.shape
        if form.transform is not None:
            assert form.shift is not None
            y = lib.affine(y, form.transform, -form.shift[0], self.buffer("kt", rows, d, y))
        aug = self.buffer("k_in", rows, d + 2, y)
        aug[:, :d] = y
        lib.sq_norms(y, aug[:, d])
        big = float(xp.max(aug[:, d])) if rows and math.isfinite(consts.radius) else math.inf
        aug[:, d] *= -form.half
        aug[:, d + 1] = 1.0
        kf = lib.native.matmul(
            aug, consts.matrix, out=self.buffer("k", rows, consts.matrix.shape[1], y)
        )
        # every exponent is >= low - |k'| R - half |k'|^2
        self._exp(kf, consts.low - math.sqrt(big) * consts.radius - form.half * big)
        if keep is None:
            return kf, v
        drop = ~keep
        lib.fill_where(kf, drop, 0.0)  # garbage (even NaN) in masked rows is overwritten
        vb = self.buffer("v", rows, v.shape[1], v)
        vb[...] = v
        lib.fill_where(vb, drop, 0.0)
        return kf, vb

    def key_sums(self, xp: ModuleType, kf: Any, v: Any) -> Any:
        return self.lib.key_sums(kf, v)

    def _queries(self, form: Exponent, x: Any) -> tuple[Any, Any]:
        """``(phi(Q_b), trusted)``: queries' features in this thread's buffer, shifted by
        the bound; rows beyond the norm limit take the exact row max unless the largest
        of them (``PROBE``) are within ``GAP`` of the bound: then they keep it and are
        returned as ``trusted``, for :meth:`_weak` to check after the products. (The
        exact max goes to every row of the block once they are more than an eighth of
        it: gathering them costs more.)"""
        lib, xp, consts = self.lib, self.lib.xp, self._query_constants(form)
        rows, d = x.shape
        out = self.buffer("q", rows, consts.matrix.shape[1], x)
        if not math.isfinite(consts.radius):
            # every row its exact max, and no flush: with the max out, queries reach
            # denormal features only at norms far beyond those that keys reach them at
            e = lib.affine(x, consts.matrix[:d], consts.matrix[d], out)
            lib.native.subtract(e, xp.max(e, axis=1, keepdims=True), out=e)
            return lib.native.exp(e, out=e), None
        aug = self.buffer("q_in", rows, d + 2, x)
        aug[:, :d] = x
        aug[:, d] = 1.0
        norm = aug[:, d + 1]
        lib.sq_norms(x, norm)
        lib.native.sqrt(norm, out=norm)
        far = xp.nonzero(norm >= consts.limit)[0]
        probe = far[xp.argsort(norm[far])[-PROBE:]] if far.shape[0] else None
        # every shifted exponent is >= -(2 |x| R + the bias's spread + 1)
        lower = -(2 * float(xp.max(norm)) * consts.radius + consts.spread + 1.0) if rows else 0.0
        norm *= -consts.radius
        norm -= consts.top + 1.0
        e = lib.native.matmul(aug, consts.matrix, out=out)
        if probe is not None and float(xp.min(xp.max(e[probe], axis=1))) >= -GAP:
            return self._exp(e, lower), far
        n_far = far.shape[0]
        if n_far * 8 > rows:
            lib.native.subtract(e, xp.max(e, axis=1, keepdims=True), out=e)
        elif n_far:
            e[far] -= xp.max(e[far], axis=1, keepdims=True)
        return self._exp(e, lower), None

    def _exact(self, form: Exponent, x: Any, out: Any = None) -> Any:
        """Features of the rows ``x`` with the exact row max (in ``out``, or a new array)."""
        consts, d = self._query_constants(form), x.shape[1]
        e = self.lib.affine(x, consts.matrix[:d], consts.matrix[d], out)
        self.lib.native.subtract(e, self.lib.xp.max(e, axis=1, keepdims=True), out=e)
        return self._exp(e, -math.inf)

    def _weak(self, qf: Any, den: Any, trusted: Any, kv: Any) -> Any:
        """The ``trusted`` rows whose largest feature is below ``exp(-GAP)`` (or NaN): the
        bound was too far above them. Their normalisers ``den = qf . z`` pick the
        candidates first (``den <= max(qf) sum(z)``, ``z = kv[:, -1]``: a row with
        ``den >= exp(-GAP) sum(z)`` is not one); only those rows are read."""
        xp = self.lib.xp
        floor = math.exp(-GAP) * float(xp.sum(kv[:, -1]))
        rows = trusted[~(den[trusted] >= floor)]
        if not rows.shape[0]:
            return rows
        return rows[~(xp.max(qf[rows], axis=1) >= math.exp(-GAP))]

    def _divide(self, num: Any, den: Any, out: Any) -> Any:
        """``out = num / den`` per row (0 where ``den`` is at most the smallest normal
        number, NaN stays NaN); returns those rows' mask ``(rows, 1)``."""
        lib = self.lib
        small = den <= _tiny(lib.xp, den.dtype)
        lib.fill_where(den, small, 1.0)
        lib.native.reciprocal(den, out=den)
        lib.fill_where(den, small, 0.0)
        lib.native.multiply(num, den[:, None], out=out)
        return small[:, None]

    def answer(
        self, xp: ModuleType, form: Form, x: Any, kv: Any, out: Any, kept: Any = None
    ) -> tuple[Any, Any]:
        """``phi(Q_b) kv[:, :dv]`` straight into ``out``, scaled in place by the
        reciprocal of ``phi(Q_b) kv[:, dv]``; features to keep are computed with their
        exact row max, in a new array."""
        if not isinstance(form, Exponent):
            result, small = super().answer(xp, form, x, kv, out, kept)
            out[...] = result
            return out, small
        native, dv = self.lib.native, kv.shape[1] - 1
        if kept is None:
            qf, trusted = self._queries(form, x)
        else:
            qf, trusted = self._exact(form, x), None
        native.matmul(qf, kv[:, :dv], out=out)
        den = native.matmul(qf, kv[:, dv])
        if kept is not None:  # (the division below overwrites den)
            kept += [qf, self.lib.xp.asarray(den[:, None], copy=True)]
        if trusted is not None and (weak := self._weak(qf, den, trusted, kv)).shape[0]:
            exact = self._exact(form, x[weak])  # those rows with their exact max
            out[weak], den[weak] = exact @ kv[:, :dv], exact @ kv[:, dv]
        return out, self._divide(out, den, out)

    def causal(
        self, xp: ModuleType, form: Form, x: Any, kf: Any, v: Any, kv0: Any, chunk: int,
        out: Any, resets: Any = None,
    ) -> tuple[Any, Any, Any]:  # fmt: skip
        """Chunk by chunk into this thread's buffers (see the module docstring)."""
        if not isinstance(form, Exponent) or resets is not None:
            result, small, kv = super().causal(xp, form, x, kf, v, kv0, chunk, out, resets)
            out[...] = result
            return out, small, kv
        qf, trusted = self._queries(form, x)
        o, kv = self._chunks(qf, kf, v, kv0, chunk)
        if trusted is not None and (weak := self._weak(qf, o[:, -1], trusted, kv)).shape[0]:
            if weak.shape[0] * 8 > qf.shape[0]:  # (the state after the block bounds each row's)
                o, kv = self._chunks(self._exact(form, x), kf, v, kv0, chunk)
            else:
                group = qf.shape[0] // max(kf.shape[0], 1)
                o[weak] = self._causal_rows(self._exact(form, x[weak]), weak // group, kf, v, kv0)
        return out, self._divide(o[:, :-1], o[:, -1], out), kv

    def _chunks(self, qf: Any, kf: Any, v: Any, kv0: Any, chunk: int) -> tuple[Any, Any]:
        """``(phi(Q) [S | z] per row, the state after)`` of a causal block, in buffers."""
        lib, xp = self.lib, self.lib.xp
        (rows, m), dv = kf.shape, v.shape[1]
        n, e, group = rows // chunk, dv + 1, qf.shape[0] // max(rows, 1)
        v1 = self.buffer("v1", rows, e, v)
        v1[:, :dv] = v
        v1[:, dv] = 1.0
        qc, kc = qf.reshape(n, chunk * group, m), kf.reshape(n, chunk, m)
        vc = v1.reshape(n, chunk, e)
        pre = self.buffer("prefix", (n + 1) * m, e, qf).reshape(n + 1, m, e)
        lib.bmm(xp.matrix_transpose(kc), vc, pre[1:])
        if kv0 is None:
            pre[0] = 0.0
        else:
            pre[0] = kv0
        steps = list(pre)  # (views made once, not 2 n indexings)
        for i in range(n):
            steps[i + 1] += steps[i]
        scores = self.buffer("scores", rows * group, chunk, qf).reshape(n, chunk * group, chunk)
        underflowed = self.scores(qc, kc, scores)
        lib.zero_future(scores, group)
        o = self.buffer("o", rows * group, e, qf)
        oc = o.reshape(n, chunk * group, e)
        lib.bmm(qc, pre[:n], oc)
        intra = self.buffer("intra", rows * group, e, qf).reshape(n, chunk * group, e)
        lib.add_product(oc, scores, vc, intra)
        if underflowed:
            self.rescore(qc, kc, vc, pre, oc)
        return o, xp.asarray(pre[n], copy=True)

    def _causal_rows(self, qw: Any, positions: Any, kf: Any, v: Any, kv0: Any) -> Any:
        """``phi(Q) [S | z]`` of query rows (features ``qw``) at ``positions`` of the block,
        from the state before it and the block's keys up to each position, directly."""
        xp = self.lib.xp
        scores = qw @ xp.matrix_transpose(kf)
        after = xp.arange(kf.shape[0], device=kf.device)[None, :] > positions[:, None]
        self.lib.fill_where(scores, after, 0.0)
        o = xp.concat([scores @ v, xp.sum(scores, axis=1, keepdims=True)], axis=1)
        return o if kv0 is None else o + qw @ kv0

    def _gradient_rows(self, den: Any, bound: float) -> Any:
        """``1 / den`` for the rows that pass a gradient, 0 for the others
        (:meth:`Steps.answer_grad`), in place."""
        lib = self.lib
        ok = differentiable(lib.xp, den, bound)  # the rule's one home
        lib.fill_where(den, ~ok, 1.0)
        lib.native.reciprocal(den, out=den)
        lib.fill_where(den, ~ok, 0.0)
        return den

    def answer_grad(
        self, xp: ModuleType, form: Form, x: Any, kv: Any, out: Any, g: Any, qf: Any = None,
        den: Any = None,
    ) -> tuple[Any, Any]:  # fmt: skip
        """The standard backward of :meth:`answer`, in this thread's buffers."""
        if not isinstance(form, Exponent):
            return super().answer_grad(xp, form, x, kv, out, g, qf, den)
        native = self.lib.native
        (rows, _), (m, e) = x.shape, kv.shape
        if qf is None:  # (a per-row factor of the features cancels)
            qf, den = self._exact(form, x, self.buffer("q", rows, m, x)), None
        # (a copy of a kept den: a second backward reads it again)
        den = qf @ kv[:, e - 1 :] if den is None else xp.asarray(den, copy=True)
        den = self._gradient_rows(den, float(xp.max(xp.abs(kv))))
        gh = self.buffer("gh", rows, e, x)
        gh[:, : e - 1] = g
        gh[:, e - 1] = -xp.sum(g * out, axis=1)
        gh *= den
        dq = native.matmul(gh, xp.matrix_transpose(kv), out=self.buffer("dq", rows, m, x))
        native.multiply(dq, qf, out=dq)
        return form.query_grad(xp, x, dq), xp.matrix_transpose(qf) @ gh

    def keys_grad(
        self, xp: ModuleType, form: Form, y: Any, v: Any, keep: Any, dkv: Any, kf: Any = None
    ) -> tuple[Any, Any]:
        """The standard backward of :meth:`keys` and :meth:`key_sums`, in buffers (masked
        rows have zero features, hence zero gradients)."""
        if not isinstance(form, Exponent):
            return super().keys_grad(xp, form, y, v, keep, dkv, kf)
        if kf is None:
            kf, vb = self.keys(xp, form, y, v, keep)
        else:
            vb = v if keep is None else xp.where(keep, v, 0.0)
        dv, lib = v.shape[1], self.lib
        # [V_b | 1] dkv^T in one product
        de = lib.affine(vb, xp.matrix_transpose(dkv[:, :dv]), dkv[:, dv],
                        self.buffer("dk", kf.shape[0], kf.shape[1], kf))  # fmt: skip
        lib.native.multiply(de, kf, out=de)
        dy = form.key_grad(xp, y if keep is None else xp.where(keep, y, 0.0), de)
        return dy, kf @ dkv[:, :dv]

    def causal_grad(
        self, xp: ModuleType, form: Form, x: Any, y: Any, v: Any, keep: Any, kv0: Any,
        out: Any, g: Any, dkv: Any, chunk: int,
    ) -> tuple[Any, Any, Any, Any]:  # fmt: skip
        """The standard backward of a causal piece (:meth:`Steps.causal_grad`), in buffers:
        the chunks' prefixes and suffixes by in-place adds, the future out in place."""
        if not isinstance(form, Exponent):
            return super().causal_grad(xp, form, x, y, v, keep, kv0, out, g, dkv, chunk)
        lib, native = self.lib, self.lib.native
        kf, vb = self.keys(xp, form, y, v, keep)
        (rows, m), dv = kf.shape, v.shape[1]
        n, e, group = rows // chunk, dv + 1, x.shape[0] // max(rows, 1)
        cg = chunk * group
        # (any per-row factor of the query features cancels in the gradient)
        qf = self._exact(form, x, self.buffer("qg", n * cg, m, x))

        def buf(role: str, cols: int, per: int) -> Any:  # (n, per, cols) in a buffer
            return self.buffer(role, n * per, cols, x).reshape(n, per, cols)

        v1 = self.buffer("v1", rows, e, vb)
        v1[:, :dv] = vb
        v1[:, dv] = 1.0
        qc, kc, vc = qf.reshape(n, cg, m), kf.reshape(n, chunk, m), v1.reshape(n, chunk, e)
        pre = self.buffer("prefix", (n + 1) * m, e, qf).reshape(n + 1, m, e)
        lib.bmm(xp.matrix_transpose(kc), vc, pre[1:])
        pre[0] = 0.0 if kv0 is None else kv0
        steps = list(pre)
        for i in range(n):
            steps[i + 1] += steps[i]
        scores = lib.bmm(qc, xp.matrix_transpose(kc), buf("sg", chunk, cg))
        lib.zero_future(scores, group)
        den = native.matmul(qc, pre[:n, :, dv:])[..., 0] + xp.sum(scores, axis=-1)
        # max |prefix| per chunk, by two reductions (an abs would write a copy)
        bound = xp.maximum(xp.max(pre[:n], axis=(1, 2)), -xp.min(pre[:n], axis=(1, 2)))[:, None]
        ok = differentiable(xp, den, bound)  # the rows that pass a gradient
        gh = self.buffer("gh", rows * group, e, qf).reshape(n, cg, e)
        gc = g.reshape(n, cg, dv)
        gh[..., :dv] = gc
        gh[..., dv] = -xp.sum(gc * out.reshape(n, cg, dv), axis=-1)
        lib.fill_where(den, ~ok, 1.0)
        native.reciprocal(den, out=den)
        lib.fill_where(den, ~ok, 0.0)
        gh *= den[..., None]
        mixed = lib.bmm(gh, xp.matrix_transpose(vc), buf("mixed", chunk, cg))
        lib.zero_future(mixed, group)
        suffix = self.buffer("suffix", (n + 1) * m, e, qf).reshape(n + 1, m, e)
        lib.bmm(xp.matrix_transpose(qc), gh, suffix[:n])
        suffix[n] = 0.0 if dkv is None else dkv
        back = list(suffix)  # suffix[c] becomes R_>c after the chunk's own contribution
        for i in range(n - 1, -1, -1):
            back[i] += back[i + 1]
        before = xp.asarray(suffix[0], copy=True)
        # R_>c: the sums after chunk c, i.e. suffix[c + 1]
        after = suffix[1:]
        dq = lib.bmm(gh, xp.matrix_transpose(pre[:n]), buf("dq", m, cg))
        lib.add_product(dq, mixed, kc, buf("tq", m, cg))
        dk = lib.bmm(vc, xp.matrix_transpose(after), buf("dk", m, chunk))
        lib.add_product(dk, xp.matrix_transpose(mixed), qc, buf("tq", m, chunk))
        dvc = lib.bmm(kc, after[..., :dv], buf("dvc", dv, chunk))
        lib.add_product(dvc, xp.matrix_transpose(scores), gh[..., :dv], buf("tv", dv, chunk))
        native.multiply(dq, qc, out=dq)
        native.multiply(dk, kc, out=dk)
        dx = form.query_grad(xp, x, dq.reshape(rows * group, m))
        dy = form.key_grad(xp, y if keep is None else xp.where(keep, y, 0.0), dk.reshape(rows, m))
        dvv = dvc.reshape(rows, dv)
        if keep is not None:
            lib.fill_where(dy, ~keep, 0.0)
            lib.fill_where(dvv, ~keep, 0.0)
        return dx, dy, dvv, before

    def scores(self, qc: Any, kc: Any, out: Any) -> bool:
        """The chunks' scores ``qc kc^T`` into ``out``; whether any result was flushed to
        zero (then :meth:`rescore` runs)."""
        self.lib.bmm(qc, self.lib.xp.matrix_transpose(kc), out)
        return False

    def rescore(self, qc: Any, kc: Any, vc: Any, pre: Any, oc: Any) -> None:
        """Recompute the rows that a flush in :meth:`scores` may have changed."""

    # -- work items -----------------------------------------------------------------------

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """The items on :attr:`workers` threads: the caller's and threads started for
        this call and joined before it returns, each with a workspace of buffers."""
        n = min(self.workers, len(items))
        if n <= 1:
            return self._spaces.run(lambda: [fn(i) for i in items])  # type: ignore[no-any-return]
        results: list[Any] = [None] * len(items)
        failures: list[BaseException] = []
        counter, stop = itertools.count(), threading.Event()

        def work() -> None:
            try:
                while not stop.is_set() and (i := next(counter)) < len(items):
                    results[i] = fn(items[i])
            except BaseException as exc:  # noqa: BLE001 (re-raised in the caller)
                failures.append(exc)
                stop.set()

        threads = [
            threading.Thread(target=self._spaces.run, args=(work,), name="favorcore", daemon=True)
            for _ in range(n - 1)
        ]
        try:
            for t in threads:
                t.start()
            self._spaces.run(work)
        finally:
            _join(threads, stop)
        if failures:  # an interrupt first, then the first error
            raise min(failures, key=lambda e: isinstance(e, Exception))
        return results


def _join(threads: list[threading.Thread], stop: threading.Event) -> None:
    """Join every started thread, even through an interrupt (re-raised after)."""
    interrupted: BaseException | None = None
    for t in threads:
        while t.ident is not None and t.is_alive():
            try:
                t.join()
            except BaseException as exc:  # noqa: BLE001, PERF203 (an interrupt: stop, still join)
                stop.set()
                interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted


def _host(a: Any) -> Any:
    """A host (NumPy) view or copy of a small array of either framework."""
    return a if isinstance(a, np.ndarray) else a.detach().cpu().numpy()
