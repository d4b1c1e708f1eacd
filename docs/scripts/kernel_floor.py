"""The floor under bidirectional FAVOR+: its unavoidable kernels alone, on this machine.

``python docs/scripts/kernel_floor.py [L]`` (default L = 16384; 8 heads, d = 64, m = 256,
float32) times, per backend, only what any implementation must run: the two projections
(``rows x (d + 2)`` by ``(d + 2) x m``), the two ``exp`` passes over ``rows x m`` and the two
products with the values (``m x rows`` by ``rows x d`` and ``rows x m`` by ``m x d``), on
blocks of the adapter's size, on the same data again and again (hot caches; no Python
engine, no copies, no output written). NumPy runs them on one core, as each of its engine's
workers does, and the floor assumes perfect scaling to every core; PyTorch runs them with
its intra-op threads. The result is the best rate FAVOR+ could reach built from these
library calls, against the 4096^3 GEMM rate measured as the benchmark measures it
(``favorcore_backends.bench._gemm_rate``; kernels: medians of 9; the machine is noisy, so compare
the ratios).
"""

from __future__ import annotations

import os
import statistics
import sys
from collections.abc import Callable

import numpy as np


def _median(fn: Callable[[], object], repeats: int = 9) -> float:
    from favorcore_backends.bench import _times  # the benchmark's own timing loop

    fn()
    return statistics.median(_times(fn, repeats))


def _report(
    name: str, per_block: dict[str, float], blocks: int, gemm: float, flop: float, cores: int = 1
) -> None:
    """Print the block's kernels and the whole call's floor (``cores`` blocks at once)."""
    total = sum(per_block.values()) * blocks / cores
    parts = ", ".join(f"{k} {v * 1e3:.3f}" for k, v in per_block.items())
    print(f"{name}: per block (ms) {parts}")
    print(
        f"{name}: kernels alone {total * 1e3:.1f} ms for the whole call -> "
        f"{flop / total / 1e9:.0f} GFLOP/s = {100 * flop / total / gemm:.0f} % of the GEMM "
        f"({gemm / 1e9:.0f} GFLOP/s)"
    )


def main(length: int = 16384, heads: int = 8, d: int = 64, m: int = 256) -> None:
    flop = 8.0 * length * m * d * heads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rng = np.random.default_rng(0)

    from favorcore_backends.bench import _gemm_rate  # the benchmark's own GEMM measurement
    from favorcore_backends.numpy import BLOCK
    from threadpoolctl import threadpool_limits

    gemm = _gemm_rate("numpy") * 1e9
    rows = BLOCK
    x = rng.standard_normal((rows, d + 2), dtype=np.float32) * 0.1
    w = rng.standard_normal((d + 2, m), dtype=np.float32) * 0.1
    e = np.empty((rows, m), dtype=np.float32)
    f = np.empty_like(e)
    v = rng.standard_normal((rows, d), dtype=np.float32)
    kv = rng.standard_normal((m, d), dtype=np.float32)
    o = np.empty((rows, d), dtype=np.float32)
    with threadpool_limits(1, "blas"):
        per_block = {
            "projection x2": 2 * _median(lambda: np.matmul(x, w, out=e)),
            "exp x2": 2 * _median(lambda: np.exp(e, out=f)),
            "kf^T V": _median(lambda: np.matmul(e.T, v)),
            "qf kv": _median(lambda: np.matmul(e, kv, out=o)),
        }
    blocks = heads * -(-length // rows)
    # one core per worker, perfect scaling: the floor divides by the cores
    _report(f"numpy ({rows}-row blocks, one core each)", per_block, blocks, gemm, flop, cores or 1)

    try:
        import torch
    except ImportError:
        return
    from favorcore_backends.torch import TorchOps

    torch.set_num_threads(cores or 1)
    ops = TorchOps()
    rows = min(length, ops.block_size(length, causal=False))
    gemm = _gemm_rate("torch") * 1e9
    xt = torch.randn(rows, d + 2) * 0.1
    wt = torch.randn(d + 2, m) * 0.1
    et, ft = torch.empty(rows, m), torch.empty(rows, m)
    vt, kvt, ot = torch.randn(rows, d), torch.randn(m, d), torch.empty(rows, d)
    per_block = {
        "projection x2": 2 * _median(lambda: torch.mm(xt, wt, out=et)),
        "exp x2": 2 * _median(lambda: torch.exp(et, out=ft)),
        "V^T kf": _median(lambda: vt.T @ et),
        "qf kv": _median(lambda: torch.mm(et, kvt, out=ot)),
    }
    _report(
        f"torch ({rows}-row blocks, {cores} intra-op threads)",
        per_block,
        heads * -(-length // rows),
        gemm,
        flop,
    )


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))
