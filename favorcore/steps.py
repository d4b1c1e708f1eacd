r"""The engine's contract: the whole operations a backend may do faster.

:func:`favorcore.favor_attention` checks its arguments, resolves its configuration,
computes the statistics it needs and asks the feature map for its
:class:`~favorcore.features.Form` of the call. The schedule then cuts the rows into
blocks and work items and runs on them the five operations of a :class:`Steps`:

1. :meth:`Steps.keys`: the features of a block of keys, masked rows zero;
2. :meth:`Steps.key_sums`: their sums ``phi(K_b)^T [V_b | 1]``;
3. :meth:`Steps.answer`: a block of queries answered from the sums of every key, normalised;
4. :meth:`Steps.causal`: a causal block, its queries against the state before it and its
   own keys, normalised, and the state after it;
5. :meth:`Steps.map`: the work items, in order or concurrently.

The methods of :class:`Steps` use only the standard; they run for every namespace whose
adapter registers nothing (array-api-strict, CuPy, JAX with its own block settings). An
adapter subclasses :class:`Steps`, overrides an operation *whole* (the same result,
computed faster: in place, into buffers, on several cores) from the form's fields, and
registers an instance for its namespace with :func:`register_steps`. The core finds it the
first time it meets that namespace, by importing the adapter module named for it (the
framework is already imported, since the caller's arrays belong to it).

Examples
--------
A backend that counts its blocks of keys:

>>> import numpy as np
>>> import favorcore as fc
>>> from favorcore.steps import Steps, namespace_of, register_steps, steps_for
>>> class Counting(Steps):
...     seen = 0
...     def keys(self, xp, form, y, v, keep):
...         self.seen += 1
...         return super().keys(xp, form, y, v, keep)
>>> q = np.ones((2, 1000, 8)) / 4
>>> before = steps_for(namespace_of(q))
>>> counting = Counting(block=256, vectorized=False)
>>> register_steps("array_api_compat.numpy", counting)
>>> _ = fc.favor_attention(q, q, q, features=fc.PositiveFeatures(m=16, seed=0))
>>> counting.seen  # 4 blocks of keys in each of 2 batch rows
8
>>> register_steps("array_api_compat.numpy", before)
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

from ._compat import Array, device, namespace, stop_gradient
from ._schedule import Call, backward, forward
from .features import Form

__all__ = [
    "Call",
    "Steps",
    "backward",
    "causal_sums",
    "differentiable",
    "fast_paths",
    "forward",
    "lower_mask",
    "namespace_of",
    "normalise",
    "register_steps",
    "steps_for",
    "with_ones",
]


def with_ones(xp: ModuleType, v: Array) -> Array:
    """``[v | 1]``: the normaliser comes out of the same products as the numerator."""
    return xp.concat([v, xp.ones((*v.shape[:-1], 1), dtype=v.dtype, device=device(v))], axis=-1)


def differentiable(xp: ModuleType, den: Array, bound: Array) -> Array:
    """The rows whose gradient is computed: where the normaliser ``D`` is so small that a
    gradient would overflow (``D <= sqrt(smallest normal)``, or ``D <= bound 1e4 / max
    float`` with ``bound`` the largest entry of the key sums the row was answered from)
    the row keeps its value but passes no gradient, instead of ``inf * 0 = NaN``."""
    info = xp.finfo(den.dtype)
    return (den > math.sqrt(float(info.smallest_normal))) & (den > bound * (1e4 / float(info.max)))


def normalise(xp: ModuleType, o: Array, kv: Array) -> tuple[Array, Array]:
    """``(o[..., :dv] / o[..., dv:], small)`` for ``o = phi(Q) [S | z]``, ``kv = [S | z]``.

    ``small`` ``(..., rows, 1)`` marks the rows whose normaliser ``D`` is at most the
    smallest normal number of the dtype (no valid key, every feature product underflowed,
    or a trigonometric estimate <= 0): their result is 0. NaN (from NaN inputs with
    ``check_finite=False``) stays NaN.

    Under autodiff the division is ``(num / c) / (D / c)`` with ``c = D`` held constant:
    the same value and gradient, but the backward pass never forms ``D**2`` (which
    underflows to 0 and turns gradients into inf/NaN when ``D`` is small); rows whose
    gradient would overflow pass none (:func:`differentiable`).
    """
    dv = kv.shape[-1] - 1
    num, den = o[..., :dv], o[..., dv:]
    ok = den > float(xp.finfo(den.dtype).smallest_normal)
    safe = xp.where(ok, den, 1.0)  # no 0/0 even in the branch where() discards
    c = stop_gradient(xp, safe)
    value = (num / c) / (safe / c)
    bound = stop_gradient(xp, xp.max(xp.abs(kv), axis=(-2, -1), keepdims=True))
    value = xp.where(differentiable(xp, den, bound), value, stop_gradient(xp, value))
    return xp.where(ok | xp.isnan(den), value, 0.0), ~(ok | xp.isnan(den))


def _cotangent(xp: ModuleType, den: Array, out: Array, g: Array, kv: Array) -> Array:
    """``g^ = [g ; -(g . out)] / D`` per row; 0 for the rows whose result was set to 0 (a
    constant) and those that pass no gradient (:func:`differentiable`, ``kv`` the key
    sums they were answered from)."""
    bound = xp.max(xp.abs(kv), axis=(-2, -1), keepdims=True)
    while bound.ndim < den.ndim:
        bound = bound[..., None, :, :]
    ok = differentiable(xp, den, bound)
    inv = xp.where(ok, 1.0 / xp.where(ok, den, 1.0), 0.0)
    return xp.concat([g, -xp.sum(g * out, axis=-1, keepdims=True)], axis=-1) * inv


def lower_mask(xp: ModuleType, chunk: int, group: int, like: Array, strict: bool = False) -> Array:
    """``(chunk group, chunk)`` boolean: query row ``r`` (of position ``r // group``: the
    ``group`` query heads of a key head, interleaved) may see key ``j`` (``j <= r // group``;
    ``strict``: ``j < r // group``)."""
    pos_q = xp.arange(chunk * group, device=device(like)) // group
    pos_k = xp.arange(chunk, device=device(like))[None, :]
    return pos_q[:, None] > pos_k if strict else pos_q[:, None] >= pos_k


def causal_sums(
    xp: ModuleType, qf: Array, kf: Array, v1: Array, kv0: Array | None, c: int,
    resets: Array | None = None, strict: bool = False,
) -> tuple[Array, Array]:  # fmt: skip
    """Unnormalised causal linear attention over ``n`` chunks of ``c`` rows: ``(o, kv)``.

    Per chunk ``i``: ``o_i = phi(Q_i) S_<i + tril(phi(Q_i) phi(K_i)^T) [V_i | 1]``, where
    ``S_<i`` is ``kv0`` plus the sums ``phi(K_j)^T [V_j | 1]`` of the chunks before it (one
    exclusive ``cumulative_sum``); ``kv`` is the state after the last chunk. ``v1`` is
    ``[V | 1]``; the keys' rows are ``n c`` exactly, the queries' ``n c G`` for ``G``
    query heads per key head (grouped-query attention: their rows interleaved by position).

    ``resets`` (``(..., n c, 1)`` boolean, or None) marks the positions where a document
    starts (packed sequences whose boundaries are not known when the program is built): a
    row sees only the keys of its own document, ``S_<i`` is the sums of the chunks before
    ``i`` in the document of its first row (a scan over the chunks that restarts at a
    document's start, never a subtraction), and ``kv`` the sums of the last document.
    ``strict``: a row sees only the keys before its own position.
    """
    batch, rows, m = kf.shape[:-2], kf.shape[-2], kf.shape[-1]
    n, e, group = rows // c, v1.shape[-1], qf.shape[-2] // max(rows, 1)
    qc = xp.reshape(qf, (*qf.shape[:-2], n, c * group, m))
    kc = xp.reshape(kf, (*batch, n, c, m))
    vc = xp.reshape(v1, (*batch, n, c, e))
    lower = lower_mask(xp, c, group, qf, strict)
    if resets is not None:
        return _document_sums(xp, qc, kc, vc, kv0, lower, resets, qf.shape[-2])
    sums = xp.cumulative_sum(xp.matrix_transpose(kc) @ vc, axis=-3, include_initial=True)
    prefix, total = sums[..., :n, :, :], sums[..., n, :, :]
    if kv0 is not None:
        prefix, total = prefix + kv0[..., None, :, :], total + kv0
    scores = xp.where(lower, qc @ xp.matrix_transpose(kc), 0.0)
    o = qc @ prefix + scores @ vc
    return xp.reshape(o, (*o.shape[:-3], qf.shape[-2], e)), total


def _document_sums(
    xp: ModuleType, qc: Array, kc: Array, vc: Array, kv0: Array | None, lower: Array,
    resets: Array, q_rows: int,
) -> tuple[Array, Array]:  # fmt: skip
    """:func:`causal_sums` of chunks ``qc``, ``kc``, ``vc`` within the documents that start
    where ``resets``."""
    *batch, n, c, m = kc.shape
    e, group = vc.shape[-1], qc.shape[-2] // c
    # each position's document, numbered from 0 (the document that continues kv0) in the block
    doc = xp.cumulative_sum(xp.astype(xp.reshape(resets, (*batch, n * c)), xp.int32), axis=-1)
    dk = xp.reshape(doc, (*batch, n, c))
    dq = xp.reshape(xp.broadcast_to(dk[..., None], (*batch, n, c, group)), (*batch, n, c * group))
    head, tail = dk[..., :1], dk[..., -1:]  # the documents of each chunk's first and last rows
    same = lower & (dq[..., :, None] == dk[..., None, :])
    scores = xp.where(same, qc @ xp.matrix_transpose(kc), 0.0)
    # the sums of each chunk's keys in its last row's document, which the next chunk
    # continues when its first row is in that document: S_<i+1 = keep_i S_<i + add_i, so
    # S_<i = [no break before i] S_<0 + sum_{j < i} [no break from j + 1 to i] add_j
    tails = xp.matrix_transpose(kc) @ xp.where((dk == tail)[..., None], vc, 0.0)
    goes_on = xp.concat([dk[..., 1:, :1] == tail[..., :-1, :],
                         xp.ones_like(tail[..., :1, :], dtype=xp.bool)], axis=-2)  # fmt: skip
    add = xp.reshape(xp.where(goes_on[..., None], tails, 0.0), (*batch, n, m * e))
    broken = xp.astype(~((head == tail) & goes_on)[..., 0], xp.int32)
    breaks = xp.cumulative_sum(broken, axis=-1, include_initial=True)  # (..., n + 1)
    order = xp.arange(n + 1, device=device(kc))
    reach = (order[None, :-1] < order[:, None]) & (breaks[..., :, None] == breaks[..., None, 1:])
    states = xp.reshape(xp.astype(reach, kc.dtype) @ add, (*batch, n + 1, m, e))
    if kv0 is not None:  # kv0 continues the document of the block's first row
        start = xp.where((head[..., 0, :] == 0)[..., None], kv0, 0.0)
        states = states + xp.where((breaks == 0)[..., None, None], start[..., None, :, :], 0.0)
    sees = (dq == head)[..., None]  # rows in the document of their chunk's first row
    o = xp.where(sees, qc @ states[..., :n, :, :], 0.0) + scores @ vc
    return xp.reshape(o, (*batch, q_rows, e)), states[..., n, :, :]


class Steps:
    """The operations of the engine; these defaults use only the standard.

    Blocks are ``(rows, d)`` arrays of one batch row (``vectorized=False``, what eager
    adapters' operations take) or ``(n_rows, rows, d)`` arrays of every batch row at once
    (the default: one copy of the block computation per block, e.g. in a traced JAX
    program). A form given to an operation is the call's form (vectorized) or its batch
    row's (:meth:`~favorcore.features.Form.select`).

    Parameters
    ----------
    block : int
        Rows per block (:meth:`block_size`).
    chunk : int
        Chunk length of causal attention when the caller gives none.
    vectorized : bool
        Blocks hold every batch row at once.
    max_blocks : int or None
        At most this many blocks per sequence (longer blocks instead).
    """

    #: work items run concurrently by :meth:`map` (the schedule splits long sequences
    #: into this many segments when there are fewer batch rows)
    workers: int = 1

    def __init__(
        self,
        *,
        block: int = 4096,
        chunk: int = 128,
        vectorized: bool = True,
        max_blocks: int | None = None,
    ) -> None:
        self.block, self.chunk, self.vectorized, self.max_blocks = (
            block, chunk, vectorized, max_blocks,
        )  # fmt: skip

    def block_size(self, length: int, causal: bool) -> int:
        """Rows per block for a sequence of ``length`` rows."""
        if self.max_blocks is None:
            return self.block
        return max(self.block, -(-length // self.max_blocks))

    def blocks(self, x: Array, lo: int, hi: int, chunk: int | None) -> list[tuple[int, int]]:
        """The blocks ``[(start, end), ...]`` of rows ``lo:hi`` of ``x`` (``(..., L, d)``):
        of :meth:`block_size` rows, a multiple of ``chunk`` in causal calls."""
        size = max(1, self.block_size(x.shape[-2], chunk is not None))
        if chunk is not None:
            size = -(-size // chunk) * chunk
        return [(s, min(s + size, hi)) for s in range(lo, hi, size)]

    def run(self, call: Call) -> tuple[Array, Array, Array]:
        """The whole call: ``(out, kv, small)`` of :func:`forward`. An adapter whose
        framework differentiates wires the backward pass here (:func:`backward`)."""
        out, kv, small, _ = forward(call)
        return out, kv, small

    def output(self, xp: ModuleType, shape: tuple[int, ...], like: Array) -> Array | None:
        """An array (``like``'s dtype and device) that :meth:`answer` and :meth:`causal`
        fill through their ``out``, or None: their results are joined."""
        return None

    # -- the operations -------------------------------------------------------------------

    def keys(
        self, xp: ModuleType, form: Form, y: Array, v: Array, keep: Array | None
    ) -> tuple[Array, Array]:
        """``(phi(K_b), V_b)`` of a block of keys ``y`` and values ``v``; the rows where
        ``keep`` (``(..., rows, 1)`` boolean, or None) is False are zero in both, whatever
        they held (NaN included). The arrays may be buffers the next call reuses."""
        if keep is not None:
            y, v = xp.where(keep, y, 0.0), xp.where(keep, v, 0.0)
        kf = form.keys(xp, y)
        return (kf if keep is None else xp.where(keep, kf, 0.0)), v

    def key_sums(self, xp: ModuleType, kf: Array, v: Array) -> Array:
        """``phi(K_b)^T [V_b | 1]``, ``(..., m, dv + 1)`` (a new array)."""
        return xp.matrix_transpose(kf) @ with_ones(xp, v)

    def answer(
        self, xp: ModuleType, form: Form, x: Array, kv: Array, out: Array | None,
        kept: list[Array] | None = None,
    ) -> tuple[Array, Array]:  # fmt: skip
        """The queries ``x`` of a block answered from the key sums ``kv``:
        ``(result, small)`` as :func:`normalise` (``result`` is ``out`` when given). With
        ``kept`` (a list), the block's query features and normalisers ``(rows, 1)`` are
        appended to it, arrays the caller may hold (for :meth:`answer_grad`)."""
        qf = form.queries(xp, x)
        o = qf @ kv
        if kept is not None:
            kept += [qf, o[..., -1:]]
        return normalise(xp, o, kv)

    def causal(
        self, xp: ModuleType, form: Form, x: Array, kf: Array, v: Array, kv0: Array | None,
        chunk: int, out: Array | None, resets: Array | None = None,
    ) -> tuple[Array, Array, Array]:  # fmt: skip
        """A causal block of ``n`` chunks of ``chunk`` key rows (key features ``kf`` and
        values ``v`` from :meth:`keys`; queries ``x``, ``G`` rows per key row for ``G``
        query heads per key head, interleaved) after the state ``kv0`` (None: none):
        ``(result, small, kv)`` with ``kv`` the state after the block (a new array).
        ``resets`` (``(rows, 1)`` boolean, or None) marks where documents start, in packed
        sequences whose boundaries are traced (:func:`causal_sums`)."""
        o, kv = causal_sums(xp, form.queries(xp, x), kf, with_ones(xp, v), kv0, chunk, resets)
        result, small = normalise(xp, o, kv)
        return result, small, kv

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """``[fn(i) for i in items]``, possibly concurrently."""
        return [fn(i) for i in items]

    # -- the backward pass: the same blocks, in reverse where causal ----------------------

    def answer_grad(
        self, xp: ModuleType, form: Form, x: Array, kv: Array, out: Array, g: Array,
        qf: Array | None = None, den: Array | None = None,
    ) -> tuple[Array, Array]:  # fmt: skip
        """The backward of :meth:`answer`: ``(dx, dkv)`` from the output's cotangent ``g``
        (``qf``, ``den``: the block's features and normalisers as :meth:`answer` kept
        them; None: recomputed).

        With ``g^ = [g ; -(g . out)] / D`` per row (0 where the normaliser was too small):
        ``dphi = g^ kv^T``, ``dkv = phi(Q_b)^T g^``, and ``dx`` through the features.
        """
        if qf is None:
            qf, den = form.queries(xp, x), None
        gh = _cotangent(xp, qf @ kv[..., -1:] if den is None else den, out, g, kv)
        return form.query_grad(xp, x, (gh @ xp.matrix_transpose(kv)) * qf), xp.matrix_transpose(
            qf
        ) @ gh

    def keys_grad(
        self, xp: ModuleType, form: Form, y: Array, v: Array, keep: Array | None, dkv: Array,
        kf: Array | None = None,
    ) -> tuple[Array, Array]:  # fmt: skip
        """The backward of :meth:`keys` and :meth:`key_sums`: ``(dy, dv)`` from the sums'
        cotangent ``dkv``: ``dphi(K_b) = [V_b | 1] dkv^T``, ``dV_b = phi(K_b) dkv[:, :dv]``;
        masked rows get 0. ``kf``: the block's features as :meth:`keys` gave them (None:
        recomputed)."""
        if keep is not None:
            y, v = xp.where(keep, y, 0.0), xp.where(keep, v, 0.0)
        if kf is None:
            kf = form.keys(xp, y)
            if keep is not None:
                kf = xp.where(keep, kf, 0.0)
        dv = kf @ dkv[..., :-1]
        dy = form.key_grad(xp, y, (with_ones(xp, v) @ xp.matrix_transpose(dkv)) * kf)
        if keep is not None:
            dy = xp.where(keep, dy, 0.0)
        return dy, dv

    def causal_grad(
        self, xp: ModuleType, form: Form, x: Array, y: Array, v: Array, keep: Array | None,
        kv0: Array | None, out: Array, g: Array, dkv: Array | None, chunk: int,
    ) -> tuple[Array, Array, Array, Array]:  # fmt: skip
        """The backward of a causal piece (``n`` chunks of ``chunk`` key rows, and ``G`` times
        as many query rows, after the state ``kv0``, :meth:`keys` and :meth:`causal`
        together), given its output's cotangent
        ``g`` and the cotangent ``dkv`` of the state after it (None: 0): ``(dx, dy, dv,
        dkv before it)``.

        A reverse chunked scan: the chunks' prefixes ``S_<c`` are recomputed from ``kv0``
        (as the forward), the suffixes ``R_>c = dkv + sum_{c' > c} phi(Q_c')^T g^_c'`` summed
        from the end; never a subtraction from a total. Per chunk, ``dphi(Q) = g^ S_<c^T +
        tril(g^ [V | 1]^T) phi(K)``, ``dphi(K) = [V | 1] R_>c^T + tril(g^ [V | 1]^T)^T
        phi(Q)`` and ``dV = phi(K) R_>c[:, :dv] + tril(phi(Q) phi(K)^T)^T g^[:, :dv]``.
        """
        if keep is not None:
            y, v = xp.where(keep, y, 0.0), xp.where(keep, v, 0.0)
        qf, kf = form.queries(xp, x), form.keys(xp, y)
        if keep is not None:
            kf = xp.where(keep, kf, 0.0)
        rows, m = kf.shape[-2], kf.shape[-1]
        n, v1, group = rows // chunk, with_ones(xp, v), qf.shape[-2] // max(rows, 1)
        e = v1.shape[-1]

        def chunked(a: Array, width: int) -> Array:  # (..., n, chunk (G), width)
            return xp.reshape(a, (*a.shape[:-2], n, a.shape[-2] // n, width))

        qc, kc, vc = chunked(qf, m), chunked(kf, m), chunked(v1, e)
        sums = xp.matrix_transpose(kc) @ vc
        pre = xp.cumulative_sum(sums, axis=-3, include_initial=True)[..., :n, :, :]
        if kv0 is not None:
            pre = pre + kv0[..., None, :, :]
        lower = lower_mask(xp, chunk, group, qf)
        scores = xp.where(lower, qc @ xp.matrix_transpose(kc), 0.0)
        den = qc @ pre[..., e - 1 :] + xp.sum(scores, axis=-1, keepdims=True)
        oc, gc = chunked(out, out.shape[-1]), chunked(g, g.shape[-1])
        gh = _cotangent(xp, den, oc, gc, pre)
        mixed = xp.where(lower, gh @ xp.matrix_transpose(vc), 0.0)  # (g^_i . v1_j), j <= i
        contrib = xp.matrix_transpose(qc) @ gh
        total = xp.cumulative_sum(xp.flip(contrib, axis=-3), axis=-3, include_initial=True)
        suffix = xp.flip(total[..., :n, :, :], axis=-3)  # R_>c, without dkv
        before = total[..., n, :, :]
        if dkv is not None:
            suffix, before = suffix + dkv[..., None, :, :], before + dkv
        dq = gh @ xp.matrix_transpose(pre) + mixed @ kc
        dk = vc @ xp.matrix_transpose(suffix) + xp.matrix_transpose(mixed) @ qc
        dvc = kc @ suffix[..., : e - 1] + xp.matrix_transpose(scores) @ gh[..., : e - 1]

        def flat(a: Array) -> Array:
            return xp.reshape(a, (*a.shape[:-3], a.shape[-3] * a.shape[-2], a.shape[-1]))

        dx = form.query_grad(xp, x, flat(dq) * qf)
        dy = form.key_grad(xp, y, flat(dk) * kf)
        dv = flat(dvc)
        if keep is not None:
            dy, dv = xp.where(keep, dy, 0.0), xp.where(keep, dv, 0.0)
        return dx, dy, dv, before


# -- registration ---------------------------------------------------------------------------

#: namespace name (as array-api-compat names it) -> adapter module that registers steps
_ADAPTERS = {
    "array_api_compat.numpy": "favorcore_backends.numpy",
    "numpy": "favorcore_backends.numpy",
    "array_api_compat.torch": "favorcore_backends._torch_steps",
    "jax.numpy": "favorcore_backends.jax",
    "array_api_compat.dask.array": "favorcore_backends.dask",
}

_STANDARD = Steps()
_REGISTERED: dict[str, Steps] = {}
_MET: set[str] = set()
_LOCK = threading.Lock()
_STATE = threading.local()


def register_steps(namespace_name: str, steps: Steps) -> None:
    """Use ``steps`` for arrays of the namespace ``namespace_name`` (``xp.__name__`` of
    array-api-compat's namespace, e.g. ``"array_api_compat.numpy"``)."""
    if not isinstance(steps, Steps):
        raise TypeError(f"steps must be a favorcore.steps.Steps, got {type(steps).__name__}")
    _REGISTERED[namespace_name] = steps


def namespace_of(*arrays: Array) -> ModuleType:
    """The Array API namespace of ``arrays`` (as the engine sees it)."""
    return namespace(**{f"array{i}": a for i, a in enumerate(arrays)})


def steps_for(xp: ModuleType) -> Steps:
    """The steps registered for ``xp`` (its adapter imported on first use), else the
    standard ones; the standard ones inside :func:`fast_paths` ``(False)``."""
    if not getattr(_STATE, "enabled", True):
        return _STANDARD
    name = xp.__name__
    if name not in _MET:
        with _LOCK:
            if name not in _MET:
                module = _ADAPTERS.get(name)
                if module is not None:
                    with contextlib.suppress(ImportError):
                        importlib.import_module(module)
                _MET.add(name)
    return _REGISTERED.get(name, _STANDARD)


@contextlib.contextmanager
def fast_paths(enabled: bool) -> Iterator[None]:
    """Use the adapters' registered steps (the default) or, with ``False``, the standard
    ones, in this thread (tests, benchmarks).

    >>> import favorcore
    >>> with favorcore.fast_paths(False):
    ...     pass  # favorcore.favor_attention runs the standard steps here
    """
    before = getattr(_STATE, "enabled", True)
    _STATE.enabled = enabled
    try:
        yield
    finally:
        _STATE.enabled = before


def _after_fork_in_child() -> None:  # a lock held by a parent's thread at fork stays held
    global _LOCK
    _LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
