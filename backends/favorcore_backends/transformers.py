"""Hugging Face ``transformers``: FAVOR attention as an attention implementation.

:func:`register_transformers` registers an attention function with ``AttentionInterface``
and a mask function with ``AttentionMaskInterface``; load a model with
``attn_implementation=name`` (or call ``model.set_attn_implementation(name)``). Padding
and causality are honoured, any other mask pattern is refused, and every layer draws its
own features. :func:`transformers_statistics` records a model's queries and keys on
calibration batches and pools them into the per-layer statistics that causal layers need.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

import favorcore
from favorcore import Balance, BalanceKind, FeatureMap, OptimalPositiveFeatures

from ._heads import Call, pooled_statistics
from ._torch_steps import no_autocast

__all__ = ["register_transformers", "transformers_statistics"]


def register_transformers(
    name: str = "favor",
    *,
    features: FeatureMap | None = None,
    chunk_size: int | None = None,
    balance: bool | BalanceKind | None = None,
    statistics: Mapping[int, Balance] | None = None,
) -> str:
    """Register FAVOR attention with Hugging Face ``transformers`` under ``name``.

    Registers an attention function with ``AttentionInterface`` and a mask function with
    ``AttentionMaskInterface`` (without it, ``transformers`` would hand over no usable
    padding mask and padding would be silently ignored). The mask function gives the
    attention function the key-padding mask and whether attention is causal; any other
    mask (sliding windows, arbitrary patterns) raises. Load a model with
    ``attn_implementation=name``, or call ``model.set_attn_implementation(name)``.

    Parameters
    ----------
    name : str
        The implementation's name.
    features : FeatureMap, optional
        The map; every layer (``module.layer_idx``) gets its own independent draw of it.
        By default FAVOR++ with ``m = 256`` (the estimator the evidence in the docs
        chose); causal layers without ``statistics`` then use ``A = 0`` (antithetic
        FAVOR+), since they cannot take ``A`` from their own tokens.
    chunk_size : int, optional
        Chunk length of causal attention.
    balance : bool, {"matrix", "scalar"}, optional
        The exact balance and key shift (:mod:`favorcore.balance`) in bidirectional
        layers, from each call's real tokens (default: the matrix balance for the
        positive maps).
    statistics : mapping of int to Balance, optional
        Fixed statistics per layer index (:func:`transformers_statistics` of a
        calibration batch): used by every layer they cover, causal ones included, where
        they also fix FAVOR++'s ``A``.

    Returns
    -------
    str
        ``name``.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    fmap: FeatureMap = OptimalPositiveFeatures(m=256) if features is None else features
    maps: dict[tuple[int, bool], FeatureMap] = {}
    given = dict(statistics or {})

    def layer_map(layer: int, causal_plain: bool) -> FeatureMap:
        if (layer, causal_plain) not in maps:
            base = fmap.causal_form() if causal_plain else fmap
            seed = int(np.random.SeedSequence([fmap.seed or 0, layer]).generate_state(1)[0])
            maps[layer, causal_plain] = dataclasses.replace(base, seed=seed)
        return maps[layer, causal_plain]

    AttentionMaskInterface.register(name, _hf_mask)

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                  **kwargs: Any) -> tuple[torch.Tensor, None]:  # fmt: skip
        if dropout:
            raise ValueError(
                f"attention dropout ({dropout}): FAVOR attention never forms the attention "
                "weights it would drop; train with attention dropout 0 (e.g. "
                "attention_probs_dropout_prob=0.0 or attention_dropout=0.0 in the config)"
            )
        gqa = query.shape[1] != key.shape[1]  # grouped key heads: computed once each
        causal, key_mask, ids = _hf_call_mask(
            name, module, attention_mask, kwargs.get("position_ids")
        )
        packed = None if ids is None else ids[:, None, :]
        layer = int(getattr(module, "layer_idx", 0) or 0)
        stats = given.get(layer)
        with no_autocast(query.device):
            km = None if key_mask is None else key_mask[:, None, :]
            if causal and query.shape[2] == key.shape[2]:
                result = favorcore.favor_attention(
                    query, key, value, features=layer_map(layer, stats is None), causal=True,
                    key_mask=km, scale=scaling, chunk_size=chunk_size, check_finite=False,
                    balance=stats, enable_gqa=gqa, segment_ids=packed,
                )  # fmt: skip
            elif causal:
                raise ValueError(
                    "causal attention with a key/value cache is not supported by this registration"
                )
            else:
                qm = km if query.shape[2] == key.shape[2] else None  # self-attention
                result = favorcore.favor_attention(
                    query, key, value, features=layer_map(layer, False), key_mask=km,
                    query_mask=qm, scale=scaling, check_finite=False,
                    balance=balance if stats is None else stats, enable_gqa=gqa,
                    segment_ids=packed,
                )  # fmt: skip
            assert isinstance(result, torch.Tensor)
            out = result
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(name, attention)
    return name


def transformers_statistics(model: Any, batches: Iterable[Mapping[str, Any]]) -> dict[int, Balance]:
    """Per-layer :class:`~favorcore.Balance` statistics of a ``transformers`` model.

    Runs ``model`` on each batch of keyword inputs (``input_ids``, ``attention_mask``,
    ...) with exact attention, records every layer's queries and keys, and pools them
    per head over all real tokens of all batches. The result, passed to
    :func:`register_transformers` as ``statistics``, fixes the balance, the key shift and
    FAVOR++'s ``A`` of each layer: what causal layers need, since they cannot take
    statistics from their own (future) tokens.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    name = "favorcore_statistics"
    seen: dict[int, list[Call]] = {}

    def record(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
               **kwargs: Any) -> tuple[torch.Tensor, None]:  # fmt: skip
        causal, key_mask, ids = _hf_call_mask(
            name, module, attention_mask, kwargs.get("position_ids")
        )
        if ids is not None:
            raise ValueError("transformers_statistics: calibrate on unpacked batches")
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        layer = int(getattr(module, "layer_idx", 0) or 0)
        b, h, lq, d = query.shape
        group = h // key.shape[1]  # grouped key heads: statistics pooled over their queries
        pooled = query.detach().reshape(b, h // group, group * lq, d)
        own = key_mask if lq == key.shape[2] else None  # self-attention: padded queries too
        queries = None if own is None else own.repeat(1, group)
        seen.setdefault(layer, []).append((pooled, key.detach(), key_mask, queries, scale))
        key, value = _repeat_kv(query, key, value)
        km = None if key_mask is None else key_mask[:, None, :]
        out = favorcore.softmax_attention(query, key, value, causal=causal, key_mask=km,
                                          scale=scale, check_finite=False)  # fmt: skip
        return out.transpose(1, 2).contiguous(), None

    AttentionMaskInterface.register(name, _hf_mask)
    AttentionInterface.register(name, record)
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
    finally:
        model.set_attn_implementation(before)
    return {layer: pooled_statistics(calls) for layer, calls in seen.items()}


def _repeat_kv(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query attention: repeat the key/value heads to the query heads."""
    if query.shape[1] != key.shape[1]:
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    return key, value


_REFUSED = (
    "attention mask: FAVOR attention honours causal or full attention plus padding, and "
    "packed sequences (position ids that restart); this model asked for another pattern"
)


def _hf_call_mask(
    name: str, module: nn.Module, attention_mask: Any, position_ids: Any = None
) -> tuple[bool, torch.Tensor | None, torch.Tensor | None]:
    """``(causal, key_mask, segment_ids)`` from what the registered mask function handed
    over (and, for packed sequences, the position ids that restart)."""
    if attention_mask is None:
        return bool(getattr(module, "is_causal", False)), None, None
    if not isinstance(attention_mask, _HFMask):
        raise ValueError(  # noqa: TRY004 (a value the model made without the mask function)
            f"attention_mask: the {name!r} attention needs its own mask function; "
            f"call register_transformers({name!r}) before the model runs"
        )
    if attention_mask.pattern is None:
        return attention_mask.causal, attention_mask.key_mask, None
    # a composed pattern: packed sequences if the position ids restart and the pattern is
    # exactly "same document (and, causal, not later)" on a sample of pairs
    causal = bool(getattr(module, "is_causal", False))
    ids = _packed_ids(position_ids)
    if ids is None or not _is_packed(attention_mask.pattern, ids, causal):
        raise ValueError(f"{_REFUSED} ({getattr(attention_mask.pattern, '__qualname__', '?')})")
    return causal, attention_mask.key_mask, ids


def _packed_ids(position_ids: Any) -> torch.Tensor | None:
    """``(batch, L)`` document ids where the position ids restart, or None (no restart)."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2:
        return None
    restart = torch.ones_like(position_ids, dtype=torch.long)
    restart[:, 1:] = (position_ids[:, 1:] - position_ids[:, :-1] != 1).long()
    ids = restart.cumsum(-1)
    return ids if bool((ids[:, -1] > 1).any()) else None


def _is_packed(pattern: Any, ids: torch.Tensor, causal: bool, samples: int = 512) -> bool:
    """Whether ``pattern(b, h, i, j)`` is "``i`` and ``j`` in one document (``j <= i``)" on
    every pair around the documents' boundaries and on ``samples`` random pairs."""
    batch, length = ids.shape
    gen = torch.Generator().manual_seed(0)
    b = torch.randint(batch, (samples,), generator=gen)
    i, j = (torch.randint(length, (samples,), generator=gen) for _ in range(2))
    starts = torch.nonzero(ids[:, 1:] != ids[:, :-1])
    near = [(int(r), int(t) + 1 + di, int(t) + 1 + dj) for r, t in starts[:32]
            for di in (-1, 0) for dj in (-1, 0)]  # fmt: skip
    pairs = [*zip(b.tolist(), i.tolist(), j.tolist(), strict=True), *near]
    for r, a, c in pairs:
        want = bool(ids[r, a] == ids[r, c]) and (c <= a or not causal)
        got = pattern(torch.tensor(r), torch.tensor(0), torch.tensor(a), torch.tensor(c))
        if bool(got) != want:
            return False
    return True


@dataclasses.dataclass(frozen=True)
class _HFMask:
    """What the registered mask function hands to the registered attention function."""

    causal: bool
    key_mask: torch.Tensor | None  # (batch, kv_length) bool, True = attend
    pattern: Any = None  # a composed mask function, checked against packed sequences


def _hf_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    **kwargs: Any,
) -> _HFMask:
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

    if local_size is not None:
        raise ValueError("sliding-window attention cannot be honoured by FAVOR attention")
    key_mask = None
    if attention_mask is not None:
        key_mask = attention_mask[:, kv_offset : kv_offset + kv_length].to(torch.bool)
    if mask_function is causal_mask_function:
        return _HFMask(True, key_mask)
    if mask_function is bidirectional_mask_function or mask_function is None:
        return _HFMask(False, key_mask)
    if q_offset or kv_offset or q_length != kv_length:  # (packed sequences have neither)
        raise ValueError(f"{_REFUSED} ({getattr(mask_function, '__qualname__', mask_function)})")
    return _HFMask(False, key_mask, mask_function)  # or/and compositions: decided per call
