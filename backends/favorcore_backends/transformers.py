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
        key, value = _repeat_kv(query, key, value)
        causal, key_mask = _hf_call_mask(name, module, attention_mask)
        layer = int(getattr(module, "layer_idx", 0) or 0)
        stats = given.get(layer)
        with torch.autocast(device_type=query.device.type, enabled=False):
            km = None if key_mask is None else key_mask[:, None, :]
            if causal and query.shape[2] == key.shape[2]:
                result = favorcore.favor_attention(
                    query, key, value, features=layer_map(layer, stats is None), causal=True,
                    key_mask=km, scale=scaling, chunk_size=chunk_size, check_finite=False,
                    balance=stats,
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
                    balance=balance if stats is None else stats,
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
        key, value = _repeat_kv(query, key, value)
        causal, key_mask = _hf_call_mask(name, module, attention_mask)
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        layer = int(getattr(module, "layer_idx", 0) or 0)
        seen.setdefault(layer, []).append((query.detach(), key.detach(), key_mask, scale))
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


def _hf_call_mask(
    name: str, module: nn.Module, attention_mask: Any
) -> tuple[bool, torch.Tensor | None]:
    """``(causal, key_mask)`` from what the registered mask function handed over."""
    if isinstance(attention_mask, _HFMask):
        return attention_mask.causal, attention_mask.key_mask
    if attention_mask is not None:
        raise ValueError(
            f"attention_mask: the {name!r} attention needs its own mask function; "
            f"call register_transformers({name!r}) before the model runs"
        )
    return bool(getattr(module, "is_causal", False)), None


@dataclasses.dataclass(frozen=True)
class _HFMask:
    """What the registered mask function hands to the registered attention function."""

    causal: bool
    key_mask: torch.Tensor | None  # (batch, kv_length) bool, True = attend


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
    if mask_function is causal_mask_function:
        causal = True
    elif mask_function is bidirectional_mask_function or mask_function is None:
        causal = False
    else:  # or/and compositions, packed sequences, block overlays
        raise ValueError(
            "attention mask: FAVOR attention honours causal or full attention plus padding; "
            f"this model asked for another pattern ({getattr(mask_function, '__name__', mask_function)})"
        )
    key_mask = None
    if attention_mask is not None:
        key_mask = attention_mask[:, kv_offset : kv_offset + kv_length].to(torch.bool)
    return _HFMask(causal, key_mask)
