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


def naive_favor(
    q, k, v, w, *, a=0.0, balance=None, scale=None, causal=False, key_mask=None, kv0=None
):
    """FAVOR attention from the formulas, quadratic, in float64: ``(out, kv)``.

    ``phi(u) = m^-1/2 exp(A |w|^2 + sqrt(1 - 4A) w . u - |u|^2/2)`` for the rows ``w`` of
    the projection (``[W; -W]`` for antithetic maps; ``A = 0``: FAVOR+) on the scaled rows
    ``x = sqrt(s) q M``, ``y = sqrt(s) k M^-T - c`` (``balance``: ``(M, M^-T, c)``). The
    constant ``(1 - 4A)^(d/4)`` cancels and is left out, as in the engine's states.
    ``kv`` is the state after the call: ``kv0 + [phi(Y)^T V | phi(Y)^T 1]`` over valid keys.
    """
    q, k, v, w = (np.asarray(t, dtype=np.float64) for t in (q, k, v, w))
    s = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    x, y = math.sqrt(s) * q, math.sqrt(s) * k
    if balance is not None:
        m_q, m_k, c = (np.asarray(t, dtype=np.float64) for t in balance[:3])
        x, y = x @ m_q, y @ m_k - c
    a = np.asarray(a, dtype=np.float64)
    if key_mask is not None:  # masked rows may hold anything: they never reach phi
        y = np.where(key_mask[..., None], y, 0.0)
        v = np.where(key_mask[..., None], v, 0.0)

    def phi(u):
        e = (
            a * (w * w).sum(-1)
            + np.sqrt(1 - 4 * a) * (u @ w.T)
            - (u * u).sum(-1, keepdims=True) / 2
        )
        return np.exp(e) / math.sqrt(w.shape[0])

    qf, kf = phi(x), phi(y)
    if key_mask is not None:
        kf = np.where(key_mask[..., None], kf, 0.0)
    scores = np.where(
        allowed(q.shape[-2], k.shape[-2], causal, key_mask), qf @ np.swapaxes(kf, -1, -2), 0.0
    )
    v1 = np.concatenate([v, np.ones((*v.shape[:-1], 1))], axis=-1)
    out1 = scores @ v1
    kv = np.swapaxes(kf, -1, -2) @ v1
    if kv0 is not None:
        out1, kv = out1 + qf @ np.asarray(kv0, dtype=np.float64), kv + kv0
    num, den = out1[..., :-1], out1[..., -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, 0.0), kv


def favor_plus(xp, q, k, v, w, *, allowed, scale, kv0=None):
    """FAVOR+ from the formulas, quadratic, in any array API namespace ``xp`` (so that
    the framework's autodiff of it is an independent reference for the gradient).

    ``allowed`` is a boolean ``(..., Lq, Lk)`` of the keys each query may attend to
    (causality, padding, documents: the caller's), broadcast against the heads; ``kv0``
    a state ``(..., m, dv + 1)`` every query also attends to. Rows with no weight give 0.
    """
    x, y = math.sqrt(scale) * q, math.sqrt(scale) * k
    m = w.shape[0]

    def phi(u):
        return xp.exp(
            u @ xp.matrix_transpose(w) - xp.sum(u * u, axis=-1, keepdims=True) / 2
        ) / math.sqrt(m)

    qf, kf = phi(x), phi(y)
    scores = xp.where(allowed, qf @ xp.matrix_transpose(kf), 0.0)
    v1 = xp.concat([v, xp.ones((*v.shape[:-1], 1), dtype=v.dtype)], axis=-1)
    out1 = scores @ v1
    if kv0 is not None:
        out1 = out1 + qf @ kv0
    num, den = out1[..., :-1], out1[..., -1:]
    safe = xp.where(den > 0, den, 1.0)
    return xp.where(den > 0, num / safe, 0.0)
