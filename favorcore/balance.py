r"""Exact variance reduction: balance queries against keys and shift all keys.

With the scaled rows ``x = sqrt(scale) q`` and ``y = sqrt(scale) k``:

* **balance**: ``x <- x M`` and ``y <- y M^-T`` (``M`` invertible) leave every ``x . y``
  unchanged. FAVOR's positive estimators have a variance that grows with ``|x + y|^2``;
  over all query-key pairs its mean (after the shift below) is
  ``tr(M^T C_x M) + tr(M^-1 C_y M^-T)`` with ``C_x``, ``C_y`` the covariances of the rows,
  a function of ``G = M M^T`` only. The ``"matrix"`` balance takes the minimiser, the
  geometric mean ``G = C_x^-1/2 (C_x^1/2 C_y C_x^1/2)^1/2 C_x^-1/2`` of ``C_x^-1`` and
  ``C_y``, as ``M = C_x^-1/2 (C_x^1/2 C_y C_x^1/2)^1/4`` (two symmetric eigendecompositions;
  every ``M`` with ``M M^T = G`` differs by a rotation, to which the random features are
  blind); the ``"scalar"`` balance restricts ``M`` to ``a I``, ``a^4 = tr C_y / tr C_x``.
  (Both covariances get a ridge of 1% of their mean eigenvalue first, so that ``M`` stays
  well determined when a side spreads over fewer than ``d`` directions.)
* **shift**: ``y_j <- y_j - c`` with one vector ``c`` for all keys of a batch row and head
  changes every logit of a query by the same ``x . c``, which cancels in the softmax
  normalisation. ``c = mean x + mean y`` (of the balanced rows, over valid tokens)
  minimises the mean of ``|x + y|^2``.

Exact softmax attention is unchanged (to rounding); FAVOR's estimate gets far less
variance on real models' queries and keys, whose rows share large common components and
spread unevenly over directions. The statistics are constants for autograd. In causal
attention they must not depend on future tokens and must stay fixed along the sequence:
compute them once (:func:`balance_statistics` on a calibration batch) and pass them in.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Literal, NamedTuple

from ._compat import Array, compute_dtype, device, eigh, namespace, row_mean, stop_gradient

__all__ = ["BALANCE_KINDS", "Balance", "BalanceKind", "apply_balance", "balance_statistics"]

BalanceKind = Literal["matrix", "scalar"]
BALANCE_KINDS: tuple[BalanceKind, ...] = ("matrix", "scalar")

#: largest ratio of the eigenvalues of ``C_x`` and of ``C_x^1/2 C_y C_x^1/2``: keeps
#: ``cond M <= 1000`` so that ``x M . y M^-T`` stays well conditioned
_CONDITION = 1e4
#: ridge added to both covariances, relative to their mean eigenvalue
_RIDGE = 1e-2
#: rows per side the statistics read by default (longer sides are strided)
SAMPLE = 1024


class Balance(NamedTuple):
    """Balance and shift statistics, per batch row and head (a JAX pytree).

    Attributes
    ----------
    query : array, shape batch + (d, d)
        Invertible ``M``: queries become ``sqrt(scale) q M``.
    key : array, shape batch + (d, d)
        ``M^-T``: keys become ``sqrt(scale) k M^-T - shift``.
    shift : array, shape batch + (1, d)
        The key shift ``c``.
    spread : array, shape batch + (1, 1), optional
        ``mean_ij |x_i + y_j|^2`` of the balanced, shifted rows. FAVOR++ takes its ``A``
        from it (:meth:`~favorcore.OptimalPositiveFeatures.coefficient`), so that
        statistics given once also fix ``A`` in causal attention.
    """

    query: Array
    key: Array
    shift: Array
    spread: Array | None = None


def _covariance(xp: ModuleType, centred: Array, keep: Array | None) -> Array:
    """``sum_i r_i^T r_i / n`` over the rows where ``keep`` (all when None)."""
    if keep is None:
        n = max(centred.shape[-2], 1)
    else:
        centred = xp.where(keep[..., None], centred, 0.0)
        count = xp.sum(xp.astype(keep, centred.dtype), axis=-1)[..., None, None]
        n = xp.where(count > 0, count, 1.0)
    return (xp.matrix_transpose(centred) @ centred) / n


def _floor(xp: ModuleType, w: Array, tiny: float) -> Array:
    """Eigenvalues ``w`` (ascending) kept within ``_CONDITION`` of the largest (and > 0)."""
    low = w[..., -1:] / _CONDITION
    low = xp.where(low > tiny, low, tiny)  # (degenerate rows are replaced by I)
    return xp.where(w > low, w, low)


def _power(xp: ModuleType, w: Array, v: Array, p: float) -> Array:
    """``V diag(w^p) V^T``."""
    return (v * (w**p)[..., None, :]) @ xp.matrix_transpose(v)


def _strided(a: Array, mask: Array | None, sample: int) -> tuple[Array, Array | None]:
    """Every ``ceil(L / sample)``-th row of ``a`` ``(..., L, d)`` (and of its mask)."""
    step = -(-a.shape[-2] // sample)
    if step <= 1:
        return a, mask
    if mask is not None and mask.shape[-1] != 1:  # (a broadcast length-1 mask stays)
        mask = mask[..., ::step]
    return a[..., ::step, :], mask


def balance_statistics(
    q: Array,
    k: Array,
    *,
    key_mask: Array | None = None,
    query_mask: Array | None = None,
    scale: float | None = None,
    kind: BalanceKind = "matrix",
    sample: int | None = SAMPLE,
) -> Balance:
    """The balance and shift of ``q`` ``(..., Lq, d)`` and ``k`` ``(..., Lk, d)``.

    Means and covariances run over the valid queries (``query_mask`` ``(..., Lq)``, True
    = a real token; all when None) and the valid keys (``key_mask`` ``(..., Lk)``, True =
    attend). ``kind`` is ``"matrix"`` (the default: the best balance, one symmetric
    matrix per batch row and head) or ``"scalar"``. A degenerate side (no spread) gets
    ``M = I``. A side longer than ``sample`` rows contributes every ``ceil(L / sample)``-th
    row (None: all): any statistics leave attention exact, and a few thousand rows
    determine ``d x d`` covariances well at a fraction of the cost.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((500, 4)) * [3.0, 1.0, 0.3, 0.1]
    >>> k = rng.standard_normal((600, 4)) * [0.1, 0.3, 1.0, 3.0]
    >>> x, y = apply_balance(q, k, balance_statistics(q, k))
    >>> bool(np.allclose(x @ y.T - (q @ k.T) / 2, (x @ y.T - (q @ k.T) / 2)[:, :1]))
    True
    >>> # mean |x + y|^2 over all pairs, which drives FAVOR's variance: scalar vs matrix
    >>> [round(float(balance_statistics(q, k, kind=kind).spread[0, 0]), 2)
    ...  for kind in ("scalar", "matrix")]
    [10.42, 1.33]
    """
    if kind not in BALANCE_KINDS:
        raise ValueError(f"kind must be one of {BALANCE_KINDS}, got {kind!r}")
    if sample is not None and (
        isinstance(sample, bool) or not isinstance(sample, int) or sample <= 0
    ):
        raise ValueError(f"sample must be a positive integer or None, got {sample!r}")
    xp = namespace(q=q, k=k, key_mask=key_mask, query_mask=query_mask)
    dtype = compute_dtype(xp, q.dtype)
    d = q.shape[-1]
    if sample is not None:
        q, query_mask = _strided(q, query_mask, sample)
        k, key_mask = _strided(k, key_mask, sample)
    root = math.sqrt(1.0 / math.sqrt(d) if scale is None else scale)
    x = stop_gradient(xp, xp.astype(q, dtype, copy=False)) * root
    y = stop_gradient(xp, xp.astype(k, dtype, copy=False)) * root
    mean_x, mean_y = row_mean(xp, x, query_mask), row_mean(xp, y, key_mask)
    cov_x = _covariance(xp, x - mean_x, query_mask)
    cov_y = _covariance(xp, y - mean_y, key_mask)
    eye = xp.eye(d, dtype=dtype, device=device(x))
    tr_x = xp.sum(cov_x * eye, axis=(-2, -1), keepdims=True)
    tr_y = xp.sum(cov_y * eye, axis=(-2, -1), keepdims=True)
    # rows holding NaN/inf (check_finite=False) get no balance: NaN stays where it was
    finite = xp.isfinite(tr_x) & xp.isfinite(tr_y)
    mean_x, mean_y = xp.where(finite, mean_x, 0.0), xp.where(finite, mean_y, 0.0)
    cov_x, cov_y = xp.where(finite, cov_x, 0.0), xp.where(finite, cov_y, 0.0)
    tiny = float(xp.finfo(dtype).smallest_normal) * d
    ok = finite & (tr_x > tiny) & (tr_y > tiny)
    tr_x, tr_y = xp.where(ok, tr_x, 1.0), xp.where(ok, tr_y, 1.0)
    if kind == "scalar":
        alpha = (tr_y / tr_x) ** 0.25
        query, key = alpha * eye, eye / alpha
    else:  # M = C_x^-1/2 (C_x^1/2 C_y C_x^1/2)^1/4: M M^T = G (module docstring)
        w, v = eigh(xp, cov_x + (_RIDGE * tr_x / d) * eye)  # (a ridge: L < d, ...)
        w = _floor(xp, w, tiny)
        half = _power(xp, w, v, 0.5)
        t = half @ (cov_y + (_RIDGE * tr_y / d) * eye) @ half
        u, z = eigh(xp, (t + xp.matrix_transpose(t)) / 2)
        u = _floor(xp, u, tiny)
        query = _power(xp, w, v, -0.5) @ _power(xp, u, z, 0.25)
        key = half @ _power(xp, u, z, -0.25)  # M^-T
    query, key = xp.where(ok, query, eye), xp.where(ok, key, eye)
    shift = mean_x @ query + mean_y @ key
    spread = xp.sum((cov_x @ query) * query, axis=(-2, -1), keepdims=True) + xp.sum(
        (cov_y @ key) * key, axis=(-2, -1), keepdims=True
    )
    return Balance(*(stop_gradient(xp, a) for a in (query, key, shift, spread)))


def apply_balance(
    q: Array, k: Array, stats: Balance, *, scale: float | None = None
) -> tuple[Array, Array]:
    """The scaled, balanced and shifted rows ``(x, y)``: ``x . y`` equals ``scale q . k``
    minus a constant per query, so softmax attention of ``(x, y)`` with scale 1 is exact.
    """
    xp = namespace(q=q, k=k)
    dtype = compute_dtype(xp, q.dtype)
    root = math.sqrt(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    x = xp.astype(q, dtype, copy=False) @ (xp.astype(stats.query, dtype, copy=False) * root)
    y = xp.astype(k, dtype, copy=False) @ (xp.astype(stats.key, dtype, copy=False) * root)
    return x, y - xp.astype(stats.shift, dtype, copy=False)
