"""FAVOR random features as a scikit-learn transformer (``favorcore_backends.numpy``).

:class:`FavorFeatures` maps samples to random features whose inner products estimate the
Gaussian kernel ``exp(-gamma |x - y|^2)`` or the softmax kernel ``exp(scale x . y)``, so
the estimates can be used outside deep learning: kernel ridge regression, SVMs, Gaussian
processes, clustering, where ``sklearn.kernel_approximation.RBFSampler`` is used. It
supports ``fit``/``transform``, ``Pipeline``, ``clone``, ``get_feature_names_out`` and
scikit-learn's array API dispatch (NumPy, PyTorch, CuPy, JAX, array-api-strict arrays
in, the same namespace, device and dtype out). The projection rows come from
:func:`favorcore.draw_projection`; the maps are those of :mod:`favorcore.features`
(``[sin, cos]``, positive, hyperbolic), written here for a kernel rather than for
attention.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, cast

import array_api_compat
import numpy as np
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils._array_api import get_namespace
from sklearn.utils.validation import check_is_fitted, validate_data

from favorcore import draw_projection
from favorcore.projection import PROJECTION_KINDS, NormKind, ProjectionKind

try:  # scikit-learn >= 1.8: the error array API estimators raise on mixed namespaces
    from sklearn.utils._array_api import check_same_namespace
except ImportError:  # pragma: no cover - older scikit-learn
    check_same_namespace = None

__all__ = ["FavorFeatures"]

_KERNELS = ("gaussian", "softmax")
_MAPS = ("trigonometric", "positive", "hyperbolic")
_NORMS = ("stratified", "chi", "fixed")


def stratified_chi(rows: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """``rows`` lengths, each marginally chi(d), one in each of ``rows`` equal-probability
    strata of the chi(d) distribution (in random order).

    Row ``i`` gets the quantile ``F^-1((pi_i + u_i) / rows)`` of a random permutation
    ``pi`` and a uniform ``u_i``: each length alone is an exact chi(d) draw (so a row of
    a uniformly random direction, ``"iid"``, ``"orthogonal"`` or ``"simplex"``, and this
    length is exactly Gaussian and every estimate stays unbiased), while together the
    lengths cover the distribution evenly instead of clumping, which lowers the variance
    that independent lengths add.
    """
    from scipy.special import gammaincinv  # a dependency of scikit-learn

    u = (rng.permutation(rows) + rng.uniform(size=rows)) / rows
    lengths: np.ndarray = np.sqrt(2.0 * gammaincinv(d / 2.0, u))
    return lengths


def random_rows(rows: int, d: int, *, kind: str, norms: str, seed: int) -> np.ndarray:
    """The float64 host projection ``(rows, d)`` of :class:`FavorFeatures`.

    :func:`favorcore.draw_projection` of ``kind`` with chi or fixed norms; with
    ``"stratified"`` norms, its directions (``norms="fixed"``, rescaled to unit length)
    times :func:`stratified_chi` lengths from an independent stream of the same seed.
    ``"hadamard"`` draws its blocks in the next power of two ``>= d`` and keeps the first
    ``d`` columns (a zero-padded input sees the same products), so it takes any ``d``.
    """
    width = 1 << (d - 1).bit_length() if kind == "hadamard" else d
    projection_kind = cast(ProjectionKind, kind)
    if norms == "stratified":
        w = draw_projection(
            rows, width, kind=projection_kind, norms="fixed", seed=seed
        ) / math.sqrt(width)
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
        w *= stratified_chi(rows, width, rng)[:, None]
    else:
        w = draw_projection(
            rows, width, kind=projection_kind, norms=cast(NormKind, norms), seed=seed
        )
    return np.asarray(w[:, :d])


class FavorFeatures(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):  # type: ignore[misc]
    """Random features of the Gaussian or softmax kernel (scikit-learn transformer).

    ``transform(X) @ transform(Y).T`` estimates the kernel matrix of the rows of ``X``
    and ``Y``; with the defaults it is an unbiased estimate (every projection row is
    marginally Gaussian) with less error than ``RBFSampler`` at the same
    ``n_components``: ``[sin, cos]`` pairs of ``n_components / 2`` projection rows,
    orthogonal in blocks of ``d``, with stratified lengths. The docs page "Kernel
    features" has the comparison with ``RBFSampler`` and ``Nystroem``.

    Parameters
    ----------
    n_components : int
        Number of output features ``m``. The trigonometric and hyperbolic maps draw
        ``ceil(m / 2)`` projection rows and use each for a pair of features; for an odd
        ``m`` the last row gives one feature (``sqrt(2 / m) cos(w . x' + b)`` with a
        uniform phase ``b``, ``RBFSampler``'s feature, or one positive feature).
    kernel : {"gaussian", "softmax"}
        ``exp(-gamma |x - y|^2)`` or ``exp(scale x . y)``.
    gamma : float
        Gaussian kernel width (``RBFSampler``'s ``gamma``).
    scale : float
        Softmax kernel scale.
    feature_map : {"trigonometric", "positive", "hyperbolic"}
        The estimator. ``"trigonometric"`` (the default for both kernels):
        ``sqrt(2 / m) [sin(W x'), cos(W x')]``, times ``exp(|x'|^2 / 2)`` for the
        softmax kernel, whose estimate of every diagonal entry is exact and which has
        the least Gram-matrix error on both kernels. ``"positive"`` (FAVOR+,
        ``exp(W x' - |x'|^2 / 2) / sqrt(m)``) and ``"hyperbolic"`` (its ``+-w`` pairs)
        give positive features, which attention needs for its normalisers; as kernel
        estimates their variance grows like ``exp(|x' + y'|^2)`` and they are less
        accurate. ``x'`` is ``sqrt(2 gamma) x`` or ``sqrt(scale) x``.
    projection : {"orthogonal", "iid", "hadamard", "givens", "simplex"}
        How the projection rows are coupled (see :mod:`favorcore.projection`):
        ``"orthogonal"`` blocks of ``d`` exactly orthogonal rows, ``"iid"`` independent
        rows, or the structured kinds (``"hadamard"`` takes any ``d`` here).
    norms : {"stratified", "chi", "fixed"}
        Row lengths: chi(d) draws stratified over the rows (unbiased, and less variance
        than independent lengths), independent chi(d) draws (unbiased), or all
        ``sqrt(d)`` (biased: it estimates another kernel).
    random_state : int, numpy.random.RandomState or None
        Seed of the projection (an int is used as :func:`favorcore.draw_projection`'s
        seed).

    Attributes
    ----------
    projection_ : array of shape (rows, n_features)
        The drawn projection rows ``W``: ``ceil(n_components / 2)`` of them, or
        ``n_components`` for the positive map (the hyperbolic map uses them as ``+-w``),
        in the namespace, device and dtype of the data ``fit`` saw.
    offset_ : float
        The phase ``b`` of the unpaired row of an odd ``n_components`` (else 0).
    n_features_in_ : int
        Number of input features.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.metrics.pairwise import rbf_kernel
    >>> X = np.random.default_rng(0).standard_normal((50, 4)) / 2
    >>> phi = FavorFeatures(n_components=2048, gamma=0.5, random_state=0).fit_transform(X)
    >>> bool(np.abs(phi @ phi.T - rbf_kernel(X, gamma=0.5)).mean() < 0.02)
    True
    """

    def __init__(
        self,
        n_components: int = 256,
        *,
        kernel: str = "gaussian",
        gamma: float = 1.0,
        scale: float = 1.0,
        feature_map: str = "trigonometric",
        projection: str = "orthogonal",
        norms: str = "stratified",
        random_state: Any = None,
    ) -> None:
        self.n_components = n_components
        self.kernel = kernel
        self.gamma = gamma
        self.scale = scale
        self.feature_map = feature_map
        self.projection = projection
        self.norms = norms
        self.random_state = random_state

    def _check_params(self) -> None:
        for name, allowed in (
            ("kernel", _KERNELS),
            ("feature_map", _MAPS),
            ("projection", PROJECTION_KINDS),
            ("norms", _NORMS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        m: Any = self.n_components
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m <= 0:
            raise ValueError(f"n_components must be a positive integer, got {m!r}")
        for name in ("gamma", "scale"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, numbers.Real)
                or not (math.isfinite(value) and float(value) > 0)
            ):
                raise ValueError(f"{name} must be a finite positive number, got {value!r}")

    def fit(self, X: Any, y: Any = None) -> FavorFeatures:
        """Check the parameters, record the input width and draw the projection."""
        xp, _ = get_namespace(X)
        X = validate_data(self, X, dtype=[xp.float64, xp.float32])
        self._check_params()
        state: Any = self.random_state
        if isinstance(state, int | np.integer) and not isinstance(state, bool):
            seed = int(state)
        else:
            seed = int(check_random_state(state).randint(np.iinfo(np.int32).max))
        m = self.n_components
        rows = m if self.feature_map == "positive" else (m + 1) // 2
        host = random_rows(rows, X.shape[1], kind=self.projection, norms=self.norms, seed=seed)
        self.projection_ = xp.asarray(host, dtype=X.dtype, device=array_api_compat.device(X))
        # the phase of the unpaired row of an odd trigonometric map (RBFSampler's feature)
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2,)))
        self.offset_ = float(rng.uniform(0.0, 2.0 * math.pi)) if m % 2 else 0.0
        self._n_features_out = self.n_components
        return self

    def transform(self, X: Any) -> Any:
        """Features of the rows of ``X``, shape ``(n_samples, n_components)``, in the
        namespace, device and dtype of ``X``."""
        check_is_fitted(self)
        if check_same_namespace is not None:
            check_same_namespace(X, self, attribute="projection_", method="transform")
        xp, _ = get_namespace(X)
        X = validate_data(self, X, dtype=[xp.float64, xp.float32], reset=False)
        m = self.n_components
        w = xp.asarray(self.projection_, dtype=X.dtype, device=array_api_compat.device(X))
        pairs = m - w.shape[0]  # rows used twice (+-w, or sin and cos): all but an odd one
        if self.feature_map == "hyperbolic":
            w = xp.concat([w, -w[:pairs, :]], axis=0)
        x = X * math.sqrt(2.0 * self.gamma if self.kernel == "gaussian" else self.scale)
        half = xp.sum(x * x, axis=1, keepdims=True) / 2  # |x'|^2 / 2
        p = x @ xp.matrix_transpose(w)
        if self.feature_map != "trigonometric":
            # exp(w.x' - |x'|^2/2) estimates exp(x'.y'); the Gaussian kernel is that times
            # exp(-|x'|^2/2) exp(-|y'|^2/2), so its features take off |x'|^2/2 twice
            shift = 2 * half if self.kernel == "gaussian" else half
            return xp.exp(p - shift - 0.5 * math.log(m))
        cos = xp.cos(p)
        if pairs < w.shape[0]:  # odd m: the last row's feature is sqrt(2) cos(w.x' + b)
            cos = xp.concat([cos[:, :pairs], xp.cos(p[:, pairs:] + self.offset_)], axis=1)
        # E[2 cos(w.x') cos(w.y')] over the pair = 2 E[...] over the odd one =
        # exp(-|x' - y'|^2/2): every column carries the same weight 2/m
        features = xp.concat([xp.sin(p[:, :pairs]), cos], axis=1) * math.sqrt(2.0 / m)
        if self.kernel == "gaussian":
            return features
        top = float(xp.max(half)) if half.shape[0] else 0.0
        limit = math.log(float(xp.finfo(X.dtype).max)) - 1.0
        if top > limit:
            raise ValueError(
                f"rows too large for trigonometric softmax features: exp(scale |x|^2 / 2) = "
                f"exp({top:.1f}) overflows {X.dtype} (limit exp({limit:.1f})), as does the "
                "kernel; scale the inputs down or use a smaller scale"
            )
        return features * xp.exp(half)

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.array_api_support = True
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags
