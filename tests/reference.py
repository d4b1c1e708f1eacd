"""Independent float64 NumPy references: written from the formulas, not from favorcore."""

from __future__ import annotations

import math

import numpy as np


def phi_positive(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """FAVOR+: m^(-1/2) exp(W x - |x|^2/2), m = rows of w."""
    return np.exp(x @ w.T - (x * x).sum(-1, keepdims=True) / 2) / math.sqrt(w.shape[0])


def phi_hyperbolic(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """m^(-1/2) exp(-|x|^2/2) [exp(W x), exp(-W x)], m = 2 * rows of w."""
    p = x @ w.T
    base = np.exp(-(x * x).sum(-1, keepdims=True) / 2) / math.sqrt(2 * w.shape[0])
    return base * np.concatenate([np.exp(p), np.exp(-p)], axis=-1)


def phi_trigonometric(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(m/2)^(-1/2) exp(|x|^2/2) [sin(W x), cos(W x)], m = 2 * rows of w."""
    p = x @ w.T
    base = np.exp((x * x).sum(-1, keepdims=True) / 2) / math.sqrt(w.shape[0])
    return base * np.concatenate([np.sin(p), np.cos(p)], axis=-1)


def allowed(lq: int, lk: int, causal: bool, key_mask: np.ndarray | None) -> np.ndarray:
    """Boolean (..., Lq, Lk): which key each query may attend to."""
    a = np.ones((lq, lk), dtype=bool)
    if causal:
        a = np.tril(a)
    if key_mask is not None:
        a = a & key_mask[..., None, :]
    return a


def quadratic_attention(
    qf: np.ndarray, kf: np.ndarray, v: np.ndarray, *, causal: bool = False, key_mask=None
) -> np.ndarray:
    """D^-1 (phi(Q) phi(K)^T ⊙ mask) V in float64; rows with no valid key give 0."""
    qf, kf, v = (np.asarray(a, dtype=np.float64) for a in (qf, kf, v))
    a = qf @ np.swapaxes(kf, -1, -2)
    ok = allowed(qf.shape[-2], kf.shape[-2], causal, key_mask)
    a = np.where(ok, a, 0.0)
    v = np.where(np.isfinite(v), v, 0.0)  # masked garbage may be NaN; its weight is 0
    den = a.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a @ v) / den, 0.0)


def softmax_attention(q, k, v, *, causal=False, key_mask=None, scale=None) -> np.ndarray:
    """softmax(scale q k^T) v in float64, the textbook formula."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    ok = allowed(q.shape[-2], k.shape[-2], causal, key_mask)
    k = np.where(np.isfinite(k), k, 0.0)
    v = np.where(np.isfinite(v), v, 0.0)
    logits = np.where(ok, scale * q @ np.swapaxes(k, -1, -2), -np.inf)
    top = logits.max(-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.where(ok, np.exp(logits - top), 0.0)
    den = e.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (e @ v) / den, 0.0)
