"""The conformance-matrix fixtures: one ``xp`` per backend, inputs built on the host.

``FAVORCORE_BACKENDS`` (comma-separated names) picks a subset of the matrix; a backend
that is not installed is skipped with its reason.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from types import ModuleType

import numpy as np
import pytest
from array_api_extra.testing import lazy_xp_function, patch_lazy_xp_functions
from helpers import Backend

import favorcore as fc

# Test modules that list ``lazy_xp_modules = [fc]`` call these through ``jax.jit`` on
# JAX and check that they never compute on Dask.
for _func in (fc.favor_attention, fc.linear_attention, fc.softmax_attention):
    lazy_xp_function(_func)

#: backend name -> module to import (the namespace then comes from array-api-compat)
BACKENDS = {
    "numpy": "numpy",
    "array_api_strict": "array_api_strict",
    "torch": "torch",
    "torch_cuda": "torch",
    "jax": "jax.numpy",
    "dask": "dask.array",
    "cupy": "cupy",
}


def _selected() -> list[str]:
    raw = os.environ.get("FAVORCORE_BACKENDS", "")
    names = [n.strip() for n in raw.split(",") if n.strip()] or list(BACKENDS)
    unknown = set(names) - set(BACKENDS)
    if unknown:
        raise pytest.UsageError(f"FAVORCORE_BACKENDS names unknown backends {sorted(unknown)}")
    return names


def _make_backend(name: str) -> Backend:
    try:
        module = importlib.import_module(BACKENDS[name])
    except ImportError as exc:
        pytest.skip(f"backend {name!r} is not installed: {exc}")
    import array_api_compat

    device = None
    if name == "array_api_strict":
        # A non-default device: results must stay on the caller's device.
        device = module.Device("device1")
    elif name == "torch_cuda":
        if not module.cuda.is_available():
            pytest.skip("backend 'torch_cuda' needs a CUDA GPU; none is visible here")
        device = module.device("cuda")
    elif name == "jax":
        import jax

        # float64 cases must mean float64 (as in SciPy's test suite)
        jax.config.update("jax_enable_x64", True)
    elif name == "cupy" and not module.cuda.is_available():
        pytest.skip("backend 'cupy' needs a CUDA GPU; none is visible here")
    xp = array_api_compat.array_namespace(module.asarray([1.0]))
    return Backend(name, xp, device)


@pytest.fixture(params=_selected())
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """Every backend of the matrix (skipped with its reason when not installed).

    Functions tagged with ``lazy_xp_function`` in the test modules run inside
    ``jax.jit`` on JAX and must stay lazy (never compute) on Dask.
    """
    b = _make_backend(request.param)
    with patch_lazy_xp_functions(request, xp=b.xp):
        yield b


@pytest.fixture
def xp(backend: Backend) -> ModuleType:
    """The namespace of :func:`backend`."""
    return backend.xp


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded host generator; every test input is built from it."""
    return np.random.default_rng(20261129)
