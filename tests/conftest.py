"""The conformance-matrix fixtures: one ``xp`` per backend, inputs built on the host.

``FAVORCORE_BACKENDS`` (comma-separated names) picks a subset of the matrix; a backend
that is not installed is skipped with its reason.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import numpy as np
import pytest
from helpers import Backend

#: backend name -> module to import (the namespace then comes from array-api-compat)
BACKENDS = {"numpy": "numpy", "array_api_strict": "array_api_strict"}


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

    xp = array_api_compat.array_namespace(module.asarray([1.0]))
    device = None
    if name == "array_api_strict":
        # A non-default device: results must stay on the caller's device.
        device = module.Device("device1")
    return Backend(name, xp, device)


@pytest.fixture(params=_selected())
def backend(request: pytest.FixtureRequest) -> Backend:
    """Every backend of the matrix (skipped with its reason when not installed)."""
    return _make_backend(request.param)


@pytest.fixture
def xp(backend: Backend) -> ModuleType:
    """The namespace of :func:`backend`."""
    return backend.xp


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded host generator; every test input is built from it."""
    return np.random.default_rng(20261129)
