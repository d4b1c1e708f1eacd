"""A Performer language model for PyTorch: FAVOR attention, or exact attention as baseline.

:class:`PerformerLM` is a pre-norm Transformer (token embedding, learned or rotary
positions, ``n_layers`` of attention and an MLP, a final LayerNorm) with two heads: a
masked-LM head (bidirectional calls) and a next-token head (causal calls). Its attention
is :func:`favorcore.favor_attention` with any feature map, or, with
``attention="exact"``, :func:`torch.nn.functional.scaled_dot_product_attention`;
everything else is the same, so an exact model's ``state_dict`` loads into a Performer
with ``strict=True`` (the backward compatibility of the Performer papers). The random
projections are non-persistent buffers, rebuilt from the feature map's seed; causal
statistics (:meth:`PerformerLM.calibrate`) are plain attributes, saved with
:meth:`PerformerLM.favor_state`.

Rotary positions rotate ``q`` and ``k`` before the feature map, so that FAVOR estimates
rotary softmax attention without bias and its features stay positive; the balance
statistics are taken after the rotation. With ``segment_ids`` (packed documents)
positions restart at every document, so a packed batch computes what separate calls
would.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import favorcore
from favorcore import AttentionState, Balance, FeatureMap, OptimalPositiveFeatures

from .. import _torch_steps  # noqa: F401  (registers PyTorch's operations and backward)
from .._heads import pooled_statistics

__all__ = [
    "PerformerConfig",
    "PerformerLM",
    "SelfAttention",
    "apply_rotary",
    "exact_to_favor",
    "positions_from_segments",
]

Attention = Literal["favor", "exact"]
Positions = Literal["learned", "rotary"]


@dataclass(frozen=True)
class PerformerConfig:
    """Sizes and choices of :class:`PerformerLM` (plain values: saved with checkpoints).

    ``d_ff`` defaults to ``4 d_model``; ``max_len`` bounds learned positions only.
    """

    vocab_size: int
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int | None = None
    max_len: int = 1024
    positions: Positions = "rotary"
    attention: Attention = "favor"
    dropout: float = 0.0
    rotary_base: float = 10000.0

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"d_model ({self.d_model}) must be n_heads ({self.n_heads}) times an even "
                "head dimension"
            )
        if self.positions not in ("learned", "rotary"):
            raise ValueError(f"positions must be 'learned' or 'rotary', got {self.positions!r}")
        if self.attention not in ("favor", "exact"):
            raise ValueError(f"attention must be 'favor' or 'exact', got {self.attention!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def positions_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """``(N, L)`` position of each token inside its document (runs of equal ids)."""
    n, length = segment_ids.shape
    index = torch.arange(length, device=segment_ids.device).expand(n, length)
    start = torch.ones_like(segment_ids, dtype=torch.bool)
    start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(start, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding of ``x`` ``(N, H, L, d)`` at ``positions`` ``(N, L)``: the pairs
    ``(x_i, x_{i + d/2})`` rotated by ``position * base^(-2i/d)``. A rotation (norms are
    kept) with ``R_s q . R_t k`` a function of ``s - t``."""
    half = x.shape[-1] // 2
    freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float64) / half)
    angle = positions.to(torch.float64)[:, None, :, None] * freq  # (N, 1, L, half)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


class SelfAttention(nn.Module):
    """Multi-head self-attention, FAVOR (``features``) or exact (``features=None``).

    ``balance``: True uses favorcore's default (the matrix balance from each
    bidirectional call's tokens; causal calls take :attr:`statistics` when calibrated,
    else the map's causal form); False never balances (plain FAVOR+ as other libraries
    compute it).
    """

    projection: torch.Tensor | None

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        features: FeatureMap | None,
        balance: bool = True,
        rotary: bool = True,
        rotary_base: float = 10000.0,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.features, self.balance, self.chunk_size = features, balance, chunk_size
        self.rotary, self.rotary_base = rotary, rotary_base
        #: fixed statistics of causal calls (:meth:`PerformerLM.calibrate`), or None
        self.statistics: Balance | None = None
        self._calibrating = False
        matrix = None if features is None else features.feature_matrix(self.head_dim)
        self.register_buffer(
            "projection", None if matrix is None else torch.as_tensor(matrix), persistent=False
        )

    def _heads(
        self, x: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, length, _ = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (N, H, L, dh) each
        if self.rotary:
            q = apply_rotary(q, positions, self.rotary_base)
            k = apply_rotary(k, positions, self.rotary_base)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        *,
        causal: bool = False,
        key_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        state: AttentionState | None = None,
        return_state: bool = False,
    ) -> tuple[torch.Tensor, AttentionState | None]:
        """``x`` ``(N, L, E)``; ``key_mask`` ``(N, L)`` True = a real token."""
        q, k, v = self._heads(x, positions)
        if self.features is None:
            out = self._exact(q, k, v, causal, key_mask, segment_ids)
            new_state = None
        else:
            out, new_state = self._favor(q, k, v, causal, key_mask, segment_ids, state,
                                         return_state)  # fmt: skip
        return self.out(out.transpose(1, 2).flatten(-2)), new_state

    @staticmethod
    def _exact(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool,
        key_mask: torch.Tensor | None,
        segment_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        if key_mask is None and segment_ids is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        n, length = q.shape[0], q.shape[2]
        allowed = torch.ones(n, length, length, dtype=torch.bool, device=q.device)
        if key_mask is not None:
            allowed = allowed & key_mask[:, None, :]
        if segment_ids is not None:
            allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
        if causal:
            allowed = allowed & torch.ones_like(allowed[0]).tril()
        # every query keeps itself (padded queries would otherwise have no key: NaN)
        allowed = allowed | torch.eye(length, dtype=torch.bool, device=q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])

    def _favor(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool,
        key_mask: torch.Tensor | None,
        segment_ids: torch.Tensor | None,
        state: AttentionState | None,
        return_state: bool,
    ) -> tuple[torch.Tensor, AttentionState | None]:
        assert self.features is not None
        carried = causal or state is not None or return_state
        if self._calibrating and carried:
            self.statistics = pooled_statistics([(q, k, key_mask, key_mask, self.head_dim**-0.5)])
        features: FeatureMap = self.features
        balance: bool | Balance | None
        if not self.balance:
            balance, features = False, features.causal_form() if carried else features
        elif carried:
            balance = self.statistics
            if balance is None:
                features, balance = features.causal_form(), False
            else:
                balance = Balance(*(None if t is None else t.to(q) for t in balance))
        else:
            balance = None
        mask = None if key_mask is None else key_mask[:, None, :]
        kwargs: dict[str, Any] = {
            "features": features, "causal": causal, "key_mask": mask,
            "query_mask": None if causal else mask, "balance": balance,
            "projection": self.projection, "chunk_size": self.chunk_size,
            "state": state, "return_state": return_state, "check_finite": False,
        }  # fmt: skip
        if segment_ids is not None:
            kwargs["segment_ids"] = segment_ids[:, None, :]
        result = favorcore.favor_attention(q, k, v, **kwargs)
        if return_state:
            out, new_state = result
            return out, new_state
        assert isinstance(result, torch.Tensor)
        return result, None


class Block(nn.Module):
    """Pre-norm layer: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: PerformerConfig, features: FeatureMap | None, balance: bool) -> None:
        super().__init__()
        d_ff = 4 * cfg.d_model if cfg.d_ff is None else cfg.d_ff
        self.norm1, self.norm2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(
            cfg.d_model, cfg.n_heads, features=features, balance=balance,
            rotary=cfg.positions == "rotary", rotary_base=cfg.rotary_base,
        )  # fmt: skip
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, d_ff), nn.GELU(), nn.Linear(d_ff, cfg.d_model)
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, **kwargs: Any
    ) -> tuple[torch.Tensor, AttentionState | None]:
        a, state = self.attn(self.norm1(x), positions, **kwargs)
        x = x + self.drop(a)
        return x + self.drop(self.mlp(self.norm2(x))), state


def _layer_features(features: FeatureMap, layer: int) -> FeatureMap:
    """The map of one layer: ``features`` with a seed of its own (independent draws)."""
    assert features.seed is not None
    seed = int(np.random.SeedSequence([features.seed, layer]).generate_state(1)[0])
    return dataclasses.replace(features, seed=seed)


class PerformerLM(nn.Module):
    """A Transformer LM whose attention is FAVOR (``config.attention="favor"``) or exact.

    Parameters
    ----------
    config : PerformerConfig
    features : FeatureMap, optional
        FAVOR's feature map (each layer gets its own seed derived from the map's); by
        default ``OptimalPositiveFeatures(m=256, seed=0)``. Ignored by exact attention.
    balance : bool
        See :class:`SelfAttention`.

    ``forward(tokens, causal=...)`` returns logits of the MLM head (bidirectional) or of
    the next-token head (causal).
    """

    def __init__(
        self, config: PerformerConfig, *, features: FeatureMap | None = None, balance: bool = True
    ) -> None:
        super().__init__()
        self.config = config
        if config.attention == "favor":
            features = OptimalPositiveFeatures(m=256, seed=0) if features is None else features
        else:
            features = None
        self.features = features
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos = (
            nn.Embedding(config.max_len, config.d_model) if config.positions == "learned" else None
        )
        self.layers = nn.ModuleList(
            Block(config, None if features is None else _layer_features(features, i), balance)
            for i in range(config.n_layers)
        )
        self.norm = nn.LayerNorm(config.d_model)
        self.mlm_head = nn.Linear(config.d_model, config.vocab_size)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size)
        self.drop = nn.Dropout(config.dropout)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def attention_modules(self) -> list[SelfAttention]:
        return [m for m in self.modules() if isinstance(m, SelfAttention)]

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        causal: bool = False,
        key_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        offset: int = 0,
        states: list[AttentionState] | None = None,
        return_states: bool = False,
    ) -> Any:
        """Logits ``(N, L, vocab)`` of ``tokens`` ``(N, L)``.

        ``key_mask`` ``(N, L)``: True = a real token (padding False). ``segment_ids``
        ``(N, L)``: packed documents (non-decreasing ids). ``offset``: position of the first
        token (continuing a carried ``states``, one per layer). With ``return_states``,
        ``(logits, states)`` (FAVOR, causal only).
        """
        n, length = tokens.shape
        if segment_ids is not None:
            positions = positions_from_segments(segment_ids) + offset
        else:
            positions = (torch.arange(length, device=tokens.device) + offset).expand(n, length)
        x = self.embed(tokens)
        if self.pos is not None:
            if int(positions.max()) >= self.config.max_len:
                raise ValueError(
                    f"position {int(positions.max())} >= max_len={self.config.max_len}"
                )
            x = x + self.pos(positions)
        x = self.drop(x)
        new_states: list[AttentionState] = []
        for i, layer in enumerate(self.layers):
            x, st = layer(
                x, positions, causal=causal, key_mask=key_mask, segment_ids=segment_ids,
                state=None if states is None else states[i], return_state=return_states,
            )  # fmt: skip
            if st is not None:
                new_states.append(st)
        x = self.norm(x)
        logits = (self.lm_head if causal else self.mlm_head)(x)
        return (logits, new_states) if return_states else logits

    # -- causal statistics ------------------------------------------------------------------

    @torch.no_grad()
    def calibrate(
        self,
        tokens: torch.Tensor,
        *,
        key_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> None:
        """Fix every layer's causal statistics (balance, shift, FAVOR++'s ``A``) from a
        calibration batch: each layer's are computed from its rotated queries and keys
        (pooled over the batch's real tokens) and used from then on by its causal calls."""
        mods = self.attention_modules()
        for m in mods:
            m._calibrating = True
        try:
            self(tokens, causal=True, key_mask=key_mask, segment_ids=segment_ids)
        finally:
            for m in mods:
                m._calibrating = False

    @contextlib.contextmanager
    def calibrated(self, tokens: torch.Tensor, **kwargs: Any) -> Iterator[PerformerLM]:
        """:meth:`calibrate` inside a ``with`` block; the previous statistics come back after."""
        saved = [m.statistics for m in self.attention_modules()]
        try:
            self.calibrate(tokens, **kwargs)
            yield self
        finally:
            for m, s in zip(self.attention_modules(), saved, strict=True):
                m.statistics = s

    def favor_state(self) -> dict[str, Any]:
        """The causal statistics of every layer (tensors; None where not calibrated)."""
        return {
            str(i): None if m.statistics is None else list(m.statistics)
            for i, m in enumerate(self.attention_modules())
        }

    def load_favor_state(self, saved: dict[str, Any]) -> None:
        for i, m in enumerate(self.attention_modules()):
            s = saved.get(str(i))
            m.statistics = None if s is None else Balance(*s)

    # -- generation -------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        steps: int,
        *,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue ``prompt`` ``(N, L0)`` by ``steps`` tokens with the next-token head.

        FAVOR: the prompt is run once with ``return_states``; every later token is one call
        of length 1 carrying each layer's state (O(1) per token) at the tracked position.
        Exact attention recomputes the whole prefix. ``temperature=0`` is greedy.
        """
        tokens = prompt

        def pick(logits: torch.Tensor) -> torch.Tensor:
            if temperature <= 0:
                return logits.argmax(-1, keepdim=True)
            probs = torch.softmax(logits / temperature, dim=-1)
            return torch.multinomial(probs, 1, generator=generator)

        if self.features is None:
            for _ in range(steps):
                nxt = pick(self(tokens, causal=True)[:, -1])
                tokens = torch.cat([tokens, nxt], dim=1)
            return tokens
        logits, states = self(prompt, causal=True, return_states=True)
        for _ in range(steps):
            nxt = pick(logits[:, -1])
            offset = tokens.shape[1]
            tokens = torch.cat([tokens, nxt], dim=1)
            logits, states = self(
                nxt, causal=True, offset=offset, states=states, return_states=True
            )
        return tokens


def exact_to_favor(
    model: PerformerLM, *, features: FeatureMap | None = None, balance: bool = True
) -> PerformerLM:
    """A FAVOR copy of ``model`` (exact or FAVOR) with its weights, loaded ``strict=True``."""
    cfg = dataclasses.replace(model.config, attention="favor")
    new = PerformerLM(cfg, features=features, balance=balance)
    ref = next(model.parameters())
    new.to(device=ref.device, dtype=ref.dtype)
    new.load_state_dict(model.state_dict(), strict=True)
    new.train(model.training)
    return new
