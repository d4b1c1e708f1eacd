r"""Random-feature maps phi whose inner products estimate attention kernels.

Every map is a small immutable object that holds its seed (and so its host projection)
and maps queries and keys **together**: ``qf, kf = fmap(x, y, key_mask=...)``. The
attention functions pass the *scaled* rows ``x = sqrt(scale) q`` and
``y = sqrt(scale) k``, so that the softmax-kernel maps estimate ``exp(x . y)``.

Queries and keys get different stabilisers (DESIGN.md section 4):

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
from typing import Any

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
from .projection import (
    NORM_KINDS,
    PROJECTION_KINDS,
    NormKind,
    ProjectionKind,
    draw_projection,
)

__all__ = [
    "AccuracyWarning",
    "FeatureMap",
    "GeneralizedFeatures",
    "OptimalPositiveFeatures",
    "PositiveFeatures",
    "TrigonometricFeatures",
    "hyperbolic_features",
]

_CACHE_SIZE = 8


class AccuracyWarning(UserWarning):
    """An estimate favorcore computed is known to be inaccurate (e.g. a normaliser <= 0)."""


def _key_bound(xp: ModuleType, dtype: Any) -> float:
    """``B``: every positive-map key feature is at most ``exp(B)``."""
    return 0.5 * math.log(float(xp.finfo(dtype).max)) - 4.0


@dataclass(frozen=True, kw_only=True)
class FeatureMap:
    """Base class of the feature maps: seed, projection settings and the q/k interface.

    Subclasses define :meth:`apply` (stabilised query and key features, given the
    projection as an array) and :meth:`phi` (unstabilised features).

    Parameters
    ----------
    m : int
        Number of feature columns.
    projection : {"iid", "orthogonal", "hadamard", "givens"}
        Kind of random projection (see :mod:`favorcore.projection`).
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

    @property
    def paired(self) -> bool:
        """True when features come in pairs drawn from one projection row (m must be even)."""
        return False

    @property
    def data_dependent(self) -> bool:
        """True when the map computes statistics from each call's queries and keys."""
        return False

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
        """The float64 host matrix :meth:`apply` expects for inputs of dimension ``d``.

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
        """The matrix :meth:`apply` expects, from drawn projection rows ``w`` (any namespace).

        ``w`` itself, or ``[w; -w]`` for antithetic maps.
        """
        return w

    def _remember(self, key: tuple[Any, ...], value: Any) -> None:
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = value

    # -- the maps -------------------------------------------------------------------------

    def __call__(
        self,
        x: Array,
        y: Array,
        *,
        key_mask: Array | None = None,
        query_mask: Array | None = None,
    ) -> tuple[Array, Array]:
        """Stabilised features of queries ``x`` ``(..., Lq, d)`` and keys ``y`` ``(..., Lk, d)``.

        Returns ``(qf, kf)`` of shapes ``(..., Lq, m)`` and ``(..., Lk, m)`` in ``x``'s
        namespace, device and compute dtype. ``qf @ kf.T`` equals ``phi(x) @ phi(y).T`` up
        to a positive factor per query row, which cancels in attention. ``key_mask`` (True =
        attend) keeps masked keys out of any statistic a map computes, ``query_mask``
        ``(..., Lq)`` (True = a real query) padded queries; the caller removes masked rows
        themselves (:func:`favorcore.linear_attention` does).
        """
        xp = self._check_inputs(x=x, y=y)
        return self.apply(
            x, y, self.projection_like(x), key_mask=key_mask, query_mask=query_mask, xp=xp
        )

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

    def apply(
        self,
        x: Array,
        y: Array,
        w: Array | None,
        *,
        key_mask: Array | None = None,
        query_mask: Array | None = None,
        xp: ModuleType | None = None,
    ) -> tuple[Array, Array]:
        """Stabilised ``(qf, kf)`` given the projection ``w`` as an array of ``x``'s namespace.

        This is the seam for adapters that keep their own projection (a module buffer, a
        matrix drawn from a ``jax.random`` key): ``w`` has shape ``(rows, d)`` for this map
        (the antithetic maps expect the stacked ``[W; -W]``).
        """
        raise NotImplementedError

    def phi(self, x: Array) -> Array:
        """Unstabilised features of rows ``x``; ``phi(x) @ phi(y).T`` estimates the kernel."""
        raise NotImplementedError


def _half_sq_norm(xp: ModuleType, x: Array, dtype: Any) -> Array:
    """``|x|^2 / 2`` per row, ``(..., L, 1)``, in ``dtype``."""
    x = xp.astype(x, dtype, copy=False)
    return xp.sum(x * x, axis=-1, keepdims=True) / 2


def _needs_projection(fmap: FeatureMap, w: Array | None) -> Array:
    if w is None:
        raise ValueError(f"{type(fmap).__name__} needs a projection matrix w, got None")
    return w


def _project(xp: ModuleType, x: Array, w: Array | None) -> Array:
    x = xp.astype(x, compute_dtype(xp, x.dtype), copy=False)
    return x if w is None else x @ xp.matrix_transpose(w)


def _positive_pair(xp: ModuleType, x: Array, y: Array, w: Array, a: Any) -> tuple[Array, Array]:
    """Stabilised ``exp(A |w|^2 + sqrt(1 - 4A) w . x - |x|^2/2)`` for queries and keys.

    ``A = 0`` is FAVOR+. Queries: ``-|x|^2/2`` (a per-row constant) is dropped and the row
    max taken out. Keys: no data-dependent shift; the per-feature constant
    ``c_i = max(0, top_i - B)`` (``top_i = A |w_i|^2 + (1 - 4A) |w_i|^2 / 2``, the largest a
    key's exponent can be) moves to the query side, so every key feature is <= exp(B).
    """
    px, py = _project(xp, x, w), _project(xp, y, w)
    sq = xp.sum(w * w, axis=-1)
    if isinstance(a, float) and a == 0.0:
        bias, top = 0.0, sq / 2
    else:
        b = (1 - 4 * a) ** 0.5
        px, py = px * b, py * b
        bias, top = a * sq, a * sq + (1 - 4 * a) * sq / 2
    half_log_m = 0.5 * math.log(w.shape[0])
    bound = _key_bound(xp, w.dtype)
    offset = xp.where(top > bound, top - bound, 0.0)
    lq = px + bias + offset
    if lq.shape[-2] != 0:  # (no queries: a key-only call; Dask cannot reduce empty arrays)
        lq = lq - stop_gradient(xp, xp.max(lq, axis=-1, keepdims=True))
    qf = xp.exp(lq - half_log_m)
    kf = xp.exp(py - _half_sq_norm(xp, y, py.dtype) + bias - offset - half_log_m)
    return qf, kf


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

    def stack_rows(self, w: Array) -> Array:
        """``[w; -w]`` for the antithetic (hyperbolic) map, else ``w``."""
        if not self.antithetic:
            return w
        if isinstance(w, np.ndarray):  # the host matrix
            return np.concatenate([w, -w])
        xp = namespace(w=w)
        return xp.concat([w, -w], axis=0)

    def apply(
        self,
        x: Array,
        y: Array,
        w: Array | None,
        *,
        key_mask: Array | None = None,
        query_mask: Array | None = None,
        xp: ModuleType | None = None,
    ) -> tuple[Array, Array]:
        """Stabilised positive features; see the module docstring for the stabilisers."""
        w = _needs_projection(self, w)
        xp = namespace(x=x, y=y, w=w) if xp is None else xp
        a = self.coefficient(x, y, key_mask=key_mask, query_mask=query_mask)
        return _positive_pair(xp, x, y, w, a)

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
        w = _needs_projection(self, self.projection_like(x))
        px = _project(xp, x, w)
        return xp.exp(px - _half_sq_norm(xp, x, px.dtype) - 0.5 * math.log(w.shape[0]))


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
    :meth:`optimal_a`). Antithetic ``+-w`` pairs are on by default.

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
        xp = self._check_inputs(x=x)
        w = _needs_projection(self, self.projection_like(x))
        b = math.sqrt(1 - 4 * self.a)
        px = _project(xp, x, w) * b
        log_c = x.shape[-1] / 4 * math.log(1 - 4 * self.a) - 0.5 * math.log(w.shape[0])
        return xp.exp(px + self.a * xp.sum(w * w, axis=-1) - _half_sq_norm(xp, x, px.dtype) + log_c)


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

    def apply(
        self,
        x: Array,
        y: Array,
        w: Array | None,
        *,
        key_mask: Array | None = None,
        query_mask: Array | None = None,
        xp: ModuleType | None = None,
    ) -> tuple[Array, Array]:
        """Stabilised features: the query's ``exp(|x|^2/2)`` (a per-row constant) is dropped.

        Raises ``ValueError`` (eager arrays) when a key's ``exp(|y|^2/2)`` would overflow the
        compute dtype: the estimate would be inf/NaN, not an answer.
        """
        w = _needs_projection(self, w)
        xp = namespace(x=x, y=y, w=w) if xp is None else xp
        px, py = _project(xp, x, w), _project(xp, y, w)
        if is_eager(y) and y.shape[-2]:
            top = float(xp.max(_half_sq_norm(xp, y, py.dtype)))
            limit = math.log(float(xp.finfo(py.dtype).max)) - math.log(max(y.shape[-2], 1)) - 1.0
            if top > limit:
                raise ValueError(
                    f"keys too large for trigonometric features: exp(|y|^2/2) = exp({top:.1f}) "
                    f"overflows {py.dtype} (limit exp({limit:.1f})); use PositiveFeatures, "
                    "which bound every key feature, or scale the inputs down"
                )
        scale = 1.0 / math.sqrt(w.shape[0])
        qf = xp.concat([xp.sin(px), xp.cos(px)], axis=-1) * scale
        kf = xp.concat([xp.sin(py), xp.cos(py)], axis=-1) * (
            xp.exp(_half_sq_norm(xp, y, py.dtype)) * scale
        )
        return qf, kf

    def phi(self, x: Array) -> Array:
        """Unbiased features ``(m/2)^(-1/2) exp(|x|^2/2) [sin(W x), cos(W x)]``."""
        xp = self._check_inputs(x=x)
        w = _needs_projection(self, self.projection_like(x))
        px = _project(xp, x, w)
        return xp.concat([xp.sin(px), xp.cos(px)], axis=-1) * (
            xp.exp(_half_sq_norm(xp, x, px.dtype)) / math.sqrt(w.shape[0])
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

    Not an estimator of the softmax kernel: the kernel is ``phi(x) . phi(y)`` itself.

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

    def _f(self, xp: ModuleType, a: Array) -> Array:
        if callable(self.kernel):
            return self.kernel(a)
        return GENERALIZED_KERNELS[self.kernel](xp, a)

    def apply(
        self,
        x: Array,
        y: Array,
        w: Array | None,
        *,
        key_mask: Array | None = None,
        query_mask: Array | None = None,
        xp: ModuleType | None = None,
    ) -> tuple[Array, Array]:
        """``f(W x) + epsilon`` for queries and keys alike (no stabiliser)."""
        xp = namespace(x=x, y=y, w=w) if xp is None else xp
        return (
            self._f(xp, _project(xp, x, w)) + self.epsilon,
            self._f(xp, _project(xp, y, w)) + self.epsilon,
        )

    def phi(self, x: Array) -> Array:
        """``f(W x) + epsilon``."""
        xp = self._check_inputs(x=x)
        return self._f(xp, _project(xp, x, self.projection_like(x))) + self.epsilon
