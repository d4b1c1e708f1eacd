"""Heads of PyTorch attention modules: projecting inputs to heads, pooling their statistics.

Shared by :class:`favorcore_backends.torch.FavorAttention` and the Hugging Face
integration (:mod:`favorcore_backends.transformers`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import favorcore
from favorcore import Balance

__all__ = ["Call", "pooled_statistics", "to_heads"]

#: one call's ``(q, k, key_mask, query_mask, scale)``: ``q`` ``(B, H, Lq, d)``, ``k``
#: ``(B, H, Lk, d)``, the masks ``(B, Lk)`` and ``(B, Lq)`` (True = a real token) or None
Call = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, float]


def to_heads(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, heads: int
) -> torch.Tensor:
    """``x @ weight^T + bias`` split into heads: ``(N, L, E)`` -> ``(N, heads, L, E / heads)``."""
    t = F.linear(x, weight, bias)
    return t.reshape(*t.shape[:-1], heads, t.shape[-1] // heads).transpose(1, 2)


def pooled_statistics(calls: list[Call]) -> Balance:
    """One :class:`~favorcore.Balance` per head, shape ``(1, heads, ...)``, over the real
    tokens of all ``calls``. Computed in float64, returned in the calls' dtype."""

    def flat(t: torch.Tensor) -> torch.Tensor:  # (B, H, L, d) -> (1, H, B L, d)
        return t.transpose(0, 1).reshape(1, t.shape[1], -1, t.shape[-1])

    def ones(n: int, like: torch.Tensor) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bool, device=like.device)

    q = torch.cat([flat(c[0].double()) for c in calls], dim=2)
    k = torch.cat([flat(c[1].double()) for c in calls], dim=2)
    key_mask = torch.cat(
        [ones(c[1].shape[0] * c[1].shape[2], c[1]) if c[2] is None else c[2].reshape(-1)
         for c in calls]
    )[None, None, :]  # fmt: skip
    query_mask = torch.cat(
        [ones(c[0].shape[0] * c[0].shape[2], c[0]) if c[3] is None else c[3].reshape(-1)
         for c in calls]
    )[None, None, :]  # fmt: skip
    stats = favorcore.balance_statistics(
        q, k, key_mask=key_mask, query_mask=query_mask, scale=calls[0][4]
    )
    dtype = calls[0][0].dtype
    return Balance(*(None if t is None else t.to(dtype) for t in stats))
