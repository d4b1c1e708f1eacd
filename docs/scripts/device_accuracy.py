"""float32 accuracy of favorcore on each backend present, against NumPy in float64.

``python docs/scripts/device_accuracy.py`` runs FAVOR+ (bidirectional and causal; L = 4096,
4 heads, d = 64, m = 256, inputs ``0.5 N(0, 1)``, the same projection everywhere) in float32
on NumPy, on PyTorch on the CPU and, where there is one, on CUDA, on CuPy, and on JAX's
default device, and prints each result's largest error against NumPy in float64, relative
to ``max |v|``, beside the bound the conformance tests allow float32 (``2 (L + m) eps * 4``).
On a GPU it is the check of what the CPU cannot show: JAX computes float32 products at its
default precision (TF32 on recent NVIDIA GPUs) unless ``jax_default_matmul_precision`` is
set, and PyTorch's and CuPy's GPU libraries choose their own kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

import favorcore as fc


def _backends() -> dict[str, tuple[Callable[[np.ndarray], Any], Callable[[Any], np.ndarray]]]:
    """name -> (host array to the backend, backend array to the host)."""
    out: dict[str, tuple[Callable[[np.ndarray], Any], Callable[[Any], np.ndarray]]] = {
        "numpy": (lambda a: a, np.asarray)
    }
    try:
        import torch

        out["torch-cpu"] = (torch.from_numpy, lambda t: t.numpy())
        if torch.cuda.is_available():
            out["torch-cuda"] = (lambda a: torch.from_numpy(a).cuda(), lambda t: t.cpu().numpy())
    except ImportError:
        pass
    try:
        import cupy as cp

        cp.cuda.runtime.getDeviceCount()
        out["cupy"] = (cp.asarray, cp.asnumpy)
    except Exception as error:  # noqa: BLE001 - not installed, or no device
        print(f"no CuPy: {type(error).__name__}: {error}")
    try:
        import jax
        import jax.numpy as jnp

        out[f"jax-{jax.default_backend()}"] = (jnp.asarray, np.asarray)
    except ImportError:
        pass
    return out


def main(length: int = 4096, heads: int = 4, d: int = 64, m: int = 256) -> None:
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, heads, length, d)) * 0.5 for _ in range(3))
    fmap = fc.PositiveFeatures(m=m, seed=0)
    bound = 2 * (length + m) * float(np.finfo(np.float32).eps) * 4
    print(f"L = {length}, {heads} heads, d = {d}, m = {m}; test bound (float32): {bound:.1e}")
    for causal in (False, True):
        ref = fc.favor_attention(q, k, v, features=fmap, causal=causal, balance=False)
        scale = float(np.abs(v).max())
        for name, (put, get) in _backends().items():
            a = [put(x.astype(np.float32)) for x in (q, k, v)]
            out = get(fc.favor_attention(*a, features=fmap, causal=causal, balance=False))
            err = float(np.abs(out.astype(np.float64) - ref).max()) / scale
            mode = "causal" if causal else "bidirectional"
            flag = "ok" if err <= bound else "OVER THE BOUND"
            print(f"{mode:<14} {name:<12} max error / max|v| {err:.1e}  {flag}", flush=True)


if __name__ == "__main__":
    main()
