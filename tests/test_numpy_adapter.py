"""The NumPy adapter: the scikit-learn transformer of FAVOR random features."""

from __future__ import annotations

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn")
fnumpy = pytest.importorskip("favorcore_backends.numpy")

from sklearn.base import clone
from sklearn.linear_model import Ridge
from sklearn.metrics.pairwise import rbf_kernel
from sklearn.pipeline import make_pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks

FavorFeatures = fnumpy.FavorFeatures


@parametrize_with_checks([FavorFeatures(n_components=16, random_state=0)])
def test_sklearn_estimator_checks(estimator, check, monkeypatch: pytest.MonkeyPatch) -> None:
    # scikit-learn runs its array API checks (array-api-strict, PyTorch, CuPy inputs) only
    # with SCIPY_ARRAY_API=1, which SciPy reads at import; FavorFeatures hands SciPy NumPy
    # arrays alone, so setting it here is enough for the checks to run instead of skipping
    monkeypatch.setenv("SCIPY_ARRAY_API", "1")
    check(estimator)


def _data(n=80, d=5, scale=0.4):
    return np.random.default_rng(0).standard_normal((n, d)) * scale


@pytest.mark.parametrize("feature_map", ["positive", "hyperbolic", "trigonometric"])
def test_gaussian_kernel_estimate_improves_with_m(feature_map: str) -> None:
    X = _data()
    exact = rbf_kernel(X, gamma=0.5)
    errs = []
    for m in (32, 2048):
        per_seed = []
        for seed in range(4):
            phi = FavorFeatures(
                m, gamma=0.5, feature_map=feature_map, random_state=seed
            ).fit_transform(X)
            per_seed.append(np.abs(phi @ phi.T - exact).mean())
        errs.append(np.mean(per_seed))
    # the error of a mean of m terms falls like m^-1/2: 64x more features, ~8x less error
    assert errs[1] < errs[0] / 4, errs
    assert errs[1] < 0.02, errs


def test_softmax_kernel_estimate() -> None:
    X = _data()
    phi = FavorFeatures(4096, kernel="softmax", scale=0.5, random_state=0).fit_transform(X)
    exact = np.exp(0.5 * X @ X.T)
    assert np.abs(phi @ phi.T / exact - 1).mean() < 0.03


def test_pipeline_clone_and_feature_names() -> None:
    rng = np.random.default_rng(1)
    X = rng.uniform(-1, 1, (300, 2))
    y = np.sin(3 * X[:, 0]) * np.cos(2 * X[:, 1])
    model = make_pipeline(FavorFeatures(512, gamma=2.0, random_state=0), Ridge(alpha=1e-3)).fit(
        X, y
    )
    assert model.score(X, y) > 0.95  # a nonlinear target, fitted linearly in feature space
    twin = clone(model).fit(X, y)
    np.testing.assert_allclose(twin.predict(X), model.predict(X))
    names = model[0].get_feature_names_out()
    assert len(names) == 512
    assert names[0] == "favorfeatures0"


def test_bad_parameters_raise() -> None:
    X = _data()
    with pytest.raises(ValueError, match="kernel must be"):
        FavorFeatures(kernel="laplace").fit(X)
    with pytest.raises(ValueError, match="gamma must be a finite positive number"):
        FavorFeatures(gamma=0).fit(X)
    with pytest.raises(ValueError, match="n_components must be a positive integer"):
        FavorFeatures(0).fit(X)
    with pytest.raises(ValueError, match="feature_map must be one of"):
        FavorFeatures(feature_map="relu").fit(X)
    with pytest.raises(ValueError, match="projection must be one of"):
        FavorFeatures(projection="sparse").fit(X)
    with pytest.raises(ValueError, match="norms must be one of"):
        FavorFeatures(norms="unit").fit(X)
