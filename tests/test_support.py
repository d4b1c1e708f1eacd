"""The docs' support matrix agrees with the conformance matrix and the namespaces."""

from __future__ import annotations

from conftest import BACKENDS
from favorcore_backends.support import SUPPORT
from helpers import Backend


def test_every_matrix_backend_is_documented() -> None:
    documented = set(SUPPORT)
    assert {name.removesuffix("_cuda") for name in BACKENDS} == documented


def test_listed_dtypes_are_the_namespace_s_floats(backend: Backend) -> None:
    name = backend.name.removesuffix("_cuda")
    listed = set(SUPPORT[name]["dtypes"])  # type: ignore[arg-type]
    for dtype in ("float16", "bfloat16", "float32", "float64"):
        has = hasattr(backend.xp, dtype)
        if name == "dask" and dtype == "float16":
            has = False  # array-api-compat's Dask namespace exposes no float16
        assert (dtype in listed) == has, (name, dtype)
