"""NumPy adapter: the engine's operations in place (and on every core), scikit-learn features.

Importing this module (the core does it when it first meets NumPy arrays) registers
:class:`NumpySteps` for NumPy: :func:`favorcore.favor_attention` on NumPy arrays then runs
the operations of :mod:`favorcore_backends._eager`, products into buffers and elementwise
steps in place, and:

* **work items on several cores** when NumPy's BLAS runs one thread. NumPy computes
  ``exp`` on one core; its BLAS may use them all. favorcore changes no BLAS setting (a
  limit is process-wide for OpenBLAS: it would reach the caller's other threads), so it
  starts threads of its own only where none of BLAS's compete with them: when you have
  limited BLAS to one thread yourself, e.g. ``threadpoolctl.threadpool_limits(1, "blas")``
  around your calls, or ``OPENBLAS_NUM_THREADS=1``. Otherwise the work items run in the
  calling thread and BLAS uses its threads. The threads are started for a call and joined
  before it returns;
* **flush-to-zero** for the causal chunks' score products (x86-64 Linux): results below
  the smallest normal number become 0 at full speed, in the calling thread only, for the
  duration of the product (:mod:`._fenv`); the rows the flush may have changed are
  recomputed exactly.

:class:`FavorFeatures` (scikit-learn, imported on first use) maps samples to random
features of the softmax or Gaussian kernel.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import array_api_compat.numpy as xp_numpy
import numpy as np

from favorcore import register_steps

from ._eager import EagerSteps, Lib
from ._fenv import flush_to_zero

__all__ = ["FavorFeatures", "NumpySteps"]  # noqa: F822 (FavorFeatures: module __getattr__)


def _sq_norms(y: np.ndarray, out: np.ndarray) -> None:
    np.einsum("ij,ij->i", y, y, out=out)


def _zero_future(scores: np.ndarray, group: int) -> None:
    np.copyto(scores, 0.0, where=_future(scores.shape[-1], group))


@functools.lru_cache(maxsize=8)
def _future(c: int, group: int) -> np.ndarray:
    """``(c G, c)`` boolean: True where the key comes after the query row's position."""
    return np.arange(c)[None, :] > (np.arange(c * group) // group)[:, None]


@functools.lru_cache(maxsize=8)
def _ones(n: int, dtype: Any) -> np.ndarray:
    ones = np.ones(n, dtype=dtype)
    ones.flags.writeable = False
    return ones


def _key_sums(kf: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``kf^T V`` and the column sums apart (BLAS runs ``dv + 1`` columns slower than
    ``dv`` when ``dv`` is a power of two)."""
    m, dv = kf.shape[1], v.shape[1]
    kv = np.empty((m, dv + 1), dtype=kf.dtype)
    np.matmul(kf.T, v, out=kv[:, :dv])
    np.matmul(_ones(kf.shape[0], kf.dtype), kf, out=kv[:, dv])
    return kv


def _add_product(o: np.ndarray, a: np.ndarray, b: np.ndarray, tmp: np.ndarray) -> None:
    o += np.matmul(a, b, out=tmp)


def _affine(x: np.ndarray, w: np.ndarray, b: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    out = np.matmul(x, w, out=out)
    out += b
    return out


NUMPY = Lib(
    xp=xp_numpy,
    native=np,
    sq_norms=_sq_norms,
    fill_where=lambda a, cond, value: np.copyto(a, value, where=cond),
    clamp_min=lambda e, floor: np.maximum(e, floor, out=e),
    zero_future=_zero_future,
    key_sums=_key_sums,
    add_product=_add_product,
    bmm=lambda a, b, out: np.matmul(a, b, out=out),
    affine=_affine,
    on_host=lambda a: True,
)


@functools.cache
def _blas() -> list[Any]:
    """threadpoolctl's controllers of the loaded BLAS libraries (scanned once)."""
    from threadpoolctl import ThreadpoolController

    return [c for c in ThreadpoolController().lib_controllers if c.user_api == "blas"]


def blas_single_threaded() -> bool:
    """Whether every loaded BLAS runs one thread (then favorcore's threads compete with
    none of its), set by the caller: OpenBLAS with OpenMP, whose thread count is each
    thread's own, counts as not."""
    blas = _blas()
    return bool(blas) and all(
        c.num_threads == 1 and not (c.internal_api == "openblas" and c.threading_layer == "openmp")
        for c in blas
    )


class NumpySteps(EagerSteps):
    """The eager operations for NumPy: flush-to-zero in the causal scores, and work items
    on every core when BLAS runs one thread."""

    def __init__(self, *, block: int = 2048, chunk: int = 64, workers: int | None = None) -> None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        super().__init__(NUMPY, block=block, chunk=chunk, workers=workers or cores or 1)

    @property
    def workers(self) -> int:  # type: ignore[override]
        """:attr:`max_workers` when BLAS runs one thread, else 1 (see the module docstring)."""
        return self.max_workers if self.max_workers > 1 and blas_single_threaded() else 1

    def scores(self, qc: Any, kc: Any, out: Any) -> bool:
        """The scores with flush-to-zero in this thread (where it is supported)."""
        with flush_to_zero() as flush:
            np.matmul(qc, kc.transpose(0, 2, 1), out=out)
        return flush.underflowed

    def rescore(self, qc: Any, kc: Any, vc: Any, pre: Any, oc: Any) -> None:
        """Recompute without flush-to-zero the rows whose results it may have changed.

        A score is a sum of ``m`` products of features, all >= 0, so the flush lost at
        most ``m u`` of it (``u`` the smallest normal number); a row's normaliser (its
        scores' sum plus ``qf . prefix``) at most ``c m u``, its numerator
        ``c m u max|v|``. Rows whose normaliser is at least ``c m u / eps`` thus changed
        by at most ``eps (max|v| + |result|)``, as much as rounding changes them; the
        others (every feature product of the row's keys in its chunk so small, and little
        before them) are recomputed from their chunk's prefix, exactly as without it.
        """
        _, cg, m = qc.shape
        c = kc.shape[1]
        info = np.finfo(qc.dtype)
        limit = c * m * float(info.smallest_normal) / float(info.eps)
        chunks, rows = np.nonzero(oc[:, :, -1] < limit)
        for i in np.unique(chunks):
            r = rows[chunks == i]
            s = qc[i, r] @ kc[i].T
            s[np.arange(c) > (r // (cg // c))[:, None]] = 0.0  # the keys after each row
            oc[i, r] = qc[i, r] @ pre[i] + s @ vc[i]


register_steps("array_api_compat.numpy", NumpySteps())


def __getattr__(name: str) -> Any:
    if name == "FavorFeatures":  # scikit-learn is imported only when asked for
        from ._sklearn import FavorFeatures

        return FavorFeatures
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
