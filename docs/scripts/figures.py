"""The accuracy figures of the docs, computed with favorcore (run by docs/conf.py).

1. ``mse_vs_m.png``: mean squared error of the attention output against exact softmax
   attention versus m, iid vs orthogonal projections, positive vs hyperbolic vs
   trigonometric features (the Performer papers' figure: L = 4096, d = 16).
2. ``error_vs_norm.png``: relative error versus the scale of q and k at m = 256, which
   shows where trigonometric features break down (and positive ones degrade).

Usage: ``python docs/scripts/figures.py OUT_DIR``.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import favorcore as fc

MAPS = {
    "positive": lambda m, s, p: fc.PositiveFeatures(m=m, seed=s, projection=p),
    "hyperbolic": lambda m, s, p: fc.hyperbolic_features(m, seed=s, projection=p),
    "trigonometric": lambda m, s, p: fc.TrigonometricFeatures(m=m, seed=s, projection=p),
}


def mse_vs_m(out: Path, length: int = 4096, d: int = 16, seeds: int = 20) -> None:
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((length, d)) * 0.5 for _ in range(3))
    exact = fc.softmax_attention(q, k, v)
    ms = [16, 32, 64, 128, 256, 512]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, make in MAPS.items():
        for proj, style in (("iid", "--"), ("orthogonal", "-")):
            mse = [
                np.mean(
                    [
                        np.mean(
                            (fc.favor_attention(q, k, v, features=make(m, s, proj)) - exact) ** 2
                        )
                        for s in range(seeds)
                    ]
                )
                for m in ms
            ]
            ax.loglog(ms, mse, style, marker="o", label=f"{name}, {proj}")
    ax.set_xticks(ms, [str(m) for m in ms])
    ax.minorticks_off()
    ax.set_xlabel("number of random features m")
    ax.set_ylabel("MSE of the attention output")
    ax.set_title(f"L = {length}, d = {d}, q, k ~ N(0, 0.5²), mean of {seeds} seeds")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "mse_vs_m.png", dpi=120)
    plt.close(fig)


def error_vs_norm(out: Path, length: int = 1024, d: int = 16, m: int = 256, seeds: int = 5) -> None:
    rng = np.random.default_rng(1)
    base = [rng.standard_normal((length, d)) for _ in range(3)]
    scales = np.logspace(-1, 0.4, 9)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, make in MAPS.items():
        errs = []
        for sigma in scales:
            q, k, v = base[0] * sigma, base[1] * sigma, base[2]
            exact = fc.softmax_attention(q, k, v)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # trig overflow is the point
                e = [
                    np.linalg.norm(
                        fc.favor_attention(q, k, v, features=make(m, s, "orthogonal")) - exact
                    )
                    / np.linalg.norm(exact)
                    for s in range(seeds)
                ]
            errs.append(np.median(e))
        ax.loglog(scales, errs, marker="o", label=name)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("standard deviation of q and k entries (logit std = its square)")
    ax.set_ylabel("relative error |out − exact| / |exact|")
    ax.set_title(f"m = {m}, orthogonal, L = {length}, d = {d}, median of {seeds} seeds")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "error_vs_norm.png", dpi=120)
    plt.close(fig)


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/_static/figures")
    out.mkdir(parents=True, exist_ok=True)
    mse_vs_m(out)
    error_vs_norm(out)
    print(f"figures written to {out}")


if __name__ == "__main__":
    main()
