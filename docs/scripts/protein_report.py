"""Collect the protein page's runs into ``docs/_static/protein`` (a summary JSON and plots).

Usage: ``python docs/scripts/protein_report.py RUNS [--out docs/_static/protein]``, where
RUNS holds the output directories of the commands listed on the protein page (a run that
is missing is left out). With ``--update`` the runs and conversions found in RUNS replace
their namesakes in the existing summary and the rest is kept, so that part of the page's
experiment can be rerun on its own. The docs build renders the summary's tables.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

PAIRS = [("L1024-mlm", "L = 1024, masked"), ("L1024-causal", "L = 1024, next residue")]
LONG = ["L8192-mlm", "L8192-causal"]
CONVERSIONS = [("convert-mlm", "PerformerLM, masked"), ("convert-causal", "PerformerLM, next residue"),
               ("convert-bert", "Hugging Face BERT, masked")]  # fmt: skip


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _score(r: dict[str, Any]) -> dict[str, Any]:
    keys = ("accuracy", "accuracy_ci95", "perplexity", "perplexity_ci95", "positions",
            "kl_to_reference", "agreement")  # fmt: skip
    return {k: r[k] for k in keys if k in r}


def _run(m: dict[str, Any]) -> dict[str, Any]:
    mem = m["memory"]
    peak = mem.get("max_rss_bytes", mem.get("cuda_max_allocated_bytes", 0)) / 2**20
    return {
        "command": " ".join(m["command"]), "mode": m["mode"], "attention": m["attention"],
        "length": m["args"]["length"], "batch_size": m["args"]["batch_size"],
        "steps": m["steps"], "train_seconds": m["train_seconds"],
        "median_step_seconds": m["median_step_seconds"], "peak_mib": peak,
        "memory_kind": "peak RSS" if "max_rss_bytes" in mem else "CUDA max allocated",
        "threads": m["threads"], "device": m["device"], "held_out": _score(m["held_out"]),
        "unigram": _score(m["unigram"]), "config": m["config"],
        "data": {**m["data"], "files": [Path(f).name for f in m["data"]["files"]]},
    }  # fmt: skip


def _at_step(history: list[dict[str, Any]], step: int) -> dict[str, Any] | None:
    return next((h for h in history if h["step"] == step), None)


def _equal_steps(curves: dict[str, Any]) -> list[dict[str, Any]]:
    """Each pair's scores at the last evaluation step that both of its runs reached."""
    out = []
    for prefix, title in PAIRS:
        fav, ex = curves.get(f"{prefix}-favor"), curves.get(f"{prefix}-exact")
        if not (fav and ex):
            continue
        common = max({h["step"] for h in fav} & {h["step"] for h in ex}, default=None)
        if common is not None:
            f, e = _at_step(fav, common), _at_step(ex, common)
            assert f is not None
            assert e is not None
            out.append({"pair": prefix, "title": title, "step": common,
                        "favor": _score(f), "exact": _score(e)})  # fmt: skip
    return out


def update(previous: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``previous`` with ``new``'s runs, curves and conversions in place of their namesakes."""
    runs = {**previous["runs"], **new["runs"]}
    curves = {**previous["curves"], **new["curves"]}
    fresh = {c["name"]: c for c in new["conversions"]}
    names = [c["name"] for c in previous["conversions"]]
    names += [n for n in fresh if n not in names]
    old = {c["name"]: c for c in previous["conversions"]}
    conversions = [fresh.get(n, old.get(n)) for n in names]
    return {"runs": runs, "equal_steps": _equal_steps(curves), "conversions": conversions,
            "curves": curves}  # fmt: skip


def collect(runs: Path) -> dict[str, Any]:
    """The summary: runs, equal-step comparisons, conversions."""
    out: dict[str, Any] = {"runs": {}, "equal_steps": [], "conversions": []}
    curves: dict[str, Any] = {}
    for name in [f"{p}-{a}" for p, _ in PAIRS for a in ("favor", "exact")] + [
        f"{p}-{a}" for p in LONG for a in ("favor", "exact")
    ] + ["bert-exact"]:  # fmt: skip
        m = _load(runs / name / "metrics.json")
        if m is not None:
            out["runs"][name] = _run(m)
            curves[name] = m["history"]["eval"]
    out["equal_steps"] = _equal_steps(curves)
    for name, title in CONVERSIONS:
        c = _load(runs / name / "conversion.json")
        if c is not None:
            out["conversions"].append({
                "name": name, "title": title, "mode": c["mode"], "source": c["source"],
                "source_metrics": _score(c["source_metrics"]), "unigram": _score(c["unigram"]),
                "converted": [{"attention": r["attention"], "m": r["m"], **_score(r)}
                              for r in c["converted"]],
                "fine_tune": None if "fine_tune" not in c else {
                    "m": c["fine_tune"]["m"],
                    "curve": [(p["step"], p["accuracy"]) for p in c["fine_tune"]["curve"]],
                    "final": _score(c["fine_tune"]["final"]),
                },
            })  # fmt: skip
    out["curves"] = curves
    return out


def plot(summary: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = summary["curves"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for row, (prefix, title) in zip(axes, PAIRS, strict=True):
        for name, style in ((f"{prefix}-favor", "o-"), (f"{prefix}-exact", "s-")):
            if name not in curves:
                continue
            run = summary["runs"][name]
            label = "Performer (favorcore)" if run["attention"] != "exact" else "exact (SDPA)"
            h = curves[name]
            row[0].plot(
                [p["step"] for p in h], [p["accuracy"] for p in h], style, ms=3, label=label
            )
            row[1].plot([p["seconds"] / 60 for p in h], [p["accuracy"] for p in h], style, ms=3,
                        label=label)  # fmt: skip
            uni = run["unigram"]["accuracy"]
        if f"{prefix}-exact" in curves:
            for ax in row:
                ax.axhline(uni, color="gray", ls=":", label="unigram")
        row[0].set(xlabel="training step", ylabel="held-out accuracy", title=f"{title}: by step")
        row[1].set(xlabel="training minutes", ylabel="held-out accuracy",
                   title=f"{title}: by wall-clock")  # fmt: skip
        row[1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=100)
    plt.close(fig)
    conv = summary["conversions"]
    if conv:
        fig, axes = plt.subplots(2, len(conv), figsize=(4.2 * len(conv), 7.5), squeeze=False)
        for j, c in enumerate(conv):
            top, bottom = axes[0][j], axes[1][j]
            for att, style, name in (("favor", "o-", "favorcore default (FAVOR++, balanced)"),
                                     ("favor+", "s--", "FAVOR+"),
                                     ("performer-pytorch", "^:", "performer-pytorch")):  # fmt: skip
                rows = [r for r in c["converted"] if r["attention"] == att]
                if not rows:
                    continue
                top.plot([r["m"] for r in rows], [r["accuracy"] for r in rows], style, label=name)
            top.axhline(c["source_metrics"]["accuracy"], color="k", label="trained exact")
            top.axhline(c["unigram"]["accuracy"], color="gray", ls=":", label="unigram")
            top.set(xscale="log", xlabel="random features m", ylabel="held-out accuracy",
                    title=f"{c['title']}:\nconverted, no training")  # fmt: skip
            top.legend(fontsize=7)
            if c["fine_tune"]:
                steps, acc = zip(*c["fine_tune"]["curve"], strict=True)
                bottom.plot([0, *steps], [c["converted_at_fine_tune_m"], *acc], "o-", ms=3)
                bottom.axhline(c["source_metrics"]["accuracy"], color="k", label="trained exact")
                bottom.set(xlabel="fine-tuning step", ylabel="held-out accuracy",
                           title=f"fine-tuned, m = {c['fine_tune']['m']}")  # fmt: skip
                bottom.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "conversion.png", dpi=100)
        plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path)
    p.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "_static" / "protein")
    p.add_argument("--update", action="store_true",
                   help="keep the existing summary's runs that RUNS does not hold")  # fmt: skip
    args = p.parse_args()
    summary = collect(args.runs)
    for c in summary["conversions"]:
        if c["fine_tune"]:
            at = [
                r
                for r in c["converted"]
                if r["attention"] == "favor" and r["m"] == c["fine_tune"]["m"]
            ]
            c["converted_at_fine_tune_m"] = at[0]["accuracy"] if at else None
    if args.update:
        summary = update(json.loads((args.out / "protein.json").read_text()), summary)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "protein.json").write_text(json.dumps(summary, indent=1))
    plot(summary, args.out)
    print(f"wrote {args.out / 'protein.json'} ({len(summary['runs'])} runs, "
          f"{len(summary['conversions'])} conversions)")  # fmt: skip


if __name__ == "__main__":
    main()
