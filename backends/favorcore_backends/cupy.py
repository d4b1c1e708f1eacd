"""CuPy adapter: run the core on the device (and stream) of the inputs.

The core runs on CuPy arrays as it is. CuPy, unlike PyTorch, launches kernels on the
*current* device, not on the device of the operands, and on the current stream. These
wrappers make the inputs' device current (and the given stream, if any) for the duration
of the call, so that arrays on GPU 1 are computed on GPU 1 whatever the current device
is, and the work can overlap other streams.
"""

from __future__ import annotations

import contextlib
from typing import Any

import cupy

import favorcore

__all__ = ["favor_attention", "on_device", "softmax_attention"]


@contextlib.contextmanager
def on_device(x: Any, stream: Any = None) -> Any:
    """Make ``x``'s device (and ``stream``, if given) current inside the block."""
    with x.device, stream if stream is not None else contextlib.nullcontext():
        yield


def favor_attention(q: Any, k: Any, v: Any, *, stream: Any = None, **kwargs: Any) -> Any:
    """:func:`favorcore.favor_attention` on ``q``'s device, on ``stream`` if given."""
    if not isinstance(q, cupy.ndarray):
        raise TypeError(f"q must be a cupy.ndarray, got {type(q).__name__}")
    with on_device(q, stream):
        return favorcore.favor_attention(q, k, v, **kwargs)


def softmax_attention(q: Any, k: Any, v: Any, *, stream: Any = None, **kwargs: Any) -> Any:
    """:func:`favorcore.softmax_attention` on ``q``'s device, on ``stream`` if given."""
    if not isinstance(q, cupy.ndarray):
        raise TypeError(f"q must be a cupy.ndarray, got {type(q).__name__}")
    with on_device(q, stream):
        return favorcore.softmax_attention(q, k, v, **kwargs)
