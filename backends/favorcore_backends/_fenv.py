"""Flush-to-zero for the calling thread, around one product (x86-64 Linux).

x86 computes denormal numbers 10-100x slower than normal ones, in OpenBLAS too: NumPy's
causal chunk products of small features (keys of large norm) then slow down by an order
of magnitude. With the MXCSR's flush-to-zero bit set, results below the smallest normal
number become 0 at full speed instead. NumPy has no switch for it; glibc's ``fegetenv``
and ``fesetenv`` set it for the calling thread alone, and only inside the block (the mode
and the flags are the caller's again when it is left, by an exception too). A product
that BLAS splits over its own threads is flushed only in the calling thread's share. The
underflow flag then says whether anything was flushed, so that the caller can recompute
what the flush may have changed (``NumpySteps.rescore``).

Elsewhere (another OS, another architecture, a C library whose ``fenv_t`` is laid out
otherwise, found by a self-test on first use) :func:`flush_to_zero` changes nothing and
reports no underflow: products are exact, at the denormals' speed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

__all__ = ["Flush", "flush_to_zero", "supported"]

#: ``sizeof(fenv_t)`` on x86-64 glibc and musl: the x87 environment (28 bytes), then MXCSR
_FENV_SIZE = 32
_MXCSR = 28
_FTZ = 0x8000  # MXCSR bit 15: flush to zero
_FE_UNDERFLOW = 0x10


class Flush:
    """What :func:`flush_to_zero` yields: ``underflowed``, set on leaving the block."""

    underflowed: bool = False


@functools.cache
def _libm() -> Any:
    """The C library's floating-point environment functions, or None."""
    if not (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")):
        return None
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
        for name in ("fegetenv", "fesetenv", "feclearexcept", "fetestexcept"):
            getattr(lib, name).restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return lib


@contextmanager
def _set(lib: Any, flush: Flush) -> Iterator[Flush]:
    saved = ctypes.create_string_buffer(_FENV_SIZE)
    if lib.fegetenv(saved):
        yield flush
        return
    env = ctypes.create_string_buffer(saved.raw, _FENV_SIZE)
    mxcsr = int.from_bytes(env.raw[_MXCSR : _MXCSR + 4], "little") | _FTZ
    ctypes.memmove(ctypes.addressof(env) + _MXCSR, mxcsr.to_bytes(4, "little"), 4)
    try:  # the mode is set inside: an interrupt anywhere from here on restores it
        lib.fesetenv(env)
        lib.feclearexcept(_FE_UNDERFLOW)
        yield flush
    finally:
        underflow = lib.fetestexcept(_FE_UNDERFLOW)
        lib.fesetenv(saved)  # the caller's mode and flags, as they were
        flush.underflowed = bool(underflow)


@functools.cache
def supported() -> bool:
    """Whether :func:`flush_to_zero` works here (checked once: a product of two small
    float32 numbers is 0 and raises the underflow flag inside, is denormal after)."""
    lib = _libm()
    if lib is None:
        return False
    small = np.array([2.0**-100], dtype=np.float32)
    flush = Flush()
    with np.errstate(under="ignore"):
        with _set(lib, flush):
            inside = float((small * np.float32(2.0**-40))[0])
        after = float((small * np.float32(2.0**-40))[0])
    return inside == 0.0 and flush.underflowed and after == 2.0**-140


@contextmanager
def flush_to_zero() -> Iterator[Flush]:
    """Flush results below the smallest normal number to 0 in this thread, inside the block.

    Yields a :class:`Flush` whose ``underflowed`` says, after the block, whether any result
    was flushed (or, without support, is False: nothing was changed).
    """
    flush = Flush()
    if not supported():
        yield flush
        return
    with _set(_libm(), flush):
        yield flush
