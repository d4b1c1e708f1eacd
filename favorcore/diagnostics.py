"""How accurate will FAVOR be on *your* queries and keys? Measure it and pick m."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._compat import Array, namespace, to_host
from .attention import favor_attention, softmax_attention
from .balance import balance_statistics
from .features import FeatureMap, OptimalPositiveFeatures, PositiveFeatures

__all__ = ["ErrorEstimate", "estimate_error"]


@dataclass(frozen=True)
class ErrorEstimate:
    """Relative error of FAVOR against exact attention on a sample, per m.

    Attributes
    ----------
    ms : tuple of int
        Numbers of features tried.
    errors : tuple of float
        Mean over seeds of ``|favor - exact|_F / |exact|_F`` for each m.
    spreads : tuple of float
        Standard deviation over seeds of that error.
    target : float
        The error asked for.
    suggested_m : int or None
        The smallest m whose mean error is at most ``target`` (None: none of them).
    """

    ms: tuple[int, ...]
    errors: tuple[float, ...]
    spreads: tuple[float, ...]
    target: float
    suggested_m: int | None

    def __str__(self) -> str:
        rows = [f"{'m':>6} {'rel. error':>11} {'± (seeds)':>10}"]
        rows += [
            f"{m:>6} {e:>11.4f} {s:>10.4f}"
            for m, e, s in zip(self.ms, self.errors, self.spreads, strict=True)
        ]
        tail = (
            f"suggested m = {self.suggested_m} (target {self.target})"
            if self.suggested_m is not None
            else f"no m up to {max(self.ms)} reaches the target {self.target}: more features, "
            "smaller input norms, or another feature map"
        )
        return "\n".join([*rows, tail])


def estimate_error(
    q: Array,
    k: Array,
    v: Array | None = None,
    *,
    features: FeatureMap | None = None,
    ms: tuple[int, ...] = (64, 128, 256, 512, 1024),
    causal: bool = False,
    scale: float | None = None,
    sample: int = 1024,
    seeds: int = 3,
    target: float = 0.1,
) -> ErrorEstimate:
    """Estimate FAVOR's relative error on a sample of the caller's ``q`` and ``k``.

    Takes up to ``sample`` positions of the first sequence of each of (at most) four
    heads, computes exact softmax attention and FAVOR attention with ``features``
    (default: FAVOR++, the library's default; ``m`` replaced by each of ``ms``) for
    ``seeds`` seeds on the host in float64, with the default balance (causal: the
    positive maps get statistics computed from the sample, as from a calibration batch),
    and returns the mean relative error per m and the smallest m that reaches ``target``.

    Parameters
    ----------
    q, k : array, shape (..., L, d)
        Queries and keys (any framework); only a sample is read.
    v : array, optional
        Values; standard Gaussian values when omitted (the error depends on them).
    features : FeatureMap, optional
        The map whose settings are kept (``m`` and ``seed`` vary).
    ms, causal, scale, sample, seeds, target
        What to try.

    Returns
    -------
    ErrorEstimate
        Printable: a table and the suggestion.

    Examples
    --------
    >>> import numpy as np
    >>> q = k = np.random.default_rng(0).standard_normal((2, 256, 16)) * 0.4
    >>> est = estimate_error(q, k, ms=(32, 256), seeds=2)
    >>> est.errors[1] < est.errors[0]
    True
    """
    namespace(q=q, k=k, v=v)
    if not ms or any(isinstance(m, bool) or not isinstance(m, int) or m <= 0 for m in ms):
        raise ValueError(f"ms must be positive integers, got {ms!r}")
    if seeds <= 0 or sample <= 0:
        raise ValueError("seeds and sample must be positive")
    base = OptimalPositiveFeatures() if features is None else features

    def host(a: Array) -> np.ndarray:
        x = to_host(a).astype(np.float64)
        x = x.reshape(-1, *x.shape[-2:])[:4]
        return x[:, :sample]

    qh, kh = host(q), host(k)
    vh = (
        host(v)
        if v is not None
        else np.random.default_rng(0).standard_normal((*kh.shape[:-1], qh.shape[-1]))
    )
    exact = softmax_attention(qh, kh, vh, causal=causal, scale=scale)
    # causal: the positive maps get statistics as if calibrated on this sample
    positive = isinstance(base, PositiveFeatures)
    balance = balance_statistics(qh, kh, scale=scale) if causal and positive else None
    norm = float(np.linalg.norm(exact)) or 1.0
    errors, spreads = [], []
    for m in ms:
        per_seed = []
        for seed in range(seeds):
            fmap = _with(base, m=m, seed=seed)
            out = favor_attention(
                qh, kh, vh, features=fmap, causal=causal, scale=scale, balance=balance
            )
            per_seed.append(float(np.linalg.norm(out - exact)) / norm)
        errors.append(float(np.mean(per_seed)))
        spreads.append(float(np.std(per_seed)))
    ok = [m for m, e in zip(ms, errors, strict=True) if e <= target]
    return ErrorEstimate(tuple(ms), tuple(errors), tuple(spreads), target, min(ok) if ok else None)


def _with(fmap: FeatureMap, **changes: Any) -> FeatureMap:
    import dataclasses

    return dataclasses.replace(fmap, **changes)
