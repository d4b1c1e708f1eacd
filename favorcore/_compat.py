"""The one seam between favorcore and array-api-compat.

Everything the core needs to know about a caller's array framework goes through this
module: which namespace an array belongs to, on which device it lives, which dtype the
computation runs in, whether its values can be read eagerly, and how to mark a value as
a constant for autograd. No framework is imported here; a framework-specific branch runs
only for arrays of a framework the caller has already imported.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import array_api_compat
import array_api_compat.numpy  # imported up front, not first inside a jax.jit trace
import numpy as np

Array = Any
"""Any array of a namespace that array-api-compat supports (typing stand-in)."""

__all__ = [
    "Array",
    "all_finite",
    "compute_dtype",
    "device",
    "eigh",
    "from_host",
    "is_eager",
    "is_floating",
    "is_tracer",
    "namespace",
    "row_mean",
    "stop_gradient",
    "take_rows",
    "to_host",
]


def namespace(**arrays: Array | None) -> ModuleType:
    """Return the Array API namespace shared by the named arrays (``None`` is skipped).

    Raises
    ------
    TypeError
        If an argument is not an array, or if the arrays come from more than one
        framework; the message names every argument and its type.
    """
    present = {name: a for name, a in arrays.items() if a is not None}
    for name, a in present.items():
        if not array_api_compat.is_array_api_obj(a):
            raise TypeError(f"{name} must be an array, got {type(a).__module__}.{type(a).__name__}")
    try:
        return array_api_compat.array_namespace(*present.values())
    except TypeError as exc:
        kinds = ", ".join(
            f"{n}: {type(a).__module__}.{type(a).__name__}" for n, a in present.items()
        )
        raise TypeError(
            f"arrays from more than one array framework in one call ({kinds}); "
            "convert them to one framework first"
        ) from exc


def device(x: Array) -> Any:
    """Device of ``x`` (array-api-compat's portable ``device``)."""
    return array_api_compat.device(x)


def is_floating(xp: ModuleType, dtype: Any) -> bool:
    """True for real floating dtypes, float16 and bfloat16 included where the namespace has them."""
    try:
        return bool(xp.isdtype(dtype, "real floating"))
    except (TypeError, ValueError):
        return False


def compute_dtype(xp: ModuleType, dtype: Any) -> Any:
    """The dtype the core computes in: ``result_type(dtype, float32)``.

    float16 and bfloat16 inputs compute in float32, float32 in float32, float64 in float64.
    """
    return xp.result_type(dtype, xp.float32)


def is_eager(x: Array) -> bool:
    """True when the values of ``x`` can be read now (not a JAX tracer, not a Dask graph, not
    a PyTorch meta or fake tensor). A concrete JAX array is eager."""
    if array_api_compat.is_jax_array(x):
        return not is_tracer(x)
    if array_api_compat.is_torch_array(x):
        return not _is_torch_placeholder(x)
    return not array_api_compat.is_lazy_array(x)


def _is_torch_placeholder(x: Any) -> bool:
    """A PyTorch tensor without values: on the meta device, or fake (``FakeTensorMode``,
    ``torch.compile``'s tracing)."""
    if x.device.type == "meta":
        return True
    from torch._subclasses.fake_tensor import is_fake  # torch is imported: x is a tensor

    return bool(is_fake(x))


def all_finite(xp: ModuleType, a: Array) -> bool:
    """Whether every value of the eager array ``a`` is finite.

    NaN and inf survive a sum, so a finite sum proves every value finite in one read-only
    pass (``isfinite`` then ``all`` costs 45x more in PyTorch); a sum that overflowed from
    finite values falls through to the elementwise test. NumPy's warnings about the
    overflow are silenced (``errstate`` is thread-local).
    """
    with np.errstate(all="ignore"):
        return bool(xp.isfinite(xp.sum(a))) or bool(xp.all(xp.isfinite(a)))


def is_tracer(x: Array) -> bool:
    """True for a JAX tracer (a value inside ``jit``/``grad``): never cache one."""
    if not array_api_compat.is_jax_array(x):
        return False
    import jax  # the array is a JAX array, so JAX is already imported

    return isinstance(x, jax.core.Tracer)


def stop_gradient(xp: ModuleType, x: Array) -> Array:
    """Treat ``x`` as a constant for automatic differentiation.

    ``detach`` for PyTorch, ``jax.lax.stop_gradient`` for JAX, the identity elsewhere
    (NumPy, CuPy, Dask and array-api-strict have no autograd).
    """
    if array_api_compat.is_torch_namespace(xp):
        return x.detach()
    if array_api_compat.is_jax_namespace(xp):
        import jax  # the caller's arrays are JAX arrays, so JAX is already imported

        return jax.lax.stop_gradient(x)
    return x


def to_host(x: Array) -> np.ndarray:
    """A NumPy copy of ``x`` from any supported framework and device (for diagnostics)."""
    if array_api_compat.is_torch_array(x):
        return np.asarray(x.detach().cpu().float() if x.dtype.itemsize < 4 else x.detach().cpu())
    if array_api_compat.is_cupy_array(x):
        return np.asarray(x.get())
    if array_api_compat.is_dask_array(x):
        return np.asarray(x.compute())  # type: ignore[no-untyped-call]
    if type(x).__module__.startswith("array_api_strict"):
        import array_api_strict

        return np.asarray(x.to_device(array_api_strict.Device("CPU_DEVICE")))
    return np.asarray(x)


def take_rows(xp: ModuleType, a: Array, index: np.ndarray) -> Array:
    """The rows ``index`` (a host integer array) of ``a`` along axis 0 (``xp.take``;
    Dask's take with an index of one element reports the whole axis as its shape, so a
    Dask array is indexed with the host array itself)."""
    if array_api_compat.is_dask_array(a):
        return a[index]
    return xp.take(a, xp.asarray(index, device=device(a)), axis=0)


def row_mean(xp: ModuleType, a: Array, keep: Array | None) -> Array:
    """Mean over axis -2 of ``a`` ``(..., L, w)`` restricted to rows where ``keep``
    ``(..., L)`` is True (all rows when None); ``(..., 1, w)``. No valid row gives 0."""
    if keep is None:
        return xp.sum(a, axis=-2, keepdims=True) / max(a.shape[-2], 1)
    weight = xp.astype(keep, a.dtype)[..., None]
    count = xp.sum(weight, axis=-2, keepdims=True)
    total = xp.sum(xp.where(keep[..., None], a, 0.0), axis=-2, keepdims=True)
    return total / xp.where(count > 0, count, 1.0)


def from_host(xp: ModuleType, host: np.ndarray, *, dtype: Any, device: Any) -> Array:
    """Copy a host NumPy array into namespace ``xp`` with the given dtype and device."""
    return xp.asarray(host, dtype=dtype, device=device)


def eigh(xp: ModuleType, a: Array) -> tuple[Array, Array]:
    """Eigenvalues (ascending) and eigenvectors of symmetric matrices ``a`` ``(..., n, n)``.

    The standard's ``linalg`` extension; Dask, which lacks it, runs NumPy's on each
    (small) matrix lazily.
    """
    linalg = getattr(xp, "linalg", None)
    if linalg is not None and hasattr(linalg, "eigh"):
        w, v = linalg.eigh(a)
        return w, v
    if array_api_compat.is_dask_array(a):
        import dask.array as da

        square = a.rechunk({a.ndim - 2: -1, a.ndim - 1: -1})  # type: ignore[no-untyped-call]
        w, v = da.apply_gufunc(np.linalg.eigh, "(i,j)->(i),(i,j)", square)  # type: ignore[no-untyped-call]
        return w, v
    raise TypeError(
        f"{xp.__name__} has no linalg.eigh, which the balance needs"
    )  # pragma: no cover
