r"""Random-feature maps phi whose inner products estimate attention kernels.

Every map is a small immutable object that holds its seed (and so its host projection)
and maps queries and keys **together**: ``qf, kf = fmap(x, y, key_mask=...)``. The
attention functions pass the *scaled* rows ``x = sqrt(scale) q`` and
``y = sqrt(scale) k``, so that the softmax-kernel maps estimate ``exp(x . y)``.

A map tells the engine what it is (:attr:`FeatureMap.positive`,
:attr:`FeatureMap.softmax`, :attr:`FeatureMap.data_dependent`, :meth:`FeatureMap.causal_form`)
and gives, for one call, its :class:`Form`: how to compute the features of any block of
query rows and of key rows. The positive maps (FAVOR+, hyperbolic, FAVOR++) give an
:class:`Exponent`, the one place where their stabilised exponent is derived; the other maps
give their row features (:meth:`FeatureMap.query_features`, :meth:`FeatureMap.key_features`).

Queries and keys get different stabilisers:

* a query row may be multiplied by any positive constant, since it appears in both the
  numerator and the denominator of its attention output; the maps use the per-row max.
* a key row may not: a per-key or per-chunk data-dependent shift biases the estimate or
  leaks the future in causal attention. The positive maps therefore move a
  *data-independent* per-feature constant ``c_i`` from the key side to the query side:
  ``w_i . y - |y|^2/2 - c_i <= |w_i|^2/2 - c_i``, and ``c_i = max(0, |w_i|^2/2 - B)``
  bounds every key feature by ``exp(B)`` whatever ``y`` is (``B`` is half the log of the
  largest finite number of the compute dtype, less 4). With ``c_i = |w_i|^2/2`` this is the
  split whose key factor is ``exp(-|y - w_i|^2/2) <= 1``; the smaller constant keeps key
  features of ordinary inputs far from underflow when ``d`` is large.

``fmap.phi(x)`` returns the unstabilised features, whose inner products are the kernel
estimates themselves (for kernel use and for tests of unbiasedness).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from ._compat import (
    Array,
    compute_dtype,
    device,
    from_host,
    is_eager,
    is_floating,
    is_tracer,
    namespace,
    row_mean,
    stop_gradient,
)
from .projection import NORM_KINDS, PROJECTION_KINDS, NormKind, ProjectionKind, draw_projection

if TYPE_CHECKING:
    from .balance import Balance

__all__ = [
    "AccuracyWarning",
    "Exponent",
    "FeatureMap",
    "Form",
    "GeneralizedFeatures",
    "OptimalPositiveFeatures",
    "PositiveFeatures",
    "RowForm",
    "TrigonometricFeatures",
    "hyperbolic_features",
]

_CACHE_SIZE = 8


class AccuracyWarning(UserWarning):
    """An estimate favorcore computed is known to be inaccurate (e.g. a normaliser <= 0)."""


# -- forms: the features of one call, block by block ----------------------------------------


def _flatten(a: Array | None, batch: tuple[int, ...], tail: int) -> Array | None:
    """``a`` of shape ``lead + tail dims`` (lead ``()`` or broadcasting to ``batch``) as
    ``(n_rows,) + tail dims``, or unchanged when it has no lead."""
    if a is None or a.ndim == tail:
        return a
    xp = namespace(a=a)
    shape = tuple(a.shape[-tail:])
    return xp.reshape(xp.broadcast_to(a, (*batch, *shape)), (math.prod(batch), *shape))


def _pick(a: Array | None, r: int) -> Array | None:
    """Row ``r`` of a flattened ``(n_rows, ...)`` array (or the array itself when it has
    one row for all, or no lead)."""
    if a is None or a.ndim <= 2:
        return a
    return a[r % a.shape[0], ...]


def _stacked(xp: ModuleType, parts: list[Array]) -> Array:
    """``parts`` (``lead + (rows_i, m)``, leads broadcasting) stacked along the rows."""
    lead = np.broadcast_shapes(*(tuple(p.shape[:-2]) for p in parts))
    return xp.concat([xp.broadcast_to(p, (*lead, *p.shape[-2:])) for p in parts], axis=-2)


def _with_column(xp: ModuleType, x: Array, first: Array | None) -> Array:
    """``[x, first, 1]`` (``[x, 1]`` without ``first``): rows ``x`` with the columns
    that meet the bias rows of :meth:`Exponent.query_matrix` and :meth:`Exponent.key_matrix`."""
    ones = xp.ones((*x.shape[:-1], 1), dtype=x.dtype, device=device(x))
    return xp.concat([x, ones] if first is None else [x, first, ones], axis=-1)


class Form:
    """How one call computes features of blocks of rows: the engine's view of a map.

    ``x`` and ``y`` are the call's rows as they come in (unscaled, in the compute dtype):
    the form applies the scale, the balance and the map. A form's arrays have no leading
    dimension (one for every row), the call's batch dimensions, or, after
    :meth:`flatten`, one ``n_rows`` dimension; :meth:`select` picks one batch row's.
    """

    def queries(self, xp: ModuleType, x: Array) -> Array:
        """Stabilised features of query rows ``x`` (``(..., rows, d)``)."""
        raise NotImplementedError

    def keys(self, xp: ModuleType, y: Array) -> Array:
        """Stabilised features of key rows ``y`` (``(..., rows, d)``)."""
        raise NotImplementedError

    def query_grad(self, xp: ModuleType, x: Array, de: Array) -> Array:
        """The cotangent of query rows ``x`` given ``de = dphi * phi`` of their features
        (only forms whose features are ``exp`` of the rows' exponents have one)."""
        raise NotImplementedError(f"{type(self).__name__} has no gradient formula")

    def key_grad(self, xp: ModuleType, y: Array, de: Array) -> Array:
        """The cotangent of key rows ``y`` given ``de = dphi * phi`` of their features."""
        raise NotImplementedError(f"{type(self).__name__} has no gradient formula")

    def flatten(self, batch: tuple[int, ...]) -> Form:
        """The form with its batch dimensions flattened to one (``n_rows``)."""
        raise NotImplementedError

    def select(self, r: int) -> Form:
        """The form of batch row ``r`` of a flattened form (2-D blocks)."""
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class Exponent(Form):
    r"""The exponent form of a positive map: every feature is ``exp`` of an affine map.

    Queries: ``phi(Q) = exp(e - max_row e)`` with ``e = x @ query + query_bias``; keys, with
    ``k' = y`` or, balanced, ``k' = y @ transform - shift``:
    ``phi(K) = exp(k' @ key + key_bias - half |k'|^2)``. For a map with rows ``w``
    (``[W; -W]`` for antithetic maps), ``A`` (0 for FAVOR+), ``b = sqrt(1 - 4A)``,
    ``s = sqrt(scale)`` and the balance ``M``, ``M^-T``, ``c``:

    =============  ======================================  ==============================
    field          balanced                                 not balanced
    =============  ======================================  ==============================
    ``query``      ``s M b W^T``                            ``s b W^T``
    ``key``        ``b W^T``                                ``s b W^T``
    ``half``       ``1/2``                                  ``s^2 / 2``
    ``transform``  ``s M^-T``                               None
    ``shift``      ``c``                                    None
    =============  ======================================  ==============================

    ``query_bias = A |w|^2 + o`` and ``key_bias = A |w|^2 - o - log(m) / 2`` with the
    data-independent offset ``o = max(0, top - B)`` (module docstring). Each exponent
    comes out of one product with :meth:`query_matrix` or :meth:`key_matrix` (the fields
    and the biases stacked); adapters compute the same features faster from those
    matrices, and :attr:`memo` keeps what is derived from the fields once per call.
    """

    query: Array  # lead + (d, m)
    query_bias: Array  # lead + (1, m)
    key: Array  # lead + (d, m)
    key_bias: Array  # lead + (1, m)
    half: float
    transform: Array | None = None  # lead + (d, d)
    shift: Array | None = None  # lead + (1, d)
    memo: dict[str, Any] = field(default_factory=dict, repr=False)

    def query_matrix(self, xp: ModuleType) -> Array:
        """``[query; query_bias]``, ``lead + (d + 1, m)``: the queries' exponents are
        ``[x, 1] @`` it, one product (no second pass over the block adding the bias)."""
        if "query_matrix" not in self.memo:
            self.memo["query_matrix"] = _stacked(xp, [self.query, self.query_bias])
        matrix: Array = self.memo["query_matrix"]
        return matrix

    def key_matrix(self, xp: ModuleType) -> Array:
        """``[key; 1; key_bias]``, ``lead + (d + 2, m)``: the keys' exponents are
        ``[k', -half |k'|^2, 1] @`` it, one product."""
        if "key_matrix" not in self.memo:
            ones = xp.ones(self.key_bias.shape, dtype=self.key_bias.dtype,
                           device=device(self.key_bias))  # fmt: skip
            self.memo["key_matrix"] = _stacked(xp, [self.key, ones, self.key_bias])
        matrix: Array = self.memo["key_matrix"]
        return matrix

    def queries(self, xp: ModuleType, x: Array) -> Array:
        """``exp(e - max_row e)``, ``e = x @ query + query_bias`` (the max a constant)."""
        e = _with_column(xp, x, None) @ self.query_matrix(xp)
        if x.shape[-2]:  # (Dask cannot reduce an empty axis)
            e = e - stop_gradient(xp, xp.max(e, axis=-1, keepdims=True))
        return xp.exp(e)

    def balanced_keys(self, xp: ModuleType, y: Array) -> Array:
        """``k'``: the rows the key features are computed from."""
        if self.transform is None:
            return y
        assert self.shift is not None
        return y @ self.transform - self.shift

    def keys(self, xp: ModuleType, y: Array) -> Array:
        """``exp(k' @ key + key_bias - half |k'|^2)``: every one at most ``exp(B)``."""
        y = self.balanced_keys(xp, y)
        half_sq = xp.sum(y * y, axis=-1, keepdims=True) * (-self.half)
        return xp.exp(_with_column(xp, y, half_sq) @ self.key_matrix(xp))

    def query_grad(self, xp: ModuleType, x: Array, de: Array) -> Array:
        """``de @ query^T``: the row max (a gradient constant) contributes nothing."""
        return de @ xp.matrix_transpose(self.query)

    def key_grad(self, xp: ModuleType, y: Array, de: Array) -> Array:
        """``dk' = de @ key^T - 2 half k' sum_r de_r``, then ``dk' @ transform^T``."""
        k2 = self.balanced_keys(xp, y)
        dk = de @ xp.matrix_transpose(self.key) - k2 * (
            xp.sum(de, axis=-1, keepdims=True) * (2 * self.half)
        )
        return dk if self.transform is None else dk @ xp.matrix_transpose(self.transform)

    def flatten(self, batch: tuple[int, ...]) -> Exponent:
        def f(a: Array | None) -> Array | None:
            return _flatten(a, batch, 2)

        return Exponent(f(self.query), f(self.query_bias), f(self.key), f(self.key_bias),
                        self.half, f(self.transform), f(self.shift))  # fmt: skip

    def select(self, r: int) -> Exponent:
        if self.query.ndim == 2 and self.key_bias.ndim == 2:
            return self
        row = Exponent(_pick(self.query, r), _pick(self.query_bias, r), _pick(self.key, r),
                       _pick(self.key_bias, r), self.half, _pick(self.transform, r),
                       _pick(self.shift, r))  # fmt: skip
        row.memo["row_of"] = (self, r)  # adapters may derive every row's constants at once
        return row


@dataclass(frozen=True, eq=False)
class RowForm(Form):
    """The form of a map without an exponent: its row features after scale and balance.

    Queries become ``x @ query_transform`` (``sqrt(scale) M``) and keys
    ``y @ key_transform - shift`` (``sqrt(scale) M^-T``, ``c``), or both ``sqrt(scale)``
    times the rows without a balance; then :meth:`FeatureMap.query_features` and
    :meth:`FeatureMap.key_features` map them.
    """

    fmap: FeatureMap
    w: Array | None
    root: float
    query_transform: Array | None = None
    key_transform: Array | None = None
    shift: Array | None = None

    def queries(self, xp: ModuleType, x: Array) -> Array:
        x = x * self.root if self.query_transform is None else x @ self.query_transform
        return self.fmap.query_features(xp, x, self.w)

    def keys(self, xp: ModuleType, y: Array) -> Array:
        if self.key_transform is None:
            y = y * self.root
        else:
            assert self.shift is not None
            y = y @ self.key_transform - self.shift
        return self.fmap.key_features(xp, y, self.w)

    def flatten(self, batch: tuple[int, ...]) -> RowForm:
        return RowForm(self.fmap, self.w, self.root, _flatten(self.query_transform, batch, 2),
                       _flatten(self.key_transform, batch, 2), _flatten(self.shift, batch, 2))  # fmt: skip

    def select(self, r: int) -> RowForm:
        return RowForm(self.fmap, self.w, self.root, _pick(self.query_transform, r),
                       _pick(self.key_transform, r), _pick(self.shift, r))  # fmt: skip


def _key_bound(xp: ModuleType, dtype: Any) -> float:
    """``B``: every positive-map key feature is at most ``exp(B)``."""
    return 0.5 * math.log(float(xp.finfo(dtype).max)) - 4.0


def exponent(
    xp: ModuleType,
    w: Array,
    *,
    root: float,
    a: float | Array = 0.0,
    balance: Balance | None = None,
    stabilise: bool = True,
) -> Exponent:
    r"""The exponent form of the positive features with rows ``w`` (see :class:`Exponent`).

    The one derivation of FAVOR+'s and FAVOR++'s exponent:
    ``A |w|^2 + sqrt(1 - 4A) w . x - |x|^2/2`` per row ``w`` of the projection, with the
    query side's per-row terms dropped (they cancel), the keys' stabilising offset moved to
    the queries and ``m^(-1/2)`` kept on the keys. ``a`` is a float or an array
    ``batch + (1, 1)`` (a gradient constant); ``balance`` folds ``M`` into the queries'
    matrix and becomes the keys' transform. With ``stabilise=False`` the key side is the
    unbiased ``phi`` itself: no offset, and the constant ``(1 - 4A)^(d/4)``.
    """
    dtype, m, d = w.dtype, w.shape[0], w.shape[1]
    sq = xp.sum(w * w, axis=-1)[None, :]  # (1, m)
    if not isinstance(a, float | int):
        a = stop_gradient(xp, xp.astype(a, dtype, copy=False))
    b = (1 - 4 * a) ** 0.5
    bias = a * sq
    if stabilise:
        top = bias + (1 - 4 * a) * sq / 2
        bound = _key_bound(xp, dtype)
        offset = xp.where(top > bound, top - bound, 0.0)
        key_bias = bias - offset - 0.5 * math.log(m)
    else:
        offset = 0.0
        log_a = d / 4 * (math.log(1 - 4 * a) if isinstance(a, float | int) else xp.log(1 - 4 * a))
        key_bias = bias - 0.5 * math.log(m) + log_a
    w_t = xp.matrix_transpose(w) * b  # lead + (d, m)
    if balance is None:
        return Exponent(w_t * root, bias + offset, w_t * root, key_bias, root * root / 2)
    query = xp.astype(balance.query, dtype, copy=False) * root
    key = xp.astype(balance.key, dtype, copy=False) * root
    shift = xp.astype(balance.shift, dtype, copy=False)
    return Exponent(query @ w_t, bias + offset, w_t, key_bias, 0.5, key, shift)


# -- the maps -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class FeatureMap:
    """Base class of the feature maps: seed, projection settings and the q/k interface.

    A new map defines :meth:`query_features` and :meth:`key_features` (stabilised features
    of scaled rows, given the projection; each row on its own) and :meth:`phi`
    (unstabilised features), and says what it is through the properties below; the engine
    then runs it like any other map, block by block, on every backend.

    Parameters
    ----------
    m : int
        Number of feature columns.
    projection : {"iid", "orthogonal", "hadamard", "givens", "simplex"}
        Kind of random projection (see :func:`favorcore.draw_projection`).
    norms : {"chi", "fixed"}
        Row lengths of the projection.
    seed : int or None
        Seed of the host projection; ``None`` draws one at construction, which is then
        kept (and shown in ``repr``) so the map stays deterministic.
    """

    m: int | None = 256
    projection: ProjectionKind = "orthogonal"
    norms: NormKind = "chi"
    seed: int | None = None
    _cache: dict[tuple[Any, ...], Any] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        if self.m is not None and (
            isinstance(self.m, bool) or not isinstance(self.m, int | np.integer) or self.m <= 0
        ):
            raise ValueError(f"m must be a positive integer (feature columns), got {self.m!r}")
        if self.paired and self.m is not None and self.m % 2:
            raise ValueError(
                f"m must be even for {type(self).__name__}: its features come in pairs "
                f"drawn from m/2 projection rows, got m={self.m}"
            )
        if self.projection not in PROJECTION_KINDS:
            raise ValueError(
                f"projection must be one of {PROJECTION_KINDS}, got {self.projection!r}"
            )
        if self.norms not in NORM_KINDS:
            raise ValueError(f"norms must be one of {NORM_KINDS}, got {self.norms!r}")
        if self.seed is None:
            object.__setattr__(self, "seed", int(np.random.SeedSequence().entropy))  # type: ignore[arg-type]
        elif isinstance(self.seed, bool) or not isinstance(self.seed, int | np.integer):
            raise TypeError(f"seed must be an int or None, got {self.seed!r}")

    # -- what the map is (the engine asks these) ------------------------------------------

    @property
    def paired(self) -> bool:
        """True when features come in pairs drawn from one projection row (m must be even)."""
        return False

    @property
    def positive(self) -> bool:
        """True when every feature is positive: a normaliser is then > 0 unless it
        underflowed."""
        return False

    @property
    def softmax(self) -> bool:
        """True when ``phi(x) . phi(y)`` estimates ``exp(x . y)``: the balance (which leaves
        softmax attention unchanged) then applies."""
        return False

    @property
    def data_dependent(self) -> bool:
        """True when the map computes statistics from each call's queries and keys (it can
        then not be used causally or with a state without given statistics)."""
        return False

    def causal_form(self) -> FeatureMap:
        """The map as used where statistics cannot come from the call's tokens (causal
        calls, carried states) and none are given: the map itself unless
        :attr:`data_dependent`."""
        return self

    # -- the projection -------------------------------------------------------------------

    @property
    def rows(self) -> int | None:
        """Number of projection rows: ``m``, or ``m/2`` for paired maps (None: no projection)."""
        if self.m is None:
            return None
        return self.m // 2 if self.paired else self.m

    def num_features(self, d: int) -> int:
        """Number of feature columns for inputs of dimension ``d``."""
        return d if self.m is None else self.m

    def host_projection(self, d: int) -> np.ndarray | None:
        """The float64 host projection ``(rows, d)`` for inputs of dimension ``d``."""
        if self.rows is None:
            return None
        key = ("host", d)
        if key not in self._cache:
            self._remember(
                key,
                draw_projection(
                    self.rows, d, kind=self.projection, norms=self.norms, seed=self.seed
                ),
            )
        return self._cache[key]  # type: ignore[no-any-return]

    def feature_matrix(self, d: int) -> np.ndarray | None:
        """The float64 host matrix the map computes its features from (``projection=``).

        The drawn projection ``W``, or ``[W; -W]`` for antithetic maps; None without one.
        Adapters that keep the projection themselves (a module buffer) start from this.
        """
        host = self.host_projection(d)
        return None if host is None else self.stack_rows(host)

    def projection_like(self, x: Array) -> Array | None:
        """:meth:`feature_matrix` in ``x``'s namespace, device and compute dtype (cached)."""
        if self.rows is None:
            return None
        xp = namespace(x=x)
        dtype, dev, d = compute_dtype(xp, x.dtype), device(x), x.shape[-1]
        key = (xp.__name__, str(dtype), repr(dev), d)
        if key in self._cache:
            return self._cache[key]
        matrix = self.feature_matrix(d)
        assert matrix is not None
        w = from_host(xp, matrix, dtype=dtype, device=dev)
        if not is_tracer(w):  # under jax.jit the constant is a tracer of this trace only
            self._remember(key, w)
        return w

    def stack_rows(self, w: Array) -> Array:
        """The matrix the map computes from, given drawn projection rows ``w`` (any
        namespace): ``w`` itself, or ``[w; -w]`` for antithetic maps."""
        return w

    def _remember(self, key: tuple[Any, ...], value: Any) -> None:
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = value

    def _matrix(self, x: Array, w: Array | None) -> Array | None:
        """``w`` (in ``x``'s compute dtype), or the map's own projection."""
        if w is None:
            return self.projection_like(x)
        xp = namespace(w=w)
        return xp.astype(w, compute_dtype(xp, x.dtype), copy=False)

    # -- the features ---------------------------------------------------------------------

    def form(
        self,
        xp: ModuleType,
        x: Array,
        y: Array,
        w: Array | None,
        *,
        root: float,
        balance: Balance | None = None,
        key_mask: Array | None = None,
        query_mask: Array | None = None,
    ) -> Form:
        """This map's :class:`Form` for one call on the rows ``x``, ``y`` (unscaled, compute
        dtype), scaled by ``root`` and balanced by ``balance``; the masks keep padding out
        of any statistic. The base class gives the :class:`RowForm`."""
        if balance is None:
            return RowForm(self, w, root)
        dtype = x.dtype
        qt, kt = (xp.astype(t, dtype, copy=False) * root for t in (balance.query, balance.key))
        return RowForm(self, w, 1.0, qt, kt, xp.astype(balance.shift, dtype, copy=False))

    def query_features(self, xp: ModuleType, x: Array, w: Array | None) -> Array:
        """Stabilised features of scaled query rows ``x`` (any positive factor per row)."""
        raise NotImplementedError

    def key_features(self, xp: ModuleType, y: Array, w: Array | None) -> Array:
        """Stabilised features of scaled key rows ``y`` (no factor that depends on a row)."""
        raise NotImplementedError

    def __call__(
        self,
        x: Array,
        y: Array,
        *,
        key_mask: Array | None = None,
        query_mask: Array | None = None,
        projection: Array | None = None,
    ) -> tuple[Array, Array]:
        """Stabilised features of queries ``x`` ``(..., Lq, d)`` and keys ``y`` ``(..., Lk, d)``.

        Returns ``(qf, kf)`` of shapes ``(..., Lq, m)`` and ``(..., Lk, m)`` in ``x``'s
        namespace, device and compute dtype. ``qf @ kf.T`` equals ``phi(x) @ phi(y).T`` up
        to a positive factor per query row, which cancels in attention. ``key_mask`` (True =
        attend) keeps masked keys out of any statistic a map computes, ``query_mask``
        ``(..., Lq)`` (True = a real query) padded queries; the caller removes masked rows
        themselves (:func:`favorcore.linear_attention` does). ``projection`` replaces the
        map's own matrix (:meth:`feature_matrix`'s shape).
        """
        xp = self._check_inputs(x=x, y=y)
        dtype = compute_dtype(xp, x.dtype)
        x, y = xp.astype(x, dtype, copy=False), xp.astype(y, dtype, copy=False)
        w = self._matrix(x, projection)
        form = self.form(xp, x, y, w, root=1.0, key_mask=key_mask, query_mask=query_mask)
        return form.queries(xp, x), form.keys(xp, y)

    def _check_inputs(self, **arrays: Array) -> ModuleType:
        xp = namespace(**arrays)
        names = list(arrays)
        first = arrays[names[0]]
        for name, a in arrays.items():
            if a.ndim < 2:
                raise ValueError(f"{name} must have shape (..., L, d), got shape {tuple(a.shape)}")
            if not is_floating(xp, a.dtype):
                raise TypeError(f"{name} must have a real floating dtype, got {a.dtype}")
            if a.shape[-1] != first.shape[-1]:
                raise ValueError(
                    f"{name} has feature dimension {a.shape[-1]}, but {names[0]} has "
                    f"{first.shape[-1]}; queries and keys need the same d"
                )
            if a.dtype != first.dtype:
                raise TypeError(f"{name} has dtype {a.dtype}, but {names[0]} has {first.dtype}")
        return xp

    def phi(self, x: Array) -> Array:
        """Unstabilised features of rows ``x``; ``phi(x) @ phi(y).T`` estimates the kernel."""
        raise NotImplementedError


def _half_sq_norm(xp: ModuleType, x: Array) -> Array:
    """``|x|^2 / 2`` per row, ``(..., L, 1)``."""
    return xp.sum(x * x, axis=-1, keepdims=True) / 2


def _needs_projection(fmap: FeatureMap, w: Array | None) -> Array:
    if w is None:
        raise ValueError(f"{type(fmap).__name__} needs a projection matrix, got None")
    return w


def _project(xp: ModuleType, x: Array, w: Array | None) -> Array:
    return x if w is None else x @ xp.matrix_transpose(w)


@dataclass(frozen=True, kw_only=True)
class PositiveFeatures(FeatureMap):
    r"""FAVOR+ positive random features for the softmax kernel.

    ``phi(x) = m^(-1/2) exp(W x - |x|^2/2)`` with ``m`` projection rows, so that
    ``E[phi(x) . phi(y)] = exp(x . y)`` for Gaussian rows (``"iid"``, or ``"orthogonal"``
    with ``"chi"`` norms). With ``antithetic=True`` (the hyperbolic map, FAVOR+ with
    ``+-w`` pairs) ``m/2`` rows ``W`` are drawn and used as ``[W; -W]``: still unbiased, lower
    variance; ``m`` must then be even.

    Parameters
    ----------
    m : int
        Number of feature columns.
    projection, norms, seed
        See :class:`FeatureMap`.
    antithetic : bool
        Use ``+-w`` pairs (the hyperbolic estimator).

    Examples
    --------
    >>> import numpy as np
    >>> fmap = PositiveFeatures(m=64, seed=0)
    >>> x = np.random.default_rng(0).standard_normal((10, 8)) / 4
    >>> qf, kf = fmap(x, x)
    >>> qf.shape, bool((qf > 0).all() and (kf > 0).all())
    ((10, 64), True)
    """

    antithetic: bool = False

    @property
    def paired(self) -> bool:
        """Antithetic features come in ``+-w`` pairs."""
        return self.antithetic

    @property
    def positive(self) -> bool:
        """Positive features."""
        return True

    @property
    def softmax(self) -> bool:
        """An estimator of the softmax kernel."""
        return True

    def stack_rows(self, w: Array) -> Array:
        """``[w; -w]`` for the antithetic (hyperbolic) map, else ``w``."""
        if not self.antithetic:
            return w
        if isinstance(w, np.ndarray):  # the host matrix
            return np.concatenate([w, -w])
        xp = namespace(w=w)
        return xp.concat([w, -w], axis=0)

    def form(
        self,
        xp: ModuleType,
        x: Array,
        y: Array,
        w: Array | None,
        *,
        root: float,
        balance: Balance | None = None,
        key_mask: Array | None = None,
        query_mask: Array | None = None,
    ) -> Exponent:
        """The :class:`Exponent` of this call: ``A`` from :meth:`coefficient`."""
        spread = None if balance is None else balance.spread
        a = self.coefficient(x, y, key_mask=key_mask, query_mask=query_mask,
                             scale=root * root, spread=spread)  # fmt: skip
        return exponent(xp, _needs_projection(self, w), root=root, a=a, balance=balance)

    def coefficient(
        self,
        x: Array,
        y: Array,
        *,
        key_mask: Array | None = None,
        query_mask: Array | None = None,
        spread: Array | None = None,
        scale: float = 1.0,
    ) -> float | Array:
        """The exponent's ``A`` for the rows ``sqrt(scale) x``, ``sqrt(scale) y``: 0 for
        FAVOR+ (a float, or a constant array ``batch + (1, 1)`` for data-dependent maps,
        which take it from ``spread`` = ``mean_ij |x_i + y_j|^2`` of the scaled rows when
        given, e.g. :attr:`Balance.spread`)."""
        return 0.0

    def phi(self, x: Array) -> Array:
        """Unbiased features ``m^(-1/2) exp(W x - |x|^2/2)`` (may overflow for large norms)."""
        xp = self._check_inputs(x=x)
        x = xp.astype(x, compute_dtype(xp, x.dtype), copy=False)
        w = _needs_projection(self, self.projection_like(x))
        return exponent(xp, w, root=1.0, a=self._fixed_a(), stabilise=False).keys(xp, x)

    def _fixed_a(self) -> float:
        return 0.0


@dataclass(frozen=True, kw_only=True)
class OptimalPositiveFeatures(PositiveFeatures):
    r"""FAVOR++ (optimal positive random features, arXiv 2205.15317).

    ``phi(x) = m^(-1/2) (1 - 4A)^(d/4) exp(A |w|^2 + sqrt(1 - 4A) w . x - |x|^2/2)``, one
    term per projection row, unbiased for ``A < 1/4`` (``A = 0`` is FAVOR+). The constant
    ``(1 - 4A)^(d/4)`` cancels in attention and is kept (in log space) only by :meth:`phi`.

    With ``a=None`` the map picks the variance-minimising
    ``A* = (1 - 2 rho - sqrt((2 rho + 1)^2 + 8 rho)) / 16`` from the data,
    ``rho = mean_ij |x_i + y_j|^2 / d`` over all queries and the valid keys (O(L d)), per
    batch row and head: a statistic of queries and keys together, held constant for
    autograd. Such a data-dependent map is for bidirectional calls; causal attention and
    calls that carry a state need a fixed ``a`` (e.g. ``A*`` of a calibration batch,
    :meth:`optimal_a`) or statistics with a spread. Antithetic ``+-w`` pairs are on by
    default. Its :meth:`causal_form` is the same map with ``a=0`` (FAVOR+ with ``+-w`` pairs).

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((20, 8)) / 3
    >>> qf, kf = OptimalPositiveFeatures(m=64, seed=0)(x, x)
    >>> bool((qf > 0).all() and (kf > 0).all())
    True
    """

    antithetic: bool = True
    a: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.a is not None and not (
            isinstance(self.a, int | float) and math.isfinite(self.a) and self.a < 0.25
        ):
            raise ValueError(
                f"a must be a finite number < 1/4 (unbiased estimator), got {self.a!r}"
            )

    @property
    def data_dependent(self) -> bool:
        """True when ``A`` is computed from each call's queries and keys."""
        return self.a is None

    def causal_form(self) -> FeatureMap:
        """With ``a=None``: the same projection with ``A = 0``; else the map itself."""
        if self.a is not None:
            return self
        import dataclasses

        return dataclasses.replace(self, a=0.0)

    @staticmethod
    def optimal_a(
        x: Array,
        y: Array,
        *,
        key_mask: Array | None = None,
        query_mask: Array | None = None,
        scale: float = 1.0,
    ) -> Array:
        """``A*`` for the rows ``sqrt(scale) x`` and ``sqrt(scale) y``, shape
        ``batch + (1, 1)`` (a constant).

        ``key_mask`` ``(..., Lk)`` and ``query_mask`` ``(..., Lq)`` (True = a real token)
        leave padding out of the statistic. As :func:`~favorcore.balance_statistics`, a
        side longer than 1024 rows contributes every ``ceil(L / 1024)``-th row (any ``A``
        below 1/4 is unbiased; this one is close to ``A*`` at a fraction of the cost).
        """
        from .balance import SAMPLE, _strided

        xp = namespace(x=x, y=y, key_mask=key_mask, query_mask=query_mask)
        x, query_mask = _strided(x, query_mask, SAMPLE)
        y, key_mask = _strided(y, key_mask, SAMPLE)
        dtype = compute_dtype(xp, x.dtype)
        x, y = xp.astype(x, dtype, copy=False), xp.astype(y, dtype, copy=False)
        sq_x = row_mean(xp, xp.sum(x * x, axis=-1, keepdims=True), query_mask)
        mean_x = row_mean(xp, x, query_mask)
        sq_y = row_mean(xp, xp.sum(y * y, axis=-1, keepdims=True), key_mask)
        mean_y = row_mean(xp, y, key_mask)
        rho = (sq_x + sq_y + 2 * xp.sum(mean_x * mean_y, axis=-1, keepdims=True)) / x.shape[-1]
        return stop_gradient(xp, _a_star(xp, rho * scale))

    def coefficient(
        self,
        x: Array,
        y: Array,
        *,
        key_mask: Array | None = None,
        query_mask: Array | None = None,
        spread: Array | None = None,
        scale: float = 1.0,
    ) -> float | Array:
        """The fixed ``a``; else ``A*`` of ``spread`` (``mean_ij |x_i + y_j|^2`` of the
        scaled rows, as :attr:`Balance.spread`) when given, or :meth:`optimal_a` of the
        rows ``sqrt(scale) x``, ``sqrt(scale) y``."""
        if self.a is not None:
            return self.a
        if spread is not None:
            xp = namespace(spread=spread)
            return stop_gradient(xp, _a_star(xp, spread / x.shape[-1]))
        if x.shape[-2] == 0 or y.shape[-2] == 0:
            raise ValueError(
                "a data-dependent OptimalPositiveFeatures needs queries and keys in one call"
            )
        return self.optimal_a(x, y, key_mask=key_mask, query_mask=query_mask, scale=scale)

    def phi(self, x: Array) -> Array:
        """Unbiased features for a fixed ``a`` (a data-dependent map has no single phi)."""
        if self.a is None:
            raise ValueError("phi needs a fixed a: OptimalPositiveFeatures(a=...)")
        return super().phi(x)

    def _fixed_a(self) -> float:
        assert self.a is not None
        return float(self.a)


def _a_star(xp: ModuleType, rho: Array) -> Array:
    """FAVOR++'s variance-minimising ``A*(rho)`` (arXiv 2205.15317, ``rho`` clipped at 0)."""
    rho = xp.where(rho > 0, rho, 0.0)
    return (1 - 2 * rho - xp.sqrt((2 * rho + 1) ** 2 + 8 * rho)) / 16


def hyperbolic_features(m: int = 256, **kwargs: Any) -> PositiveFeatures:
    """The hyperbolic map: :class:`PositiveFeatures` with antithetic ``+-w`` pairs.

    ``phi(x) = m^(-1/2) exp(-|x|^2/2) [exp(W x), exp(-W x)]`` with ``m/2`` rows in ``W``.

    Examples
    --------
    >>> hyperbolic_features(64, seed=0).rows
    32
    """
    return PositiveFeatures(m=m, antithetic=True, **kwargs)


@dataclass(frozen=True, kw_only=True)
class TrigonometricFeatures(FeatureMap):
    r"""The trigonometric map of the first FAVOR paper (arXiv 2006.03555).

    ``phi(x) = (m/2)^(-1/2) exp(|x|^2/2) [sin(W x), cos(W x)]`` with ``m/2`` rows: unbiased
    for the softmax kernel but **not positive**, so the estimated normaliser of a query can
    be zero or negative (rows where it is ``<= 0`` return 0), and ``exp(|y|^2/2)`` overflows
    for keys of large norm. Prefer :class:`PositiveFeatures`; this map is here for
    comparison with the paper.

    Examples
    --------
    >>> TrigonometricFeatures(m=64, seed=0).rows
    32
    """

    @property
    def paired(self) -> bool:
        """Features come in sin/cos pairs."""
        return True

    @property
    def softmax(self) -> bool:
        """An estimator of the softmax kernel."""
        return True

    def query_features(self, xp: ModuleType, x: Array, w: Array | None) -> Array:
        """``[sin(W x), cos(W x)] / sqrt(m/2)``: the query's ``exp(|x|^2/2)`` (a per-row
        constant) is dropped."""
        px = _project(xp, x, _needs_projection(self, w))
        return xp.concat([xp.sin(px), xp.cos(px)], axis=-1) / math.sqrt(px.shape[-1])

    def key_features(self, xp: ModuleType, y: Array, w: Array | None) -> Array:
        """``exp(|y|^2/2) [sin(W y), cos(W y)] / sqrt(m/2)``.

        Raises ``ValueError`` (eager arrays) when ``exp(|y|^2/2)`` of a key would overflow
        the compute dtype: the estimate would be inf/NaN, not an answer.
        """
        py = _project(xp, y, _needs_projection(self, w))
        half = _half_sq_norm(xp, y)
        if is_eager(y) and y.shape[-2]:
            top = float(xp.max(half))
            limit = math.log(float(xp.finfo(py.dtype).max)) - math.log(y.shape[-2]) - 1.0
            if top > limit:
                raise ValueError(
                    f"keys too large for trigonometric features: exp(|y|^2/2) = exp({top:.1f}) "
                    f"overflows {py.dtype} (limit exp({limit:.1f})); use PositiveFeatures, "
                    "which bound every key feature, or scale the inputs down"
                )
        trig = xp.concat([xp.sin(py), xp.cos(py)], axis=-1)
        return trig * (xp.exp(half) / math.sqrt(py.shape[-1]))

    def phi(self, x: Array) -> Array:
        """Unbiased features ``(m/2)^(-1/2) exp(|x|^2/2) [sin(W x), cos(W x)]``."""
        xp = self._check_inputs(x=x)
        x = xp.astype(x, compute_dtype(xp, x.dtype), copy=False)
        px = _project(xp, x, _needs_projection(self, self.projection_like(x)))
        return xp.concat([xp.sin(px), xp.cos(px)], axis=-1) * (
            xp.exp(_half_sq_norm(xp, x)) / math.sqrt(px.shape[-1])
        )


def _relu(xp: ModuleType, a: Array) -> Array:
    return xp.where(a > 0, a, 0.0)


def _elu_plus_one(xp: ModuleType, a: Array) -> Array:
    return xp.where(a > 0, a + 1.0, xp.exp(xp.where(a > 0, 0.0, a)))


GENERALIZED_KERNELS: dict[str, Callable[[ModuleType, Array], Array]] = {
    "relu": _relu,
    "elu+1": _elu_plus_one,
    "exp": lambda xp, a: xp.exp(a),
    "identity": lambda xp, a: a,
}


@dataclass(frozen=True, kw_only=True)
class GeneralizedFeatures(FeatureMap):
    """Generalized attention: ``phi(x) = f(W x) + epsilon``, or ``f(x) + epsilon`` unprojected.

    Not an estimator of the softmax kernel: the kernel is ``phi(x) . phi(y)`` itself, so
    the balance (exact for softmax attention only) does not apply.

    Parameters
    ----------
    kernel : {"relu", "elu+1", "exp", "identity"} or callable
        ``f``; a callable takes one array and returns an array of the same shape and
        namespace.
    m : int or None
        Number of projection rows (= feature columns); ``None`` applies ``f`` to the
        inputs directly (``m = d``).
    epsilon : float
        Added to every feature (keeps normalisers of relu features away from zero).
    projection, norms, seed
        See :class:`FeatureMap`.

    Examples
    --------
    >>> import numpy as np
    >>> qf, kf = GeneralizedFeatures(kernel="elu+1", m=None)(np.ones((3, 4)), np.zeros((5, 4)))
    >>> qf.shape, kf.shape
    ((3, 4), (5, 4))
    """

    kernel: str | Callable[[Array], Array] = "relu"
    m: int | None = None
    epsilon: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if not callable(self.kernel) and self.kernel not in GENERALIZED_KERNELS:
            raise ValueError(
                f"kernel must be one of {tuple(GENERALIZED_KERNELS)} or a callable, got {self.kernel!r}"
            )
        if not (
            isinstance(self.epsilon, int | float)
            and math.isfinite(self.epsilon)
            and self.epsilon >= 0
        ):
            raise ValueError(f"epsilon must be a finite number >= 0, got {self.epsilon!r}")

    @property
    def positive(self) -> bool:
        """Positive for the built-in kernels but ``"identity"``; a callable is not assumed
        positive."""
        return self.kernel in ("relu", "elu+1", "exp") and self.epsilon > 0

    def _f(self, xp: ModuleType, a: Array) -> Array:
        if callable(self.kernel):
            return self.kernel(a)
        return GENERALIZED_KERNELS[self.kernel](xp, a)

    def query_features(self, xp: ModuleType, x: Array, w: Array | None) -> Array:
        """``f(W x) + epsilon``."""
        return self._f(xp, _project(xp, x, w)) + self.epsilon

    def key_features(self, xp: ModuleType, y: Array, w: Array | None) -> Array:
        """``f(W y) + epsilon``."""
        return self._f(xp, _project(xp, y, w)) + self.epsilon

    def phi(self, x: Array) -> Array:
        """``f(W x) + epsilon``."""
        xp = self._check_inputs(x=x)
        x = xp.astype(x, compute_dtype(xp, x.dtype), copy=False)
        return self.query_features(xp, x, self.projection_like(x))
