"""What each backend supports: the data behind the docs' support matrix.

The test suite checks this table against the conformance matrix (``tests/conftest.py``)
and the namespaces themselves, so the docs cannot drift from what is tested.
"""

from __future__ import annotations

__all__ = ["SUPPORT"]

SUPPORT: dict[str, dict[str, object]] = {
    "numpy": {
        "dtypes": ["float16", "float32", "float64"],
        "devices": ["CPU"],
        "jit": "—",
        "autograd": "—",
        "adapter": "`favorcore_backends.numpy`: fast path, scikit-learn `FavorFeatures`",
    },
    "array_api_strict": {
        "dtypes": ["float32", "float64"],
        "devices": ["CPU", "device1"],
        "jit": "—",
        "autograd": "—",
        "adapter": "none: the standard alone",
    },
    "torch": {
        "dtypes": ["float16", "bfloat16", "float32", "float64"],
        "devices": ["CPU", "CUDA"],
        "jit": "`torch.compile`",
        "autograd": "gradcheck (float64)",
        "adapter": "`favorcore_backends.torch`: `FavorAttention`, `favorize`, transformers",
    },
    "jax": {
        "dtypes": ["float16", "bfloat16", "float32", "float64"],
        "devices": ["CPU", "GPU"],
        "jit": "`jax.jit` (the whole matrix)",
        "autograd": "`check_grads` (float64), `vmap`",
        "adapter": "`favorcore_backends.jax`, `favorcore_backends.flax`",
    },
    "dask": {
        "dtypes": ["float32", "float64"],
        "devices": ["CPU (cluster)"],
        "jit": "lazy graphs (never computed inside)",
        "autograd": "—",
        "adapter": "`favorcore_backends.dask`: block-by-block attention",
    },
    "cupy": {
        "dtypes": ["float16", "float32", "float64"],
        "devices": ["GPU"],
        "jit": "—",
        "autograd": "—",
        "adapter": "`favorcore_backends.cupy`: device and stream",
    },
}
