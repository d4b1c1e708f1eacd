"""Named steps that a backend's adapter may provide, keyed by namespace.

The core looks a step up when it needs it. The first time it meets a namespace it imports
that namespace's adapter module (``favorcore_backends.<name>``), which registers its
steps; the framework is already imported, since the caller's arrays belong to it, and no
other framework is touched. Without an adapter every step has the core's default.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

__all__ = ["fast_paths", "lookup", "register_step"]

#: namespace name (as array-api-compat names it) -> adapter module that registers steps
_ADAPTERS = {
    "array_api_compat.numpy": "favorcore_backends.numpy",
    "numpy": "favorcore_backends.numpy",
    "array_api_compat.torch": "favorcore_backends.torch",
    "jax.numpy": "favorcore_backends.jax",
}

_STEPS: dict[str, dict[str, Any]] = {}
_MET: set[str] = set()
_LOCK = threading.Lock()
_STATE = threading.local()


def register_step(namespace_name: str, step: str, value: Any) -> None:
    """Register ``value`` as step ``step`` for arrays of namespace ``namespace_name``."""
    _STEPS.setdefault(namespace_name, {})[step] = value


def lookup(xp: ModuleType, step: str) -> Any | None:
    """The step registered for ``xp``, discovering its adapter on first use; else None."""
    if not getattr(_STATE, "enabled", True):
        return None
    name = xp.__name__
    if name not in _MET:
        with _LOCK:
            if name not in _MET:
                _MET.add(name)
                module = _ADAPTERS.get(name)
                if module is not None:
                    with contextlib.suppress(ImportError):
                        importlib.import_module(module)
    return _STEPS.get(name, {}).get(step)


@contextlib.contextmanager
def fast_paths(enabled: bool) -> Iterator[None]:
    """Turn the adapters' registered steps on or off in this thread (tests, benchmarks).

    >>> import favorcore
    >>> with favorcore.fast_paths(False):
    ...     pass  # favorcore.favor_attention runs the plain core here
    """
    before = getattr(_STATE, "enabled", True)
    _STATE.enabled = enabled
    try:
        yield
    finally:
        _STATE.enabled = before
