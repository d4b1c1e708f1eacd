"""Sphinx configuration: MyST pages, API reference from the numpydoc docstrings.

At build time it runs ``scripts/figures.py`` (the accuracy figures) and renders the
benchmark tables (from ``_static/bench/bench.json``, written by ``nox -s bench``) and the
backend support matrix (from ``favorcore_backends.support``) into ``_generated/``.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

HERE = Path(__file__).parent
GENERATED = HERE / "_generated"
GENERATED.mkdir(exist_ok=True)

project = "favorcore"
author = "the favorcore developers"
copyright = "2026, the favorcore developers"
extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.intersphinx",
]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "scripts", "_generated/*.md", "_static/**/*.md"]
html_theme = "furo"
html_static_path = ["_static"]
html_title = "favorcore"
autodoc_mock_imports = ["cupy"]  # the CuPy adapter documents itself without a GPU
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "description"
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_rtype = False
nitpicky = False
intersphinx_mapping = (
    {"python": ("https://docs.python.org/3", None)}
    if os.environ.get("FAVORCORE_DOCS_ONLINE")
    else {}
)
suppress_warnings = ["myst.header"]


def _bench_table() -> str:
    path = HERE / "_static" / "bench" / "bench.json"
    if not path.exists():
        return "*No benchmark results yet: run `nox -s bench`.*\n"
    data = json.loads(path.read_text())
    if "shape" not in data:  # a run stopped before its end writes only its rows
        return "*The benchmark run that wrote this file did not finish.*\n"
    shape = data["shape"]
    lines = [
        f"{shape['dtype']} on the {shape.get('device', 'cpu')}, batch 1, {shape['heads']} heads, "
        f"d = {shape['d']}, m = {shape['m']}, "
        f"{shape['threads']} threads. Each case's share of the GEMM rate is against the rate "
        "measured in its own process just before it (medians over the run: "
        + ", ".join(f"{b} {g:.0f} GFLOP/s" for b, g in data["gemm_gflops"].items())
        + ").",
        "",
        "| L | mode | method | median ms | peak MiB | GFLOP/s | GEMM GFLOP/s | % of GEMM |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in data["rows"]:
        if "median_s" not in r:
            lines.append(f"| {r['L']} | {r['mode']} | {r['method']} | error | | | | |")
            continue
        lines.append(
            f"| {r['L']} | {r['mode']} | {r['method']} | {1e3 * r['median_s']:.1f} | "
            f"{r['peak_mib']:.1f} | {r['gflops']:.1f} | {r.get('gemm_gflops', float('nan')):.0f} | "
            f"{r['pct_gemm']:.1f} |"
        )
    lines += [
        "",
        "| L | mode | favorcore | peer | speed-up | memory vs peer |",
        "|---:|---|---|---|---:|---:|",
    ]
    for r in data["ratios"]:
        if "speedup" in r:
            lines.append(
                f"| {r['L']} | {r['mode']} | {r['method']} | {r['peer']} | {r['speedup']:.2f}x | "
                f"{r['memory_ratio']:.2f}x |"
            )
    costs = [r for r in data["ratios"] if "cost" in r]
    if costs:
        lines += [
            "",
            "The default estimator (FAVOR++ with the matrix balance) against FAVOR+:",
            "",
            "| L | mode | default | FAVOR+ | time ratio |",
            "|---:|---|---|---|---:|",
        ]
        lines += [
            f"| {r['L']} | {r['mode']} | {r['method']} | {r['peer']} | {r['cost']:.2f}x |"
            for r in costs
        ]
    return "\n".join(lines) + "\n"


def _train_table() -> str:
    path = HERE / "_static" / "bench" / "bench-train.json"
    if not path.exists():
        return "*No training results yet: run `nox -s bench -- --train`.*\n"
    data = json.loads(path.read_text())
    if "shape" not in data:  # a run stopped before its end writes only its rows
        return "*The benchmark run that wrote this file did not finish.*\n"
    shape = data["shape"]
    lines = [
        (
            f"A training step (forward and backward of the output's sum), {shape['dtype']} on the "
            f"{shape['device']}, batch 1, {shape['heads']} heads, d = {shape['d']}, "
            f"m = {shape['m']}, {shape['threads']} threads; the median of the steps, the step's "
            "peak memory, and the step's time over the forward's (timed alternately in the same "
            "process)."
        ),
        "",
        "| L | mode | method | ms per step | peak MiB | step / forward |",
        "|---:|---|---|---:|---:|---:|",
    ]
    for r in data["rows"]:
        if "median_s" not in r:
            lines.append(f"| {r['L']} | {r['mode']} | {r['method']} | {r['error']} | | |")
            continue
        lines.append(
            f"| {r['L']} | {r['mode']} | {r['method']} | {1e3 * r['median_s']:.1f} | "
            f"{r['peak_mib']:.0f} | {r['step_ratio']:.2f} |"
        )
    lines += ["", "| L | mode | favorcore | peer | step speed-up | memory vs peer |",
              "|---:|---|---|---|---:|---:|"]  # fmt: skip
    for r in data["ratios"]:
        if "speedup" in r:
            lines.append(
                f"| {r['L']} | {r['mode']} | {r['method']} | {r['peer']} | {r['speedup']:.2f}x | "
                f"{r['memory_ratio']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def _bench_summary() -> str:
    """The performance page's summary: time per call of favorcore and the others."""
    path = HERE / "_static" / "bench" / "bench.json"
    if not path.exists():
        return "*No benchmark results yet: run `nox -s bench`.*\n"
    data = json.loads(path.read_text())
    if "shape" not in data:  # a run stopped before its end writes only its rows
        return "*The benchmark run that wrote this file did not finish.*\n"
    shape = data["shape"]
    index = {(r["L"], r["mode"], r["method"]): r for r in data["rows"] if "median_s" in r}
    methods = [
        ("favorcore++-numpy", "favorcore NumPy, default"),
        ("favorcore-numpy", "favorcore NumPy, FAVOR+"),
        ("favorcore-torch", "favorcore PyTorch, FAVOR+"),
        ("performer", "performer-pytorch"),
        ("sdpa", "exact (PyTorch SDPA)"),
    ]
    methods = [(m, name) for m, name in methods if any(k[2] == m for k in index)]
    lengths = [n for n in (2048, 8192, 16384) if any(k[0] == n for k in index)]
    lines = [
        (
            f"Time per call in ms (peak memory of the call in MiB): {shape['dtype']} on the "
            f"{shape.get('device', 'cpu')}, {shape['threads']} threads, batch 1, "
            f"{shape['heads']} heads, d = {shape['d']}, m = {shape['m']}."
        ),
        "",
        "| L | mode | " + " | ".join(name for _, name in methods) + " |",
        "|---:|---|" + "---:|" * len(methods),
    ]
    for n in lengths:
        for mode in ("bidirectional", "causal"):
            cells = []
            for m, _ in methods:
                r = index.get((n, mode, m))
                cells.append(
                    "" if r is None else f"{1e3 * r['median_s']:.0f} ({r['peak_mib']:.0f})"
                )
            lines.append(f"| {n} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _support_table() -> str:
    from favorcore_backends.support import SUPPORT

    lines = [
        "| backend | dtypes | devices | jit / compile | autograd | adapter |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in SUPPORT.items():
        lines.append(
            f"| {name} | {', '.join(row['dtypes'])} | {', '.join(row['devices'])} | {row['jit']} | "
            f"{row['autograd']} | {row['adapter']} |"
        )
    return "\n".join(lines) + "\n"


def _ci(r: dict, key: str, fmt: str) -> str:
    lo, hi = r[key + "_ci95"]
    return f"{r[key]:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def _protein_tables() -> str:
    """The protein page's tables, from ``_static/protein/protein.json``
    (``scripts/protein_report.py``)."""
    path = HERE / "_static" / "protein" / "protein.json"
    if not path.exists():
        return "*No protein runs collected yet: see the commands below.*\n"
    data = json.loads(path.read_text())
    runs = data["runs"]
    name = {"favor": "Performer (favorcore default)", "favor+": "Performer (FAVOR+)",
            "exact": "exact (SDPA)"}  # fmt: skip
    out = ["### Single proteins, L = 1024, equal wall-clock", "",
           ("Held-out accuracy and perplexity with 95 % bootstrap intervals (over held-out "
           "proteins); *positions* is the number of scored residues, the same for every row "
           "of a task."), "",
           "| task | model | steps | s / step | peak MiB | accuracy | perplexity | positions |",
           "|---|---|---:|---:|---:|---|---|---:|"]  # fmt: skip
    for prefix, task in (("L1024-mlm", "masked"), ("L1024-causal", "next residue")):
        rows = [runs[k] for k in (f"{prefix}-favor", f"{prefix}-exact") if k in runs]
        for r in rows:
            h = r["held_out"]
            out.append(
                f"| {task} | {name[r['attention']]} | {r['steps']} | "
                f"{r['median_step_seconds']:.2f} | {r['peak_mib']:.0f} | "
                f"{_ci(h, 'accuracy', '.4f')} | {_ci(h, 'perplexity', '.2f')} | {h['positions']} |"
            )
        if rows:
            u = rows[-1]["unigram"]
            out.append(f"| {task} | unigram (residue frequencies) | | | | "
                       f"{_ci(u, 'accuracy', '.4f')} | {_ci(u, 'perplexity', '.2f')} | "
                       f"{u['positions']} |")  # fmt: skip
    if data["equal_steps"]:
        out += ["", "### The same runs at equal steps", "",
                "| task | step | Performer accuracy | exact accuracy | difference (points) |",
                "|---|---:|---|---|---:|"]  # fmt: skip
        for e in data["equal_steps"]:
            diff = 100 * (e["favor"]["accuracy"] - e["exact"]["accuracy"])
            out.append(f"| {e['title']} | {e['step']} | {_ci(e['favor'], 'accuracy', '.4f')} | "
                       f"{_ci(e['exact'], 'accuracy', '.4f')} | {diff:+.2f} |")  # fmt: skip
    long = [(k, runs[k]) for p in ("L8192-mlm", "L8192-causal")
            for k in (f"{p}-favor", f"{p}-exact") if k in runs]  # fmt: skip
    if long:
        out += ["", "### Concatenated proteins, L = 8192", "",
                ("Attention within each protein (the documents' boundaries); held-out "
                 "accuracy after these few steps, with 95 % bootstrap intervals over "
                 "held-out proteins."), "",
                ("| task | model | steps | median s / step | peak MiB | exact's step / this step "
                 "| accuracy | positions |"),
                "|---|---|---:|---:|---:|---:|---|---:|"]  # fmt: skip
        for i, (k, r) in enumerate(long):
            ex = runs.get(k.rsplit("-", 1)[0] + "-exact")
            ratio = (f"{ex['median_step_seconds'] / r['median_step_seconds']:.2f}x"
                     if ex else "")  # fmt: skip
            task = "masked" if r["mode"] == "mlm" else "next residue"
            h = r["held_out"]
            out.append(
                f"| {task} | {name[r['attention']]} | {r['steps']} | "
                f"{r['median_step_seconds']:.2f} | {r['peak_mib']:.0f} | {ratio} | "
                f"{_ci(h, 'accuracy', '.4f')} | {h['positions']} |"
            )
            if i + 1 == len(long) or long[i + 1][1]["mode"] != r["mode"]:
                u = r["unigram"]
                out.append(f"| {task} | unigram (residue frequencies) | | | | | "
                           f"{_ci(u, 'accuracy', '.4f')} | {u['positions']} |")  # fmt: skip
    labels = {"favor": "favorcore default", "favor+": "FAVOR+",
              "performer-pytorch": "performer-pytorch"}  # fmt: skip
    for c in data["conversions"]:
        src = c["source_metrics"]
        present = {r["attention"] for r in c["converted"]}
        columns = [(att, label) for att, label in labels.items() if att in present]
        out += ["", f"### Conversion: {c['title']}", "",
                (f"The trained exact model: accuracy {_ci(src, 'accuracy', '.4f')} over "
                f"{src['positions']} positions (unigram {c['unigram']['accuracy']:.4f}). Its "
                "weights with FAVOR attention, without training; *KL* is the mean "
                "KL(trained || converted) of the predicted distributions per scored position "
                "(nats), *agree* the share of positions where their top predictions agree."), "",
                "| m | " + " | ".join(f"{label} | drop (points) | KL | agree"
                                      for _, label in columns) + " |",
                "|---:|" + "---|---:|---:|---:|" * len(columns)]  # fmt: skip
        by = {(r["attention"], r["m"]): r for r in c["converted"]}
        for m in sorted({r["m"] for r in c["converted"]}):
            cells = []
            for att, _ in columns:
                r = by.get((att, m))
                cells += ([_ci(r, "accuracy", ".4f"),
                           f"{100 * (src['accuracy'] - r['accuracy']):.2f}",
                           f"{r['kl_to_reference']:.1e}", f"{100 * r['agreement']:.1f} %"]
                          if r else ["", "", "", ""])  # fmt: skip
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        if c["fine_tune"]:
            f = c["fine_tune"]
            out += ["", (f"Fine-tuned at m = {f['m']} for {f['curve'][-1][0]} steps: accuracy "
                    f"{_ci(f['final'], 'accuracy', '.4f')}.")]  # fmt: skip
    return "\n".join(out) + "\n"


(GENERATED / "bench_table.md").write_text(_bench_table())
(GENERATED / "protein_table.md").write_text(_protein_tables())
(GENERATED / "train_table.md").write_text(_train_table())
(GENERATED / "bench_summary.md").write_text(_bench_summary())
(GENERATED / "support_table.md").write_text(_support_table())
if not os.environ.get("FAVORCORE_DOCS_SKIP_FIGURES"):
    sys.argv = ["figures.py", str(HERE / "_static" / "figures")]
    runpy.run_path(str(HERE / "scripts" / "figures.py"), run_name="__main__")
