"""Test helpers shared by the modules of the conformance matrix."""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

#: float32 unit roundoff
U32 = float(np.finfo(np.float32).eps) / 2
#: float64 unit roundoff
U64 = float(np.finfo(np.float64).eps) / 2


@dataclass(frozen=True)
class Backend:
    """A namespace of the matrix, with the device the tests place their inputs on."""

    name: str
    xp: ModuleType
    device: Any = None

    def asarray(self, host: Any, dtype: Any = None) -> Any:
        """Host NumPy data -> this backend (float64 unless ``dtype``)."""
        host = np.asarray(host)
        if dtype is None and host.dtype.kind == "f":
            dtype = self.xp.float64
        return self.xp.asarray(host, dtype=dtype, device=self.device)


def to_numpy(x: Any) -> np.ndarray:
    """Any backend's array -> NumPy (via the host device where needed)."""
    import array_api_compat

    if type(x).__module__.startswith("array_api_strict"):
        import array_api_strict

        x = x.to_device(array_api_strict.Device("CPU_DEVICE"))
    elif array_api_compat.is_torch_array(x):
        x = x.detach().cpu()
        if x.dtype == x.new_empty(0).bfloat16().dtype:
            x = x.float()
    elif array_api_compat.is_cupy_array(x):
        x = x.get()
    elif array_api_compat.is_dask_array(x):
        x = x.compute()
    return np.asarray(x)


def unit_roundoff(dtype_name: str) -> float:
    """Unit roundoff of the compute dtype of inputs of dtype ``dtype_name``."""
    return U64 if dtype_name == "float64" else U32


def check_array(backend: Backend, x: Any, *, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Assert namespace, shape, dtype and device of ``x``; return it as NumPy."""
    import array_api_compat

    assert array_api_compat.array_namespace(x) is backend.xp
    assert tuple(x.shape) == shape
    assert x.dtype == dtype
    if backend.device is not None:
        assert array_api_compat.device(x) == backend.device
    return to_numpy(x)


ROOT = Path(__file__).resolve().parents[1]


def python_blocks(relative: str) -> list[str]:
    """The ```python blocks of a Markdown file of the repository."""
    text = (ROOT / relative).read_text()
    return [b.split("```")[0] for b in text.split("```python\n")[1:]]


def top_modules(code: str) -> set[str]:
    """Top-level modules an example imports."""
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def example_id(code: str) -> str:
    """A test id from an example's imports."""
    return "-".join(sorted(top_modules(code)))


def run_example(code: str) -> None:
    """Execute an example; skip it (with the reason) when a framework or GPU is missing."""
    import pytest

    missing = sorted(m for m in top_modules(code) if importlib.util.find_spec(m) is None)
    if missing:
        pytest.skip(f"the example needs {missing}, not installed in this session")
    if "cupy" in top_modules(code):
        import cupy

        if not cupy.cuda.is_available():
            pytest.skip("the CuPy example needs a CUDA GPU")
    exec(compile(code, "example", "exec"), {})  # noqa: S102 (the repository's own docs)
