"""The kernel-features comparison of the docs: FavorFeatures against scikit-learn.

For every bundled scikit-learn dataset that needs no download (``load_iris``,
``load_wine``, ``load_breast_cancer``, ``load_diabetes``, ``load_digits``,
``load_linnerud``) and two generated ones (``make_classification``, ``make_friedman1``),
standardised, with ``gamma = c / n_features`` for ``c`` in 0.25, 1, 4 and
``n_components`` in 64, 256, 1024, over 10 seeds:

1. the relative Gram error ``|K_hat - K|_F / |K|_F`` of the Gaussian kernel for
   ``RBFSampler``, ``Nystroem`` and FavorFeatures (its defaults and variants), on the
   whole dataset;
2. the 5-fold cross-validated score of ``StandardScaler -> features -> RidgeCV`` (R^2)
   or ``RidgeClassifierCV`` (accuracy), whose alpha is chosen inside each training fold
   by the same efficient leave-one-out search over the same grid for every method;
3. the relative Gram error of the softmax kernel ``exp(s x . y)``, ``s = c / n_features``,
   for FavorFeatures' three maps (no scikit-learn counterpart).

Writes ``kernel_features.json`` (every number), ``kernel_features.md`` (the docs'
tables, from the JSON) and ``gram_error.png``, ``cv_score.png``. Usage::

    python docs/scripts/kernel_features.py docs/_static/kernel [--datasets iris,wine]

``--datasets`` and ``--factors`` recompute only those datasets and gamma factors and
merge them into an existing JSON (the tables and plots are always redrawn from the
whole JSON); ``--tables`` only redraws. Run with ``nox -s kernel``.
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from favorcore_backends.numpy import FavorFeatures
from sklearn import datasets
from sklearn.kernel_approximation import Nystroem, RBFSampler
from sklearn.linear_model import RidgeClassifierCV, RidgeCV
from sklearn.metrics.pairwise import rbf_kernel
from sklearn.model_selection import KFold, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

SEEDS = 10
MS = [64, 256, 1024]
FACTORS = [0.25, 1.0, 4.0]
ALPHAS = np.logspace(-6, 3, 10)
FOLDS = 5


def load(name: str) -> tuple[np.ndarray, np.ndarray, str]:
    """``(X, y, task)`` of a dataset, X as float64 (standardised by the callers)."""
    if name == "make_classification":
        X, y = datasets.make_classification(n_samples=1000, n_features=20, random_state=0)
        return X, y, "classification"
    if name == "make_friedman1":
        X, y = datasets.make_friedman1(n_samples=1000, n_features=10, noise=1.0, random_state=0)
        return X, y, "regression"
    bunch = getattr(datasets, f"load_{name}")()
    task = "regression" if name in ("diabetes", "linnerud") else "classification"
    return bunch.data.astype(np.float64), bunch.target, task


DATASETS = [
    "iris",
    "wine",
    "breast_cancer",
    "diabetes",
    "digits",
    "linnerud",
    "make_classification",
    "make_friedman1",
]

Factory = Callable[[float, int, int], Any]
#: Gaussian-kernel methods: name -> (gamma, n_components, seed) -> transformer
GAUSSIAN: dict[str, Factory] = {
    "RBFSampler": lambda g, m, s: RBFSampler(gamma=g, n_components=m, random_state=s),
    "Nystroem": lambda g, m, s: Nystroem(gamma=g, n_components=m, random_state=s),
    "FavorFeatures()": lambda g, m, s: FavorFeatures(m, gamma=g, random_state=s),
    "orthogonal, chi": lambda g, m, s: FavorFeatures(m, gamma=g, norms="chi", random_state=s),
    "iid, chi": lambda g, m, s: FavorFeatures(
        m, gamma=g, projection="iid", norms="chi", random_state=s
    ),
    "iid, stratified": lambda g, m, s: FavorFeatures(m, gamma=g, projection="iid", random_state=s),
    "simplex": lambda g, m, s: FavorFeatures(m, gamma=g, projection="simplex", random_state=s),
    "hadamard": lambda g, m, s: FavorFeatures(m, gamma=g, projection="hadamard", random_state=s),
    "givens": lambda g, m, s: FavorFeatures(m, gamma=g, projection="givens", random_state=s),
    "positive, chi": lambda g, m, s: FavorFeatures(
        m, gamma=g, feature_map="positive", norms="chi", random_state=s
    ),
    "hyperbolic": lambda g, m, s: FavorFeatures(
        m, gamma=g, feature_map="hyperbolic", random_state=s
    ),
}
#: the methods also scored downstream
CV_METHODS = ["RBFSampler", "Nystroem", "FavorFeatures()", "orthogonal, chi", "iid, chi"]
CV_METHODS += ["positive, chi"]
#: softmax-kernel methods: name -> (scale, n_components, seed) -> transformer
SOFTMAX: dict[str, Factory] = {
    "FavorFeatures(kernel='softmax')": lambda c, m, s: FavorFeatures(
        m, kernel="softmax", scale=c, random_state=s
    ),
    "trigonometric, chi": lambda c, m, s: FavorFeatures(
        m, kernel="softmax", scale=c, norms="chi", random_state=s
    ),
    "positive": lambda c, m, s: FavorFeatures(
        m, kernel="softmax", scale=c, feature_map="positive", random_state=s
    ),
    "positive, chi": lambda c, m, s: FavorFeatures(
        m, kernel="softmax", scale=c, feature_map="positive", norms="chi", random_state=s
    ),
    "hyperbolic": lambda c, m, s: FavorFeatures(
        m, kernel="softmax", scale=c, feature_map="hyperbolic", random_state=s
    ),
}


def _gram_error(features: np.ndarray, exact: np.ndarray, norm: float) -> float:
    return float(np.linalg.norm(features @ features.T - exact) / norm)


def _summary(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1))}


def measure(name: str, factors: list[float]) -> dict[str, Any]:
    """Every number of one dataset at the given gamma (and scale) factors."""
    X_raw, y, task = load(name)
    X = StandardScaler().fit_transform(X_raw)
    n, d = X.shape
    out: dict[str, Any] = {"n": n, "d": d, "task": task, "gram": [], "cv": [], "softmax": []}
    if task == "classification":
        folds: Any = StratifiedKFold(FOLDS, shuffle=True, random_state=0)
        model: Callable[[], Any] = lambda: RidgeClassifierCV(alphas=ALPHAS)
    else:
        folds = KFold(FOLDS, shuffle=True, random_state=0)
        model = lambda: RidgeCV(alphas=ALPHAS)
    for factor in factors:
        gamma = factor / d
        exact = rbf_kernel(X, gamma=gamma)
        norm = float(np.linalg.norm(exact))
        scale = factor / d
        exact_softmax = np.exp(scale * X @ X.T)
        norm_softmax = float(np.linalg.norm(exact_softmax))
        for m in MS:
            for method, make in GAUSSIAN.items():
                errors = [
                    _gram_error(make(gamma, m, s).fit_transform(X), exact, norm)
                    for s in range(SEEDS)
                ]
                row = {"factor": factor, "m": m, "method": method, **_summary(errors)}
                out["gram"].append(row)
                if method not in CV_METHODS:
                    continue
                scores = [
                    float(
                        cross_val_score(
                            make_pipeline(StandardScaler(), make(gamma, m, s), model()),
                            X_raw,
                            y,
                            cv=folds,
                        ).mean()
                    )
                    for s in range(SEEDS)
                ]
                out["cv"].append({"factor": factor, "m": m, "method": method, **_summary(scores)})
            for method, make in SOFTMAX.items():
                errors = [
                    _gram_error(make(scale, m, s).fit_transform(X), exact_softmax, norm_softmax)
                    for s in range(SEEDS)
                ]
                out["softmax"].append(
                    {"factor": factor, "m": m, "method": method, **_summary(errors)}
                )
        print(f"{name}: factor {factor} done", flush=True)
    return out


# -- tables -------------------------------------------------------------------------------


def _find(rows: list[dict[str, Any]], **key: Any) -> dict[str, Any]:
    return next(r for r in rows if all(r[k] == v for k, v in key.items()))


def _complete(data: dict[str, Any]) -> list[str]:
    """The datasets measured at every factor (a partial run shows only those)."""
    return [
        n for n in DATASETS if n in data and {r["factor"] for r in data[n]["gram"]} >= set(FACTORS)
    ]


def _cell(row: dict[str, Any], digits: int = 3) -> str:
    return f"{row['mean']:.{digits}f} ± {row['std']:.{digits}f}"


def _label(name: str, info: dict[str, Any]) -> str:
    return f"{name} ({info['n']} × {info['d']})"


TEXT = ("dataset (n × d)", "score")  # the left-aligned columns


def tables(results: dict[str, Any]) -> str:
    data = results["datasets"]
    names = _complete(data)
    lines: list[str] = []

    def table(title: str, head: list[str], rows: list[list[str]]) -> None:
        lines.extend([title, "", "| " + " | ".join(head) + " |"])
        lines.append("|" + "|".join("---" if h in TEXT else "---:" for h in head) + "|")
        lines.extend("| " + " | ".join(r) + " |" for r in rows)
        lines.append("")

    main = ["RBFSampler", "Nystroem", "FavorFeatures()"]
    rows = []
    for name in names:
        info = data[name]
        for m in MS:
            found = [_find(info["gram"], factor=1.0, m=m, method=k) for k in main]
            ratio = found[2]["mean"] / found[0]["mean"]
            rows.append([_label(name, info), str(m), *(_cell(r) for r in found), f"{ratio:.2f}"])
    table(
        "**Gaussian kernel, γ = 1/n_features: relative Gram error** (mean ± std over "
        f"{SEEDS} seeds; last column: FavorFeatures() / RBFSampler)",
        ["dataset (n × d)", "m", *main, "ratio"],
        rows,
    )

    rows = []
    for name in names:
        info = data[name]
        for factor in FACTORS:
            found = [_find(info["gram"], factor=factor, m=256, method=k) for k in main]
            ratio = found[2]["mean"] / found[0]["mean"]
            rows.append(
                [_label(name, info), f"{factor:g}", *(_cell(r) for r in found), f"{ratio:.2f}"]
            )
    table(
        "**Gaussian kernel, γ = c/n_features, m = 256: relative Gram error** (mean ± std "
        f"over {SEEDS} seeds)",
        ["dataset (n × d)", "c", *main, "ratio"],
        rows,
    )

    variants = [k for k in GAUSSIAN if k not in ("Nystroem",)]
    rows = []
    for name in names:
        info = data[name]
        found = [_find(info["gram"], factor=1.0, m=256, method=k) for k in variants]
        best = min(r["mean"] for r in found)
        rows.append(
            [
                _label(name, info),
                *(
                    f"**{r['mean']:.3f}**" if r["mean"] == best else f"{r['mean']:.3f}"
                    for r in found
                ),
            ]
        )
    table(
        "**FavorFeatures variants, Gaussian kernel, γ = 1/n_features, m = 256: relative "
        f"Gram error** (mean over {SEEDS} seeds; the best in bold; the trigonometric map "
        "unless named; norms stratified unless named)",
        ["dataset (n × d)", *variants],
        rows,
    )

    def cv_rows(factors: list[float], ms: list[int]) -> list[list[str]]:
        rows = []
        for name in names:
            info = data[name]
            metric = "accuracy" if info["task"] == "classification" else "R²"
            for factor in factors:
                for m in ms:
                    found = [_find(info["cv"], factor=factor, m=m, method=k) for k in CV_METHODS]
                    best = max(r["mean"] for r in found if r["method"] != "Nystroem")
                    cells = [
                        f"**{_cell(r)}**"
                        if r["mean"] == best and r["method"] != "Nystroem"
                        else _cell(r)
                        for r in found
                    ]
                    ours, theirs = found[CV_METHODS.index("FavorFeatures()")], found[0]
                    se = np.hypot(ours["std"], theirs["std"]) / np.sqrt(SEEDS)
                    delta = f"{ours['mean'] - theirs['mean']:+.3f} ± {se:.3f}"
                    rows.append([_label(name, info), metric, f"{factor:g}", str(m), *cells, delta])
        return rows

    caption = (
        f"{FOLDS}-fold CV score of ridge regression (R²) or ridge classification (accuracy) "
        f"on the features** (mean ± std over {SEEDS} seeds of the features; the same folds "
        "for every method; alpha chosen in each training fold by leave-one-out over "
        "10⁻⁶…10³; the best random-feature method in bold; Δ: FavorFeatures() − "
        "RBFSampler ± its standard error)"
    )
    head = ["dataset (n × d)", "score", "c", "m", *CV_METHODS, "Δ"]
    table(f"**Downstream, γ = 1/n_features: {caption}", head, cv_rows([1.0], MS))
    sweep = [f for f in FACTORS if f != 1.0]
    table(f"**Downstream, γ = c/n_features: {caption}", head, cv_rows(sweep, MS))

    soft = list(SOFTMAX)
    rows = []
    for name in names:
        info = data[name]
        for factor in FACTORS:
            found = [_find(info["softmax"], factor=factor, m=256, method=k) for k in soft]
            best = min(r["mean"] for r in found)
            rows.append(
                [
                    _label(name, info),
                    f"{factor:g}",
                    *(f"**{_cell(r)}**" if r["mean"] == best else _cell(r) for r in found),
                ]
            )
    table(
        "**Softmax kernel exp(s x·y), s = c/n_features, m = 256: relative Gram error** "
        f"(mean ± std over {SEEDS} seeds; the best in bold)",
        ["dataset (n × d)", "c", *soft],
        rows,
    )
    return "\n".join(lines)


# -- plots --------------------------------------------------------------------------------

STYLE = {
    "RBFSampler": ("tab:red", "o", "--"),
    "Nystroem": ("tab:grey", "s", ":"),
    "FavorFeatures()": ("tab:blue", "o", "-"),
    "orthogonal, chi": ("tab:cyan", "^", "-"),
    "iid, chi": ("tab:orange", "v", "-"),
    "positive, chi": ("tab:purple", "d", "-."),
}


def plot(
    results: dict[str, Any], out: Path, key: str, methods: list[str], ylabel: str, title: str
) -> None:
    data = results["datasets"]
    names = _complete(data)
    fig, axes = plt.subplots(2, 4, figsize=(15, 7.4), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        info = data[name]
        floor = math.inf
        for i, method in enumerate(methods):
            color, marker, line = STYLE[method]
            rows = [_find(info[key], factor=1.0, m=m, method=method) for m in MS]
            mean = np.array([r["mean"] for r in rows])
            std = np.array([r["std"] for r in rows])
            low = np.minimum(std, 0.9 * mean) if key == "gram" else std  # (log axis)
            if method != "Nystroem":
                floor = min(floor, float(np.min(mean - low)))
            dodge = 1.0 + 0.04 * (i - (len(methods) - 1) / 2)  # keep the error bars apart
            ax.errorbar(
                np.array(MS) * dodge,
                mean,
                yerr=[low, std],
                color=color,
                marker=marker,
                linestyle=line,
                capsize=3,
                label=method if method != "FavorFeatures()" else "FavorFeatures() (default)",
            )
        ax.set_xscale("log")
        if key == "gram":
            ax.set_yscale("log")
            top = ax.get_ylim()[1]
            ax.set_ylim(floor / 2, top)  # Nystroem's exact (m >= n) points fall below
        ax.set_xticks(MS, [str(m) for m in MS])
        ax.minorticks_off()
        ax.set_title(f"{name} (n = {info['n']}, d = {info['d']})", fontsize=10)
        ax.set_xlabel("n_components")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def render(results: dict[str, Any], out: Path) -> None:
    (out / "kernel_features.md").write_text(tables(results))
    plot(
        results,
        out / "gram_error.png",
        "gram",
        [k for k in STYLE if k != "positive, chi"],  # (0.5-1: in the tables)
        "relative Gram error",
        "Gaussian kernel, γ = 1/n_features, standardised inputs: |K̂ − K|_F / |K|_F "
        f"against n_components, mean ± std over {SEEDS} seeds\n(Nystroem is exact, off "
        "the bottom of the scale, once n_components ≥ n_samples)",
    )
    plot(
        results,
        out / "cv_score.png",
        "cv",
        ["RBFSampler", "Nystroem", "FavorFeatures()", "positive, chi"],
        "5-fold CV score (accuracy / R²)",
        "Ridge (classifier) on the features, alpha by leave-one-out in each training fold, "
        f"γ = 1/n_features, standardised inputs:\n{FOLDS}-fold CV score against "
        f"n_components, mean ± std over {SEEDS} seeds",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", default="docs/_static/kernel")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--factors", default=",".join(f"{f:g}" for f in FACTORS))
    parser.add_argument("--tables", action="store_true", help="only redraw tables and plots")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "kernel_features.json"
    results: dict[str, Any] = (
        json.loads(path.read_text())
        if path.exists()
        else {
            "setup": {
                "seeds": SEEDS,
                "n_components": MS,
                "gamma_factors": FACTORS,
                "alphas": [float(a) for a in ALPHAS],
                "folds": FOLDS,
                "standardised": True,
            },
            "datasets": {},
        }
    )
    if not args.tables:
        factors = [float(f) for f in args.factors.split(",")]
        if not set(factors) <= set(FACTORS):
            raise SystemExit(f"factors must be among {FACTORS}")
        for name in args.datasets.split(","):
            if name not in DATASETS:
                raise SystemExit(f"unknown dataset {name!r}; one of {DATASETS}")
            with warnings.catch_warnings():
                # Nystroem with n_components > n_samples uses every sample (and says so)
                warnings.filterwarnings("ignore", message="n_components > n_samples")
                new = measure(name, factors)
            old = results["datasets"].get(name, {})
            for key in ("gram", "cv", "softmax"):  # keep the rows of the other factors
                new[key] = [r for r in old.get(key, []) if r["factor"] not in factors] + new[key]
            results["datasets"][name] = new
            path.write_text(json.dumps(results, indent=1) + "\n")
    render(results, out)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
