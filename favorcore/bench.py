"""Side-by-side benchmark: favorcore against exact attention and performer-pytorch.

``python -m favorcore bench`` (``nox -s bench`` installs the peers) times every method on
identical float32 inputs ``(1, heads, L, d)`` in a fresh subprocess per case, with the same
thread count for everyone, and reports per case

* the median time of ``repeats`` calls after one warm-up call;
* the peak memory of one call: the subprocess's peak resident set during the call minus
  its resident set just before it (tracemalloc sees neither PyTorch nor JAX);
* the effective rate ``8 L m d heads / time`` (DESIGN.md section 5) and that rate as a
  percentage of the backend's float32 GEMM rate (a 4096^3 matmul) measured in the case's
  own subprocess just before it (the machine's speed drifts during a run);

then the ratios favorcore/peer and favorcore/exact, pair by pair. ``favorcore-*`` run
FAVOR+ (``PositiveFeatures``, no balance: the peers' algorithm); ``favorcore++-*`` run
the library's default estimator, FAVOR++ with the matrix balance (per call when
bidirectional; causal calls get statistics computed once beforehand, as from a
calibration batch), and their cost is reported against FAVOR+'s. It writes ``bench.json``
and, with matplotlib, ``bench_time.png`` and ``bench_memory.png`` (log-log, one line per
method). ``--scale`` runs causal attention over 2^20 tokens (1 head) and reports the whole
process's peak resident set and the per-token cost against L = 16384.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "run_case"]

METHODS = (
    "favorcore-numpy", "favorcore-torch", "favorcore-jax", "favorcore++-numpy",
    "favorcore++-torch", "sdpa", "performer",
)  # fmt: skip
BACKEND_OF = {
    "favorcore-numpy": "numpy",
    "favorcore-torch": "torch",
    "favorcore-jax": "jax",
    "favorcore++-numpy": "numpy",
    "favorcore++-torch": "torch",
    "sdpa": "torch",
    "performer": "torch",
}
IMPORT_OF = {"numpy": "numpy", "torch": "torch", "jax": "jax", "performer": "performer_pytorch"}


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")  # pragma: no cover - Linux only


def _reset_peak() -> float:
    """Reset this process's peak resident set (Linux ``clear_refs``); returns the RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mib("VmRSS")


def _times(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` (warm it up first)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _gemm_rate(backend: str, repeats: int = 3, n: int = 4096) -> float:
    """GFLOP/s of an ``n``^3 float32 matmul on ``backend`` (best of ``repeats``)."""
    a: Any
    f: Callable[[], Any]
    if backend == "numpy":
        import numpy as np

        a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
        f = lambda: a @ a
    elif backend == "torch":
        import torch

        a = torch.randn(n, n)
        f = lambda: a @ a
    else:
        import jax
        import jax.numpy as jnp

        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        mm = jax.jit(lambda a: a @ a)
        f = lambda: mm(a).block_until_ready()
    f()
    return 2 * n**3 / min(_times(f, repeats)) / 1e9


def run_case(method: str, length: int, causal: bool, heads: int, d: int, m: int, repeats: int,
             threads: int, gemm_size: int = 0) -> dict[str, Any]:  # fmt: skip
    """Time one case in this process (the child of :func:`measure`).

    With ``gemm_size``, the backend's GEMM rate is measured first in this process, under
    the same thread settings, so that the case's share of it compares like with like on a
    machine whose speed drifts during a run.
    """
    import numpy as np

    backend = BACKEND_OF[method]
    rng = np.random.default_rng(0)
    host = [(rng.standard_normal((1, heads, length, d)) * 0.5).astype(np.float32) for _ in range(3)]
    if backend == "numpy":
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads)
    import favorcore as fc

    default = method.startswith("favorcore++")
    fmap = fc.OptimalPositiveFeatures(m=m, seed=0) if default else fc.PositiveFeatures(m=m, seed=0)
    q: Any
    k: Any
    v: Any
    if backend == "torch":
        import torch

        torch.set_num_threads(threads)
        q, k, v = (torch.from_numpy(a) for a in host)
    elif backend == "jax":
        import jax
        import jax.numpy as jnp

        q, k, v = (jnp.asarray(a) for a in host)
    else:
        q, k, v = host
    # FAVOR+: no balance; the default: per call (bidirectional) or calibrated (causal)
    balance: Any = False
    if default:
        balance = fc.balance_statistics(q, k) if causal else None
    if method == "performer":
        from performer_pytorch import FastAttention

        attn = FastAttention(dim_heads=d, nb_features=m, causal=causal)

        def call() -> Any:
            with torch.no_grad():
                return attn(q, k, v)
    elif method == "sdpa":

        def call() -> Any:
            with torch.no_grad():
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    elif backend == "jax":
        fn = jax.jit(
            lambda q, k, v: fc.favor_attention(q, k, v, features=fmap, causal=causal, balance=False)
        )

        def call() -> Any:
            return fn(q, k, v).block_until_ready()
    elif backend == "torch":

        def call() -> Any:
            with torch.no_grad():
                return fc.favor_attention(q, k, v, features=fmap, causal=causal, balance=balance)
    else:

        def call() -> Any:
            return fc.favor_attention(q, k, v, features=fmap, causal=causal, balance=balance)

    gemm = _gemm_rate(backend, repeats=2, n=gemm_size) if gemm_size else None
    process_peak = _status_mib("VmHWM")  # inputs made, nothing called yet
    before = _reset_peak()
    call()  # the first call: its peak is the call's memory (and it warms up)
    peak = _status_mib("VmHWM") - before
    process_peak = max(process_peak, _status_mib("VmHWM"))
    times = _times(call, repeats)
    process_peak = max(process_peak, _status_mib("VmHWM"))
    result = {
        "median_s": statistics.median(times),
        "peak_mib": max(peak, 0.0),
        "process_peak_mib": process_peak,
    }
    if gemm is not None:
        result["gemm_gflops"] = gemm
    return result


def measure(method: str, length: int, causal: bool, **kw: Any) -> dict[str, Any]:
    """Run one case in a fresh subprocess; returns its measurements."""
    spec = json.dumps({"method": method, "length": length, "causal": causal, **kw})
    child = "import json,sys; from favorcore.bench import run_case; print(json.dumps(run_case(**json.loads(sys.argv[1]))))"
    done = subprocess.run(
        [sys.executable, "-c", child, spec],
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    if done.returncode != 0:
        return {
            "error": done.stderr.strip().splitlines()[-1]
            if done.stderr.strip()
            else f"exit {done.returncode}"
        }
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _available(method: str) -> bool:
    import importlib.util

    needed = IMPORT_OF["performer"] if method == "performer" else IMPORT_OF[BACKEND_OF[method]]
    return importlib.util.find_spec(needed) is not None


def bench(lengths: Sequence[int], *, heads: int, d: int, m: int, repeats: int, threads: int,
          methods: Sequence[str], out_dir: Path, plots: bool, gemm_size: int = 4096) -> dict[str, Any]:  # fmt: skip
    """Run every case, print the table and ratios, write JSON (and plots).

    Each case's share of the GEMM rate is against the rate measured in its own subprocess
    just before it (``gemm_size``^3); the header gives the median of those per backend.
    """
    methods = [x for x in methods if _available(x)]
    rows = []
    for length in lengths:
        for causal in (False, True):
            for method in methods:
                r = measure(
                    method, length, causal, heads=heads, d=d, m=m, repeats=repeats,
                    threads=threads, gemm_size=gemm_size,
                )  # fmt: skip
                row = {
                    "L": length,
                    "mode": "causal" if causal else "bidirectional",
                    "method": method,
                    **r,
                }
                if "median_s" in r:
                    rate = 8 * length * m * d * heads / r["median_s"] / 1e9
                    row["gflops"] = rate
                    row["pct_gemm"] = 100 * rate / r["gemm_gflops"]
                rows.append(row)
                _print_row(row)
    gemm = {
        b: statistics.median(
            r["gemm_gflops"] for r in rows if "gemm_gflops" in r and BACKEND_OF[r["method"]] == b
        )
        for b in sorted({BACKEND_OF[r["method"]] for r in rows if "gemm_gflops" in r})
    }
    ratios = _ratios(rows)
    result = {"shape": {"heads": heads, "d": d, "m": m, "dtype": "float32", "threads": threads},
              "gemm_gflops": gemm, "rows": rows, "ratios": ratios}  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(result, indent=1))
    print(
        f"\nGEMM rate ({gemm_size}^3 float32, median over the cases' own measurements): "
        + ", ".join(f"{b} {g:.0f} GFLOP/s" for b, g in gemm.items())
    )
    for line in ratios:
        print(line["text"])
    if plots:
        _plots(rows, out_dir)
    return result


def _print_row(row: dict[str, Any]) -> None:
    if "error" in row:
        print(
            f"{row['L']:>7} {row['mode']:<14} {row['method']:<16} error: {row['error']}", flush=True
        )
        return
    print(
        f"{row['L']:>7} {row['mode']:<14} {row['method']:<16} {1e3 * row['median_s']:>10.1f} ms "
        f"{row['peak_mib']:>9.1f} MiB {row['gflops']:>8.1f} GFLOP/s {row['pct_gemm']:>6.1f} % GEMM "
        f"({row['gemm_gflops']:.0f})",
        flush=True,
    )


def _ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """favorcore (torch and numpy) against performer and SDPA, same L and mode."""
    index = {(r["L"], r["mode"], r["method"]): r for r in rows if "median_s" in r}
    out = []
    for (length, mode, method), r in sorted(index.items()):
        if not method.startswith("favorcore"):
            continue
        if method.startswith("favorcore++"):
            base = index.get((length, mode, method.replace("++", "")))
            if base is not None:
                cost = r["median_s"] / base["median_s"]
                out.append({
                    "L": length, "mode": mode, "method": method, "peer": base["method"], "cost": cost,
                    "text": f"L={length:>6} {mode:<14} {method} (FAVOR++ + balance) costs "
                            f"{cost:5.2f}x {base['method']} (FAVOR+)",
                })  # fmt: skip
            continue
        for peer in ("performer", "sdpa"):
            p = index.get((length, mode, peer))
            if p is None:
                continue
            speed = p["median_s"] / r["median_s"]
            mem = r["peak_mib"] / p["peak_mib"] if p["peak_mib"] > 0 else float("nan")
            out.append({
                "L": length, "mode": mode, "method": method, "peer": peer, "speedup": speed, "memory_ratio": mem,
                "text": f"L={length:>6} {mode:<14} {method} vs {peer}: {speed:6.2f}x faster, "
                        f"memory {mem:5.2f}x of the peer's",
            })  # fmt: skip
    return out


def _plots(rows: list[dict[str, Any]], out_dir: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots")
        return
    for key, label, name in (("median_s", "time per call (s)", "bench_time.png"),
                             ("peak_mib", "peak memory of a call (MiB)", "bench_memory.png")):  # fmt: skip
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
        for ax, mode in zip(axes, ("bidirectional", "causal"), strict=True):
            for method in METHODS:
                pts = [
                    (r["L"], r[key])
                    for r in rows
                    if r["mode"] == mode and r["method"] == method and key in r
                ]
                if pts:
                    ax.loglog(*zip(*pts, strict=True), marker="o", label=method)
            ax.set_title(mode)
            ax.set_xlabel("sequence length L")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].set_ylabel(label)
        axes[1].legend()
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
    print(f"plots: {out_dir / 'bench_time.png'}, {out_dir / 'bench_memory.png'}")


def scale(*, length: int = 2**20, d: int = 64, m: int = 256, threads: int = 2) -> dict[str, Any]:
    """Causal attention over ``length`` tokens, 1 head, NumPy float32, in a fresh process."""
    big = measure("favorcore-numpy", length, True, heads=1, d=d, m=m, repeats=1, threads=threads)
    ref = measure("favorcore-numpy", 16384, True, heads=1, d=d, m=m, repeats=5, threads=threads)
    per_big, per_ref = big["median_s"] / length, ref["median_s"] / 16384
    result = {"L": length, "process_peak_mib": big["process_peak_mib"], "seconds": big["median_s"],
              "per_token_ratio": per_big / per_ref}  # fmt: skip
    print(f"causal L={length}: {big['median_s']:.1f} s, whole-process peak RSS "
          f"{big['process_peak_mib']:.0f} MiB, per-token cost {per_big / per_ref:.2f}x that of L=16384")  # fmt: skip
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``favorcore bench``: see the module docstring."""
    p = argparse.ArgumentParser(prog="favorcore bench", description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--m", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--scale", action="store_true", help="only the 2^20-token causal run")
    a = p.parse_args(argv)
    if any(x <= 0 for x in (*a.lengths, a.heads, a.d, a.m, a.repeats, a.threads)):
        p.error("lengths, heads, d, m, repeats and threads must be positive")
    if a.scale:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "scale.json").write_text(
            json.dumps(scale(d=a.d, m=a.m, threads=a.threads), indent=1)
        )
        return 0
    bench(a.lengths, heads=a.heads, d=a.d, m=a.m, repeats=a.repeats, threads=a.threads,
          methods=a.methods, out_dir=a.out, plots=not a.no_plots)  # fmt: skip
    return 0
