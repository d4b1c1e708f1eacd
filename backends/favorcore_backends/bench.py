"""Side-by-side benchmark: favorcore against exact attention and performer-pytorch.

``python -m favorcore bench`` (``nox -s bench`` installs the peers) times every method on
identical float32 inputs ``(1, heads, L, d)`` in a fresh subprocess per case, with the same
thread count for everyone, and reports per case

* the median time of ``repeats`` calls after one warm-up call;
* the peak memory of one call: the subprocess's peak resident set during the call minus
  its resident set just before it (tracemalloc sees neither PyTorch nor JAX);
* the effective rate ``8 L m d heads / time`` (8 L m d per head) and that rate as a
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
    "favorcore-numpy", "favorcore-torch", "favorcore-jax", "favorcore-cupy", "favorcore++-numpy",
    "favorcore++-torch", "favorcore++-cupy", "sdpa", "performer",
)  # fmt: skip
BACKEND_OF = {
    "favorcore-numpy": "numpy",
    "favorcore-torch": "torch",
    "favorcore-jax": "jax",
    "favorcore-cupy": "cupy",
    "favorcore++-numpy": "numpy",
    "favorcore++-torch": "torch",
    "favorcore++-cupy": "cupy",
    "sdpa": "torch",
    "performer": "torch",
}
IMPORT_OF = {
    "numpy": "numpy", "torch": "torch", "jax": "jax", "cupy": "cupy",
    "performer": "performer_pytorch",
}  # fmt: skip
DEVICES = ("cpu", "gpu")
DTYPES = ("float32", "bfloat16")
#: lengths of a run unless given: the GPU's go 4x further
LENGTHS = {"cpu": [1024, 2048, 4096, 8192, 16384], "gpu": [1024, 4096, 16384, 65536]}


def supports(backend: str, device: str, dtype: str) -> bool:
    """Whether ``backend`` runs on ``device`` in ``dtype`` (NumPy: the CPU; CuPy: a GPU;
    neither has bfloat16)."""
    if backend in ("numpy", "cupy"):
        return dtype == "float32" and device == ("cpu" if backend == "numpy" else "gpu")
    return True


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


class _Device:
    """One backend on one device: moving host arrays there, waiting for it, its memory.

    ``put`` makes a host float32 array an array of the backend in ``dtype``; ``sync``
    waits for the device's queued work (a GPU runs asynchronously); ``start`` returns
    the memory in use in MiB and resets the peak, ``peak`` the peak since in MiB: the
    process's resident set on the CPU (``/proc``; tracemalloc sees neither PyTorch nor
    JAX), the framework allocator's counters on a GPU.
    """

    def __init__(self, backend: str, device: str, dtype: str) -> None:
        self.backend, self.gpu, self.dtype = backend, device == "gpu", dtype
        self.sync: Callable[[], Any] = lambda: None
        self.start: Callable[[], float] = _reset_peak
        self.peak: Callable[[], float] = lambda: _status_mib("VmHWM")
        self.put: Callable[[Any], Any] = lambda a: a
        mib = 2.0**20
        if backend == "torch":
            import torch

            dev = torch.device("cuda" if self.gpu else "cpu")
            if self.gpu:
                if not torch.cuda.is_available():
                    raise RuntimeError("PyTorch sees no CUDA GPU")
                self.sync = torch.cuda.synchronize

                def start() -> float:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    return torch.cuda.memory_allocated() / mib

                self.start = start
                self.peak = lambda: torch.cuda.max_memory_allocated() / mib
            kind = getattr(torch, dtype)
            self.put = lambda a: torch.from_numpy(a).to(dev, kind)
        elif backend == "jax":
            import jax
            import jax.numpy as jnp

            if self.gpu:
                if jax.default_backend() != "gpu":
                    raise RuntimeError(
                        f"JAX sees no GPU (default backend {jax.default_backend()!r})"
                    )
                stats = jax.devices()[0].memory_stats
                # JAX cannot reset its peak; the case's process has run nothing before
                self.start = lambda: float(stats()["bytes_in_use"]) / mib
                self.peak = lambda: float(stats()["peak_bytes_in_use"]) / mib
            kind = getattr(jnp, dtype)
            self.put = lambda a: jax.device_put(jnp.asarray(a, dtype=kind))
        elif backend == "cupy":
            import cupy as cp

            pool = cp.get_default_memory_pool()
            self.sync = lambda: cp.cuda.Device().synchronize()

            def start() -> float:
                cp.cuda.Device().synchronize()
                pool.free_all_blocks()  # the pool then grows to the call's peak
                return float(pool.used_bytes()) / mib

            self.start = start
            self.peak = lambda: float(pool.total_bytes()) / mib
            self.put = cp.asarray

    def gemm_rate(self, repeats: int = 3, n: int = 4096) -> float:
        """GFLOP/s of an ``n``^3 matmul in the case's dtype on its device (best of
        ``repeats``)."""
        import numpy as np

        a = self.put(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32))
        mm: Callable[[Any], Any] = lambda a: a @ a
        if self.backend == "jax":
            import jax

            jitted = jax.jit(mm)
            mm = lambda a: jitted(a).block_until_ready()

        def f() -> None:
            mm(a)
            self.sync()

        f()
        return 2 * n**3 / min(_times(f, repeats)) / 1e9


def _gemm_rate(backend: str, repeats: int = 3, n: int = 4096) -> float:
    """GFLOP/s of an ``n``^3 float32 matmul on ``backend`` on the CPU (best of ``repeats``)."""
    return _Device(backend, "cpu", "float32").gemm_rate(repeats, n)


def run_case(method: str, length: int, causal: bool, heads: int, d: int, m: int, repeats: int,
             threads: int, gemm_size: int = 0, device: str = "cpu",
             dtype: str = "float32") -> dict[str, Any]:  # fmt: skip
    """Time one case in this process (the child of :func:`measure`).

    The first call's peak memory is the call's (it is also the warm-up). With
    ``gemm_size``, the backend's GEMM rate in ``dtype`` on ``device`` is then measured in
    this process, under the same thread settings, just before the timed calls, so that
    the case's share of it compares like with like on a machine whose speed drifts.
    """
    import numpy as np

    backend = BACKEND_OF[method]
    if backend == "jax":  # before JAX is imported: the CPU alone, or the GPU unreserved
        os.environ.update(
            {"JAX_PLATFORMS": "cpu"}
            if device == "cpu"
            else {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
        )
    if backend == "numpy":
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads)
    elif backend == "torch":
        import torch

        torch.set_num_threads(threads)
    on = _Device(backend, device, dtype)
    rng = np.random.default_rng(0)
    host = [(rng.standard_normal((1, heads, length, d)) * 0.5).astype(np.float32) for _ in range(3)]
    q, k, v = (on.put(a) for a in host)
    import favorcore as fc

    default = method.startswith("favorcore++")
    fmap = fc.OptimalPositiveFeatures(m=m, seed=0) if default else fc.PositiveFeatures(m=m, seed=0)
    # FAVOR+: no balance; the default: per call (bidirectional) or calibrated (causal)
    balance: Any = False
    if default:
        balance = fc.balance_statistics(q, k) if causal else None
    fn: Callable[[], Any]
    if method == "performer":
        from performer_pytorch import FastAttention

        attn = FastAttention(dim_heads=d, nb_features=m, causal=causal).to(q.device, q.dtype)
        fn = lambda: attn(q, k, v)
    elif method == "sdpa":
        sdpa = torch.nn.functional.scaled_dot_product_attention
        fn = lambda: sdpa(q, k, v, is_causal=causal)
    elif backend == "jax":
        import jax

        jitted = jax.jit(
            lambda q, k, v: fc.favor_attention(q, k, v, features=fmap, causal=causal, balance=False)
        )
        fn = lambda: jitted(q, k, v).block_until_ready()
    else:
        fn = lambda: fc.favor_attention(q, k, v, features=fmap, causal=causal, balance=balance)
    if backend == "torch":
        plain = fn

        def fn() -> Any:
            with torch.no_grad():
                return plain()

    def call() -> Any:
        out = fn()
        on.sync()
        return out

    process_peak = _status_mib("VmHWM")  # inputs made, nothing called yet
    before = on.start()
    call()  # the first call: its peak is the call's memory (and it warms up)
    peak = on.peak() - before
    process_peak = max(process_peak, _status_mib("VmHWM"))
    gemm = on.gemm_rate(repeats=2, n=gemm_size) if gemm_size else None
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
    child = "import json,sys; from favorcore_backends.bench import run_case; print(json.dumps(run_case(**json.loads(sys.argv[1]))))"
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


def _available(method: str, device: str = "cpu", dtype: str = "float32") -> bool:
    """Installed, and its backend runs on ``device`` in ``dtype``."""
    import importlib.util

    needed = IMPORT_OF["performer"] if method == "performer" else IMPORT_OF[BACKEND_OF[method]]
    return (
        supports(BACKEND_OF[method], device, dtype) and importlib.util.find_spec(needed) is not None
    )


def bench(lengths: Sequence[int], *, heads: int, d: int, m: int, repeats: int, threads: int,
          methods: Sequence[str], out_dir: Path, plots: bool, gemm_size: int = 4096,
          device: str = "cpu", dtype: str = "float32") -> dict[str, Any]:  # fmt: skip
    """Run every case, print the table and ratios, write JSON (and plots).

    Each case's share of the GEMM rate is against the rate (in ``dtype``, on ``device``)
    measured in its own subprocess just before its timed calls (``gemm_size``^3); the
    footer gives the median of those per backend. Methods that are not installed, or
    whose backend does not run on ``device`` in ``dtype``, are left out.
    """
    methods = [x for x in methods if _available(x, device, dtype)]
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for length in lengths:
        for causal in (False, True):
            for method in methods:
                r = measure(
                    method, length, causal, heads=heads, d=d, m=m, repeats=repeats,
                    threads=threads, gemm_size=gemm_size, device=device, dtype=dtype,
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
                # the rows so far, should the run be stopped (the full result replaces them)
                (out_dir / "bench.json").write_text(json.dumps({"rows": rows}, indent=1))
    gemm = {
        b: statistics.median(
            r["gemm_gflops"] for r in rows if "gemm_gflops" in r and BACKEND_OF[r["method"]] == b
        )
        for b in sorted({BACKEND_OF[r["method"]] for r in rows if "gemm_gflops" in r})
    }
    ratios = _ratios(rows)
    result = {"shape": {"heads": heads, "d": d, "m": m, "dtype": dtype, "threads": threads,
                        "device": device},
              "gemm_gflops": gemm, "rows": rows, "ratios": ratios}  # fmt: skip
    (out_dir / "bench.json").write_text(json.dumps(result, indent=1))
    print(
        f"\nGEMM rate ({gemm_size}^3 {dtype} on the {device}, median over the cases' own "
        "measurements): " + ", ".join(f"{b} {g:.0f} GFLOP/s" for b, g in gemm.items())
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
    p.add_argument("--lengths", type=int, nargs="+", help="default: " + "; ".join(
        f"{k} {' '.join(map(str, v))}" for k, v in LENGTHS.items()))  # fmt: skip
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--m", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--scale", action="store_true", help="only the 2^20-token causal run")
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="gpu: PyTorch on CUDA, CuPy, JAX on its GPU (NumPy is left out)")  # fmt: skip
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="of the inputs (favorcore computes bfloat16 in float32)")  # fmt: skip
    p.add_argument("--gemm-size", type=int, help="n of the n^3 GEMM (default: cpu 4096, gpu 8192)")
    a = p.parse_args(argv)
    a.lengths = a.lengths or LENGTHS[a.device]
    a.gemm_size = a.gemm_size or (8192 if a.device == "gpu" else 4096)
    if any(x <= 0 for x in (*a.lengths, a.heads, a.d, a.m, a.repeats, a.threads, a.gemm_size)):
        p.error("lengths, heads, d, m, repeats, threads and gemm-size must be positive")
    if a.scale and (a.device, a.dtype) != ("cpu", "float32"):
        p.error("--scale runs NumPy on the CPU in float32")
    if a.scale:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "scale.json").write_text(
            json.dumps(scale(d=a.d, m=a.m, threads=a.threads), indent=1)
        )
        return 0
    bench(a.lengths, heads=a.heads, d=a.d, m=a.m, repeats=a.repeats, threads=a.threads,
          methods=a.methods, out_dir=a.out, plots=not a.no_plots, gemm_size=a.gemm_size,
          device=a.device, dtype=a.dtype)  # fmt: skip
    return 0
