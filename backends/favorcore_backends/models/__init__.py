"""Reusable PyTorch models built on favorcore's attention (needs ``torch``)."""

from .performer import (
    PerformerConfig,
    PerformerLM,
    SelfAttention,
    apply_rotary,
    exact_to_favor,
    positions_from_segments,
)

__all__ = [
    "PerformerConfig",
    "PerformerLM",
    "SelfAttention",
    "apply_rotary",
    "exact_to_favor",
    "positions_from_segments",
]
