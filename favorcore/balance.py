r"""Exact variance reduction: balance queries against keys and shift all keys.

With the scaled rows ``x = sqrt(scale) q`` and ``y = sqrt(scale) k``:

* **balance**: ``x <- a x`` and ``y <- y / a`` leave every ``x . y`` unchanged; with
  ``a^4 = E|y - mean y|^2 / E|x - mean x|^2`` both sides get the same spread;
* **shift**: ``y_j <- y_j - c`` with one vector ``c`` for all keys of a batch row and head
  changes every logit of a query by the same ``x . c``, which cancels in the softmax
  normalisation. ``c = mean x + mean y`` (of the balanced rows, over valid keys) minimises
  the mean of ``|x + y|^2``, which drives the variance of the positive estimators.

Exact softmax attention is unchanged (to rounding); FAVOR's estimate gets far less
variance on real models' queries and keys, whose rows share large common components.
The statistics are constants for autograd. In causal attention they must not depend on
future tokens and must stay fixed along the sequence: compute them once
(:func:`balance_statistics` on a calibration batch) and pass them in.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from ._compat import Array, compute_dtype, namespace, row_mean, stop_gradient

__all__ = ["Balance", "apply_balance", "balance_statistics"]


class Balance(NamedTuple):
    """Balance and shift statistics, per batch row and head (a JAX pytree).

    Attributes
    ----------
    alpha : array, shape batch + (1, 1)
        Query scale ``a`` (keys are divided by it).
    shift : array, shape batch + (1, d)
        The key shift ``c``, in scaled units (``sqrt(scale) k / a - c``).
    spread : array, shape batch + (1, 1), optional
        ``E|x + y|^2`` over query-key pairs of the balanced, shifted rows (the sum of
        their total variances). FAVOR++ takes its ``A`` from it
        (:meth:`~favorcore.OptimalPositiveFeatures.coefficient`), so that statistics
        given once also fix ``A`` in causal attention.
    """

    alpha: Array
    shift: Array
    spread: Array | None = None


def balance_statistics(
    q: Array,
    k: Array,
    *,
    key_mask: Array | None = None,
    query_mask: Array | None = None,
    scale: float | None = None,
) -> Balance:
    """The balance and shift of ``q`` ``(..., Lq, d)`` and ``k`` ``(..., Lk, d)``.

    Means and variances run over the valid queries (``query_mask`` ``(..., Lq)``, True =
    a real token; all when None) and the valid keys (``key_mask`` ``(..., Lk)``, True =
    attend). A degenerate side (zero variance) gets ``a = 1``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> q, k = rng.standard_normal((50, 8)) + 3.0, 0.1 * rng.standard_normal((60, 8)) - 1.0
    >>> stats = balance_statistics(q, k)
    >>> x, y = apply_balance(q, k, stats)
    >>> bool(np.allclose(np.var(x, 0).sum(), np.var(y, 0).sum()))
    True
    """
    xp = namespace(q=q, k=k, key_mask=key_mask, query_mask=query_mask)
    dtype = compute_dtype(xp, q.dtype)
    root = math.sqrt(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    x = xp.astype(q, dtype, copy=False) * root
    y = xp.astype(k, dtype, copy=False) * root
    mean_x = row_mean(xp, x, query_mask)
    var_x = row_mean(xp, xp.sum((x - mean_x) ** 2, axis=-1, keepdims=True), query_mask)
    mean_y = row_mean(xp, y, key_mask)
    var_y = row_mean(xp, xp.sum((y - mean_y) ** 2, axis=-1, keepdims=True), key_mask)
    tiny = float(xp.finfo(dtype).smallest_normal)
    ok = (var_x > tiny) & (var_y > tiny)
    alpha = xp.where(ok, (xp.where(ok, var_y, 1.0) / xp.where(ok, var_x, 1.0)) ** 0.25, 1.0)
    shift = alpha * mean_x + mean_y / alpha
    spread = alpha**2 * var_x + var_y / alpha**2
    return Balance(*(stop_gradient(xp, a) for a in (alpha, shift, spread)))


def apply_balance(
    q: Array, k: Array, stats: Balance, *, scale: float | None = None
) -> tuple[Array, Array]:
    """The scaled, balanced and shifted rows ``(x, y)``: ``x . y`` equals ``scale q . k``
    minus a constant per query, so softmax attention of ``(x, y)`` with scale 1 is exact.
    """
    xp = namespace(q=q, k=k)
    dtype = compute_dtype(xp, q.dtype)
    root = math.sqrt(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    x = xp.astype(q, dtype, copy=False) * (root * stats.alpha)
    y = xp.astype(k, dtype, copy=False) * (root / stats.alpha) - stats.shift
    return x, y
