"""Side-by-side benchmark: favorcore against exact attention and its peers.

``favorcore bench`` (``nox -s bench`` installs the peers) times every method on identical
float32 inputs ``(1, heads, L, d)`` in a fresh subprocess per case, with the same thread
count for everyone, in ``rounds`` rounds (the methods of one length and mode in turn,
the order reversed every other round, so that a slow spell of the machine falls on all
of them alike), and reports per case

* the median time of the ``repeats`` calls of every round (each after one warm-up call);
* the peak memory of one call: the subprocess's peak resident set during the call minus
  its resident set just before it (tracemalloc sees neither PyTorch nor JAX);
* the effective rate ``8 L m d heads / time`` (8 L m d per head) and that rate as a
  percentage of the backend's float32 GEMM rate (a 4096^3 matmul) measured in the case's
  own subprocess just before it (the machine's speed drifts during a run);

then the ratios favorcore/peer pair by pair. ``favorcore-*`` run FAVOR+
(``PositiveFeatures``, no balance: the peers' algorithm); ``favorcore++-*`` run the
library's default estimator, FAVOR++ with the matrix balance (per call when
bidirectional; causal calls get statistics computed once beforehand, as from a
calibration batch), and their cost is reported against FAVOR+'s. ``favor-module`` is
``favorcore_backends.torch.FavorAttention`` against ``mha``, PyTorch's
``nn.MultiheadAttention`` (projections included, input ``(1, L, heads * d)``).

``--train`` times a training step instead: forward and backward of ``out.sum()``
(PyTorch) or ``jit(grad(...))`` (JAX), its peak memory, and the step's time over the
forward's (measured in the same process). ``--longest`` finds the longest causal
sequence whose step keeps the whole process under ``--budget-mib``; ``--scale`` runs
causal attention (``--train``: a step) over 2^20 tokens, 1 head.

``performer-jax`` is the Performer authors' JAX code, which is not on PyPI: set
``FAVORCORE_BENCH_AUTHORS_JAX`` to the directory holding google-research's
``performer/fast_attention/jax/fast_attention.py`` (it needs ``gin-config`` and
``absl-py``). It writes ``bench.json`` (``bench-train.json`` with ``--train``) and, with
matplotlib, time and memory plots (log-log, one line per method).
"""

from __future__ import annotations

import argparse
import importlib.util
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

BACKEND_OF = {
    "favorcore-numpy": "numpy",
    "favorcore-torch": "torch",
    "favorcore-jax": "jax",
    "favorcore-cupy": "cupy",
    "favorcore++-numpy": "numpy",
    "favorcore++-torch": "torch",
    "favorcore++-jax": "jax",
    "favorcore++-cupy": "cupy",
    "favor-module": "torch",
    "mha": "torch",
    "sdpa": "torch",
    "performer": "torch",
    "jax-exact": "jax",
    "performer-jax": "jax",
}
METHODS = tuple(BACKEND_OF)
#: each favorcore method and the peers it is compared with (same L, mode and measure)
PEERS = {
    "favorcore-numpy": ("performer", "sdpa"),
    "favorcore-torch": ("performer", "sdpa"),
    "favorcore-cupy": ("performer", "sdpa"),
    "favorcore-jax": ("performer-jax", "jax-exact"),
    "favor-module": ("mha",),
}
IMPORT_OF = {
    "numpy": "numpy", "torch": "torch", "jax": "jax", "cupy": "cupy",
    "performer": "performer_pytorch",
}  # fmt: skip
AUTHORS_ENV = "FAVORCORE_BENCH_AUTHORS_JAX"
DEVICES = ("cpu", "gpu")
DTYPES = ("float32", "bfloat16")
#: lengths of a run unless given: the GPU's go 4x further
LENGTHS = {"cpu": [1024, 2048, 4096, 8192, 16384], "gpu": [1024, 4096, 16384, 65536]}
#: exact attention that forms the L x L scores (JAX's) is left out above this estimate
EXACT_LIMIT_GIB = 12.0


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


def _attention(method: str, causal: bool, m: int, d: int, heads: int, q: Any, k: Any) -> Any:
    """The method as a function: of ``(q, k, v)`` in ``(1, heads, L, d)``, or of ``x`` in
    ``(1, L, heads * d)`` for the modules (``performer-jax``, ``jax-exact``:
    ``(1, L, heads, d)``)."""
    import favorcore as fc

    if method == "performer":
        from performer_pytorch import FastAttention

        return FastAttention(dim_heads=d, nb_features=m, causal=causal).to(q.device, q.dtype)
    if method == "sdpa":
        import torch

        sdpa = torch.nn.functional.scaled_dot_product_attention
        return lambda q, k, v: sdpa(q, k, v, is_causal=causal)
    if method in ("mha", "favor-module"):
        import torch

        from favorcore_backends.torch import FavorAttention

        cls = torch.nn.MultiheadAttention if method == "mha" else FavorAttention
        module = cls(heads * d, heads, batch_first=True).to(q.device, q.dtype)
        length = q.shape[-2]
        mask = torch.ones(length, length, dtype=torch.bool, device=q.device).triu_(1)
        kw = {"attn_mask": mask, "is_causal": True} if causal else {}
        return lambda x: module(x, x, x, need_weights=False, **kw)[0]
    if method == "jax-exact":
        import jax

        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal)
    if method == "performer-jax":
        sys.path.insert(0, os.environ[AUTHORS_ENV])
        import fast_attention  # type: ignore[import-not-found]  # the authors' (see above)

        return fast_attention.make_fast_softmax_attention(
            d, nb_features=m, unidirectional=causal, redraw_features=False
        )
    default = method.startswith("favorcore++")
    fmap = fc.OptimalPositiveFeatures(m=m, seed=0) if default else fc.PositiveFeatures(m=m, seed=0)
    # FAVOR+: no balance; the default: per call (bidirectional) or calibrated (causal)
    balance: Any = False
    if default:
        balance = fc.balance_statistics(q, k) if causal else None
    return lambda q, k, v: fc.favor_attention(
        q, k, v, features=fmap, causal=causal, balance=balance
    )


def _calls(method: str, on: _Device, host: list[Any], causal: bool, m: int,
           train: bool) -> tuple[Callable[[], Any], Callable[[], Any] | None]:  # fmt: skip
    """``(measured, forward)``: the call to time (a step when ``train``), and with
    ``train`` the forward alone (no gradient recorded)."""
    import numpy as np

    heads, length, d = host[0].shape[1:]
    backend = BACKEND_OF[method]
    if method in ("mha", "favor-module"):  # one input, (1, L, heads * d)
        host = [np.ascontiguousarray(host[0].transpose(0, 2, 1, 3).reshape(1, length, -1))]
    elif method in ("performer-jax", "jax-exact"):  # (1, L, heads, d)
        host = [np.ascontiguousarray(a.transpose(0, 2, 1, 3)) for a in host]
    inputs = [on.put(a) for a in host]
    f = _attention(method, causal, m, d, heads, inputs[0], inputs[min(1, len(inputs) - 1)])
    if backend == "jax":
        import jax

        forward_jit = jax.jit(f)
        forward = lambda: forward_jit(*inputs).block_until_ready()
        if not train:
            return forward, None
        grads = jax.jit(jax.grad(lambda *a: f(*a).sum(), argnums=tuple(range(len(inputs)))))
        return (lambda: jax.block_until_ready(grads(*inputs))), forward  # type: ignore[no-untyped-call]
    if backend != "torch":  # NumPy, CuPy: no autodiff (training is refused before)
        return (lambda: f(*inputs)), None
    import torch

    def no_grad() -> Any:
        with torch.no_grad():
            return f(*inputs)

    if not train:
        return no_grad, None
    leaves = [t.requires_grad_() for t in inputs]
    if isinstance(f, torch.nn.Module):
        leaves += list(f.parameters())

    def step() -> None:
        for t in leaves:
            t.grad = None
        f(*inputs).sum().backward()

    return step, no_grad


def run_case(method: str, length: int, causal: bool, heads: int, d: int, m: int, repeats: int,
             threads: int, gemm_size: int = 0, device: str = "cpu",
             dtype: str = "float32", train: bool = False) -> dict[str, Any]:  # fmt: skip
    """Time one case in this process (the child of :func:`measure`).

    The first call's peak memory is the call's (it is also the warm-up). With
    ``gemm_size``, the backend's GEMM rate in ``dtype`` on ``device`` is then measured in
    this process, under the same thread settings, just before the timed calls, so that
    the case's share of it compares like with like on a machine whose speed drifts. With
    ``train`` the call is a training step, and the forward alone is timed too
    (alternating with the steps).
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
    measured, forward = _calls(method, on, host, causal, m, train)

    def timed(fn: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> Any:
            out = fn()
            on.sync()
            return out

        return call

    call = timed(measured)
    process_peak = _status_mib("VmHWM")  # inputs made, nothing called yet
    before = on.start()
    call()  # the first call: its peak is the call's memory (and it warms up)
    peak = on.peak() - before
    process_peak = max(process_peak, _status_mib("VmHWM"))
    gemm = on.gemm_rate(repeats=2, n=gemm_size) if gemm_size else None
    result: dict[str, Any] = {"peak_mib": max(peak, 0.0)}
    if forward is None:
        result["times"] = _times(call, repeats)
    else:
        fwd = timed(forward)
        fwd()
        steps, fwds = [], []
        for _ in range(repeats):  # alternately, so that drift affects both alike
            steps += _times(call, 1)
            fwds += _times(fwd, 1)
        result.update(times=steps, forward_times=fwds)
    result.update(_medians(result))
    result["process_peak_mib"] = max(process_peak, _status_mib("VmHWM"))
    if gemm is not None:
        result["gemm_gflops"] = gemm
    return result


def _medians(r: dict[str, Any]) -> dict[str, float]:
    """``median_s`` (and, for steps, ``forward_s`` and ``step_ratio``) of the timings."""
    out = {"median_s": statistics.median(r["times"])}
    if "forward_times" in r:
        out["forward_s"] = statistics.median(r["forward_times"])
        out["step_ratio"] = out["median_s"] / out["forward_s"]
    return out


def _pooled(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One case's rounds as one result: the medians of every round's timings, the
    largest peaks, the median GEMM rate; the first error if any round failed."""
    for r in rounds:
        if "error" in r:
            return r
    out: dict[str, Any] = {"rounds": len(rounds)}
    for key in ("times", "forward_times"):
        if key in rounds[0]:
            out[key] = [t for r in rounds for t in r[key]]
    out.update(_medians(out))
    out["peak_mib"] = max(r["peak_mib"] for r in rounds)
    out["process_peak_mib"] = max(r["process_peak_mib"] for r in rounds)
    if "gemm_gflops" in rounds[0]:
        out["gemm_gflops"] = statistics.median(r["gemm_gflops"] for r in rounds)
    return out


def measure(method: str, length: int, causal: bool, **kw: Any) -> dict[str, Any]:
    """Run one case in a fresh subprocess; returns its measurements (or its error)."""
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


def unavailable(method: str, device: str = "cpu", dtype: str = "float32",
                train: bool = False) -> str | None:  # fmt: skip
    """Why ``method`` cannot run here (not installed, not on ``device`` or in ``dtype``,
    no autodiff for ``train``), or None."""
    backend = BACKEND_OF[method]
    if not supports(backend, device, dtype):
        return f"{backend} does not run on the {device} in {dtype}"
    if train and backend in ("numpy", "cupy"):
        return f"{backend} has no autodiff (training steps run on PyTorch and JAX)"
    needed = IMPORT_OF["performer"] if method == "performer" else IMPORT_OF[backend]
    if importlib.util.find_spec(needed) is None:
        return f"{needed} is not installed"
    if method == "performer-jax":
        where = os.environ.get(AUTHORS_ENV)
        if not where or not Path(where, "fast_attention.py").is_file():
            return (
                f"set {AUTHORS_ENV} to the directory of google-research's "
                "performer/fast_attention/jax/fast_attention.py (needs gin-config, absl-py)"
            )
    return None


def _too_big(method: str, length: int, heads: int, train: bool) -> str | None:
    """Exact attention that forms the scores, when they alone would pass the limit."""
    if method != "jax-exact":
        return None
    gib = (3 if train else 1) * length**2 * heads * 4 / 2**30
    if gib <= EXACT_LIMIT_GIB:
        return None
    return f"skipped: its L x L scores would take about {gib:.0f} GiB (limit {EXACT_LIMIT_GIB:.0f})"


def bench(lengths: Sequence[int], *, heads: int, d: int, m: int, repeats: int, threads: int,
          methods: Sequence[str], out_dir: Path, plots: bool, gemm_size: int = 4096,
          device: str = "cpu", dtype: str = "float32", train: bool = False,
          rounds: int = 1) -> dict[str, Any]:  # fmt: skip
    """Run every case, print the table and ratios, write JSON (and plots).

    The methods of one length and mode run in turn ``rounds`` times (a fresh process
    each time, every other round in reverse order); a case's median is over the timings
    of all its rounds, its peak memory the largest of them.

    Each case's share of the GEMM rate is against the rate (in ``dtype``, on ``device``)
    measured in its own subprocess just before its timed calls (``gemm_size``^3; 0: not
    measured); the footer gives the median of those per backend. Methods that cannot run
    here are reported with the reason (``result["skipped"]``) and left out.
    """
    skipped = {x: why for x in methods if (why := unavailable(x, device, dtype, train))}
    for method, why in skipped.items():
        print(f"not run: {method}: {why}", flush=True)
    methods = [x for x in methods if x not in skipped]
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "bench-train.json" if train else "bench.json"
    what = "training step (forward + backward)" if train else "call"
    print(f"{'L':>7} {'mode':<14} {'method':<18} {'ms per ' + ('step' if train else 'call'):>12} "
          f"{'peak MiB':>10} " + ("step/forward" if train else "GFLOP/s  % of GEMM (GEMM GFLOP/s)"),
          flush=True)  # fmt: skip
    rows: list[dict[str, Any]] = []
    for length in lengths:
        for causal in (False, True):
            runs: dict[str, list[dict[str, Any]]] = {x: [] for x in methods}
            for i in range(rounds):
                for method in methods if i % 2 == 0 else methods[::-1]:
                    big = _too_big(method, length, heads, train)
                    runs[method].append({"error": big} if big else measure(
                        method, length, causal, heads=heads, d=d, m=m, repeats=repeats,
                        threads=threads, gemm_size=gemm_size, device=device, dtype=dtype,
                        train=train,
                    ))  # fmt: skip
            for method in methods:
                row: dict[str, Any] = {"L": length, "mode": "causal" if causal else "bidirectional",
                                       "method": method}  # fmt: skip
                r = _pooled(runs[method])
                row.update(r)
                if "median_s" in r:
                    rate = 8 * length * m * d * heads / r["median_s"] / 1e9
                    row["gflops"] = rate
                    if "gemm_gflops" in r:
                        row["pct_gemm"] = 100 * rate / r["gemm_gflops"]
                rows.append(row)
                _print_row(row)
                # the rows so far, should the run be stopped (the full result replaces them)
                (out_dir / name).write_text(json.dumps({"rows": rows}, indent=1))
    gemm = {
        b: statistics.median(
            r["gemm_gflops"] for r in rows if "gemm_gflops" in r and BACKEND_OF[r["method"]] == b
        )
        for b in sorted({BACKEND_OF[r["method"]] for r in rows if "gemm_gflops" in r})
    }
    ratios = _ratios(rows)
    result = {"shape": {"heads": heads, "d": d, "m": m, "dtype": dtype, "threads": threads,
                        "device": device, "measure": what},
              "gemm_gflops": gemm, "rows": rows, "ratios": ratios, "skipped": skipped}  # fmt: skip
    (out_dir / name).write_text(json.dumps(result, indent=1))
    if gemm:
        print(
            f"\nGEMM rate ({gemm_size}^3 {dtype} on the {device}, median over the cases' own "
            "measurements): " + ", ".join(f"{b} {g:.0f} GFLOP/s" for b, g in gemm.items())
        )
    print()
    for line in ratios:
        print(line["text"])
    if plots:
        _plots(result, out_dir, "bench-train" if train else "bench")
    return result


def _print_row(row: dict[str, Any]) -> None:
    head = f"{row['L']:>7} {row['mode']:<14} {row['method']:<18}"
    if "error" in row:
        print(f"{head} {row['error']}", flush=True)
        return
    if "step_ratio" in row:
        tail = f"{row['step_ratio']:>12.2f}"
    else:
        tail = f"{row['gflops']:>8.1f} " + (
            f"{row['pct_gemm']:>8.1f} % ({row['gemm_gflops']:.0f})" if "pct_gemm" in row else ""
        )
    print(f"{head} {1e3 * row['median_s']:>12.1f} {row['peak_mib']:>10.1f} {tail}", flush=True)


def _faster(speed: float) -> str:
    """``2.50x faster`` or ``0.40x: 2.50x slower``."""
    return f"{speed:6.2f}x faster" if speed >= 1 else f"{1 / speed:6.2f}x slower"


def _ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """favorcore against its peers (same L and mode), and the default against FAVOR+."""
    index = {(r["L"], r["mode"], r["method"]): r for r in rows if "median_s" in r}
    out = []
    for (length, mode, method), r in sorted(index.items()):
        head = f"L={length:>6} {mode:<14} {method}"
        if method.startswith("favorcore++"):
            base = index.get((length, mode, method.replace("++", "")))
            if base is not None:
                cost = r["median_s"] / base["median_s"]
                out.append({
                    "L": length, "mode": mode, "method": method, "peer": base["method"], "cost": cost,
                    "text": f"{head} (FAVOR++ + balance) costs {cost:5.2f}x {base['method']} (FAVOR+)",
                })  # fmt: skip
            continue
        for peer in PEERS.get(method, ()):
            p = index.get((length, mode, peer))
            if p is None:
                continue
            speed = p["median_s"] / r["median_s"]
            mem = r["peak_mib"] / p["peak_mib"] if p["peak_mib"] > 0 else float("nan")
            out.append({
                "L": length, "mode": mode, "method": method, "peer": peer, "speedup": speed,
                "memory_ratio": mem,
                "text": f"{head} vs {peer}: {_faster(speed)}, memory {mem:5.2f}x the peer's",
            })  # fmt: skip
    return out


def _plots(result: dict[str, Any], out_dir: Path, stem: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots")
        return
    rows, shape = result["rows"], result["shape"]
    what = shape.get("measure", "call")
    setup = (f"{shape['dtype']}, {shape.get('device', 'cpu')}, batch 1, {shape['heads']} heads, "
             f"d = {shape['d']}, m = {shape['m']}, {shape['threads']} threads")  # fmt: skip
    names = []
    for key, label, suffix in (("median_s", f"time per {what} (s)", "time"),
                               ("peak_mib", f"peak memory of a {what} (MiB)", "memory")):  # fmt: skip
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
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
        handles, labels = axes[0].get_legend_handles_labels()
        fig.tight_layout(rect=(0, 0, 1, 0.95))
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
        fig.suptitle(f"{label.split(' (')[0]}: {setup}", fontsize="medium")
        fig.savefig(out_dir / f"{stem}_{suffix}.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        names.append(str(out_dir / f"{stem}_{suffix}.png"))
    print("plots: " + ", ".join(names))


def scale(*, length: int = 2**20, d: int = 64, m: int = 256, threads: int = 2,
          train: bool = False) -> dict[str, Any]:  # fmt: skip
    """Causal attention over ``length`` tokens, 1 head, float32, in a fresh process:
    NumPy's call, or (``train``) PyTorch's training step."""
    method = "favorcore-torch" if train else "favorcore-numpy"
    kw: dict[str, Any] = {"heads": 1, "d": d, "m": m, "threads": threads, "train": train}
    big = measure(method, length, True, repeats=1, **kw)
    ref = measure(method, 16384, True, repeats=5, **kw)
    if "error" in big or "error" in ref:
        raise RuntimeError(f"the scale run failed: {big.get('error') or ref.get('error')}")
    per_big, per_ref = big["median_s"] / length, ref["median_s"] / 16384
    result = {"L": length, "method": method, "train": train,
              "process_peak_mib": big["process_peak_mib"], "seconds": big["median_s"],
              "per_token_ratio": per_big / per_ref}  # fmt: skip
    what = "training step" if train else "call"
    print(f"causal {what}, {method}, L={length}: {big['median_s']:.1f} s, whole-process peak "
          f"RSS {big['process_peak_mib']:.0f} MiB, per-token cost {per_big / per_ref:.2f}x that "
          "of L=16384")  # fmt: skip
    return result


def longest(methods: Sequence[str], *, heads: int, d: int, m: int, threads: int,
            budget_mib: float, start: int = 16384) -> dict[str, Any]:  # fmt: skip
    """The longest causal ``L`` (a multiple of ``start / 2``) whose training step keeps
    the whole process's peak resident set within ``budget_mib``: doubling, then bisecting."""
    found: dict[str, Any] = {}
    for method in methods:
        probes: dict[int, dict[str, Any]] = {}

        def fits(length: int, method: str = method, probes: dict[int, Any] = probes) -> bool:
            r = measure(method, length, True, heads=heads, d=d, m=m, repeats=1,
                        threads=threads, train=True)  # fmt: skip
            probes[length] = r
            ok = "error" not in r and r["process_peak_mib"] <= budget_mib
            print(f"{method} causal step L={length}: "
                  + (r["error"] if "error" in r else f"{r['process_peak_mib']:.0f} MiB, "
                     f"{r['median_s']:.1f} s") + (" fits" if ok else ""), flush=True)  # fmt: skip
            return ok

        good, bad = 0, start
        while fits(bad):
            good, bad = bad, 2 * bad
        step = start // 2
        while bad - good > step:
            mid = (good + bad) // 2 // step * step
            good, bad = (mid, bad) if fits(mid) else (good, mid)
        found[method] = {"longest": good, "probes": probes}
        print(f"{method}: the longest causal step within {budget_mib:.0f} MiB: L = {good}")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """``favorcore bench``: see the module docstring."""
    p = argparse.ArgumentParser(
        prog="favorcore bench",
        description="Side-by-side benchmark of favorcore against exact attention and its "
        "peers (each case in a fresh subprocess; medians; ratios measured in one run).",
    )
    p.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (default: " + "; ".join(
        f"{k} {' '.join(map(str, v))}" for k, v in LENGTHS.items()) + ")")  # fmt: skip
    p.add_argument("--heads", type=int, default=8, help="attention heads (default 8)")
    p.add_argument("--d", type=int, default=64, help="head dimension (default 64)")
    p.add_argument("--m", type=int, default=256, help="random features (default 256)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed calls per case and round (default 3)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds over the methods of each length and mode, every other one "
                   "in reverse order; medians over all (default 2)")  # fmt: skip
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="threads for every method (default: the CPUs available)")  # fmt: skip
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   metavar="METHOD", help="default: all; " + ", ".join(METHODS))  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("bench-results"),
                   help="directory for the JSON and plots")  # fmt: skip
    p.add_argument("--no-plots", action="store_true", help="do not draw the plots")
    p.add_argument("--train", action="store_true", help="time training steps (forward + backward)")
    p.add_argument("--scale", action="store_true",
                   help="only the 2^20-token causal run (with --train: a PyTorch step)")  # fmt: skip
    p.add_argument("--longest", action="store_true",
                   help="only the search for the longest causal step within --budget-mib")  # fmt: skip
    p.add_argument("--budget-mib", type=float, default=4096,
                   help="whole-process memory for --longest (default 4096)")  # fmt: skip
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="gpu: PyTorch on CUDA, CuPy, JAX on its GPU (NumPy is left out)")  # fmt: skip
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="of the inputs (favorcore computes bfloat16 in float32)")  # fmt: skip
    p.add_argument("--gemm-size", type=int,
                   help="n of the n^3 GEMM (default: cpu 4096, gpu 8192; 0 with --train)")  # fmt: skip
    a = p.parse_args(argv)
    a.lengths = a.lengths or LENGTHS[a.device]
    if a.gemm_size is None:
        a.gemm_size = 0 if a.train else (8192 if a.device == "gpu" else 4096)
    if (
        any(x <= 0 for x in (*a.lengths, a.heads, a.d, a.m, a.repeats, a.threads, a.rounds))
        or a.gemm_size < 0
    ):
        p.error(
            "lengths, heads, d, m, repeats, rounds and threads must be positive (gemm-size >= 0)"
        )
    if (a.scale or a.longest) and (a.device, a.dtype) != ("cpu", "float32"):
        p.error("--scale and --longest run on the CPU in float32")
    a.out.mkdir(parents=True, exist_ok=True)
    if a.scale:
        result = scale(d=a.d, m=a.m, threads=a.threads, train=a.train)
        (a.out / ("scale-train.json" if a.train else "scale.json")).write_text(
            json.dumps(result, indent=1)
        )
        return 0
    if a.longest:
        methods = [
            x for x in ("favorcore-torch", "favorcore-jax") if not unavailable(x, train=True)
        ]
        result = longest(methods, heads=a.heads, d=a.d, m=a.m, threads=a.threads,
                         budget_mib=a.budget_mib)  # fmt: skip
        (a.out / "longest.json").write_text(json.dumps(result, indent=1))
        return 0
    result = bench(a.lengths, heads=a.heads, d=a.d, m=a.m, repeats=a.repeats, threads=a.threads,
                   methods=a.methods, out_dir=a.out, plots=not a.no_plots, gemm_size=a.gemm_size,
                   device=a.device, dtype=a.dtype, train=a.train, rounds=a.rounds)  # fmt: skip
    if not any("median_s" in r for r in result["rows"]):
        print("nothing ran: see the reasons above", file=sys.stderr)
        return 1
    return 0
