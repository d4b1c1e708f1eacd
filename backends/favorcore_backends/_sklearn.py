"""FAVOR random features as a scikit-learn transformer (``favorcore_backends.numpy``).

:class:`FavorFeatures` maps samples to random features whose inner products estimate the
softmax kernel ``exp(scale x . y)`` or the Gaussian kernel ``exp(-gamma |x - y|^2)``, so
the estimates can be used outside deep learning: kernel ridge regression, SVMs, Gaussian
processes, clustering, as ``sklearn.kernel_approximation.RBFSampler`` is used, but with
orthogonal projections and positive features. It supports ``fit``/``transform``,
``Pipeline``, ``clone`` and ``get_feature_names_out``; the features come from the core's
feature maps (:meth:`favorcore.FeatureMap.phi`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from favorcore import FeatureMap, PositiveFeatures, TrigonometricFeatures

__all__ = ["FavorFeatures"]

_MAPS = ("positive", "hyperbolic", "trigonometric")


class FavorFeatures(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):  # type: ignore[misc]
    """Random features of the softmax or Gaussian kernel (scikit-learn transformer).

    ``transform(X) @ transform(Y).T`` is an unbiased estimate of the kernel matrix
    (orthogonal projections with chi norms, or iid).

    Parameters
    ----------
    n_components : int
        Number of features ``m`` (even for ``"hyperbolic"`` and ``"trigonometric"``).
    kernel : {"gaussian", "softmax"}
        ``exp(-gamma |x - y|^2)`` or ``exp(scale x . y)``.
    gamma : float
        Gaussian kernel width.
    scale : float
        Softmax kernel scale.
    feature_map : {"positive", "hyperbolic", "trigonometric"}
        The estimator. For the Gaussian kernel, "trigonometric" gives the classic random
        Fourier features (bounded); "positive" and "hyperbolic" give positive features
        (lower variance where the kernel is large).
    projection : {"orthogonal", "iid", "hadamard", "givens"}
        Projection kind (see :mod:`favorcore.projection`).
    random_state : int or None
        Seed of the projection.

    Attributes
    ----------
    feature_map_ : FeatureMap
        The fitted feature map (holds the seed).
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
        feature_map: str = "positive",
        projection: str = "orthogonal",
        random_state: int | None = None,
    ) -> None:
        self.n_components = n_components
        self.kernel = kernel
        self.gamma = gamma
        self.scale = scale
        self.feature_map = feature_map
        self.projection = projection
        self.random_state = random_state

    def fit(self, X: Any, y: Any = None) -> FavorFeatures:
        """Check the parameters, record the input width and fix the projection seed."""
        X = validate_data(self, X, dtype=[np.float64, np.float32])
        if self.kernel not in ("gaussian", "softmax"):
            raise ValueError(f"kernel must be 'gaussian' or 'softmax', got {self.kernel!r}")
        if self.feature_map not in _MAPS:
            raise ValueError(f"feature_map must be one of {_MAPS}, got {self.feature_map!r}")
        for name in ("gamma", "scale"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite positive number, got {value!r}")
        seed = self.random_state
        if seed is None:
            seed = int(np.random.SeedSequence().generate_state(1, dtype=np.uint64)[0])
        kwargs: dict[str, Any] = {
            "m": self.n_components,
            "projection": self.projection,
            "seed": int(seed),
        }
        fmap: FeatureMap
        if self.feature_map == "trigonometric":
            fmap = TrigonometricFeatures(**kwargs)
        else:
            fmap = PositiveFeatures(antithetic=self.feature_map == "hyperbolic", **kwargs)
        fmap.host_projection(X.shape[1])  # draw now (and fail now on bad sizes)
        self.feature_map_ = fmap
        self._n_features_out = fmap.num_features(X.shape[1])
        return self

    def transform(self, X: Any) -> np.ndarray:
        """Features of the rows of ``X``, shape ``(n_samples, n_components)``."""
        check_is_fitted(self)
        rows: np.ndarray = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        if self.kernel == "softmax":
            return np.asarray(self.feature_map_.phi(rows * math.sqrt(self.scale)))
        # exp(-g|x-y|^2) = exp(-g|x|^2) exp(-g|y|^2) exp(2g x.y)
        phi = np.asarray(self.feature_map_.phi(rows * math.sqrt(2.0 * self.gamma)))
        norms = np.asarray(np.exp(-self.gamma * (rows * rows).sum(axis=1, keepdims=True)))
        features: np.ndarray = phi * norms.astype(phi.dtype)
        return features

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags
