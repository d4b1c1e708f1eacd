"""A Hugging Face BERT masked LM with :class:`~favorcore_backends.models.PerformerLM`'s
calling convention, so ``favorcore protein --model bert`` trains, evaluates and converts it
with the same loop.

The model is ``transformers.BertForMaskedLM`` built from a config (nothing is downloaded):
post-norm layers, learned absolute positions, attention dropout 0 (FAVOR attention never
forms the weights dropout would act on). Its attention is SDPA (``attention="exact"``) or
favorcore's registration with Hugging Face (:func:`favorcore_backends.transformers.
register_transformers`); :func:`bert_to_favor` moves a trained model's weights into a copy
that attends through favorcore, which is the conversion the Performer papers report.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from favorcore import FeatureMap

__all__ = ["BertConfigSpec", "BertMLM", "bert_to_favor"]


@dataclass(frozen=True)
class BertConfigSpec:
    """The sizes of :class:`BertMLM` (what a checkpoint records)."""

    vocab_size: int
    pad_token_id: int
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int | None = None
    max_len: int = 512
    dropout: float = 0.0
    kind: str = "bert"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class BertMLM(nn.Module):
    """``transformers.BertForMaskedLM`` called as ``model(tokens, key_mask=...)``.

    Parameters
    ----------
    config : BertConfigSpec
        Sizes; ``d_ff`` defaults to ``4 * d_model``.
    attention : str
        ``"sdpa"`` (exact) or the name of a favorcore registration.
    """

    features: FeatureMap | None = None

    def __init__(self, config: BertConfigSpec, attention: str = "sdpa") -> None:
        super().__init__()
        try:
            import transformers
        except ModuleNotFoundError:
            raise SystemExit(
                "--model bert needs Hugging Face transformers: "
                "pip install '.[protein,transformers]' (from a clone of favorcore)"
            ) from None
        self.config = config
        hf = transformers.BertConfig(  # type: ignore[call-arg,unused-ignore]
            vocab_size=config.vocab_size, hidden_size=config.d_model,
            num_attention_heads=config.n_heads, num_hidden_layers=config.n_layers,
            intermediate_size=config.d_ff or 4 * config.d_model,
            max_position_embeddings=config.max_len, type_vocab_size=1,
            pad_token_id=config.pad_token_id, hidden_dropout_prob=config.dropout,
            attention_probs_dropout_prob=0.0, attn_implementation=attention,
        )  # fmt: skip
        self.bert = transformers.BertForMaskedLM(hf)

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        causal: bool = False,
        key_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(batch, L, vocab)`` of a masked-LM call (``causal`` and packed
        ``segment_ids`` are refused: BERT is bidirectional, its positions absolute)."""
        if causal:
            raise ValueError("--model bert is a masked LM: use --mode mlm")
        if segment_ids is not None:
            raise ValueError("--model bert takes single proteins: drop --concat")
        mask = None if key_mask is None else key_mask.long()
        return self.bert(input_ids=tokens, attention_mask=mask).logits  # type: ignore[no-any-return]

    def favor_state(self) -> dict[str, Any]:
        """Nothing beyond the weights (PerformerLM's checkpoint interface)."""
        return {}

    def load_favor_state(self, saved: dict[str, Any]) -> None:
        """PerformerLM's checkpoint interface; ``saved`` is empty."""


def bert_to_favor(model: BertMLM, *, features: FeatureMap | None = None,
                  balance: bool = True) -> BertMLM:  # fmt: skip
    """A copy of ``model`` with its weights whose attention is favorcore's ``features``
    (each layer its own draw) with or without the exact balance."""
    from favorcore_backends.transformers import register_transformers

    # one name per estimator (registering it again replaces it): conversions add no entries
    key = "default" if features is None else f"{features!r}"
    name = register_transformers(
        f"favorcore_protein[{key}, balance={balance}]", features=features, balance=balance
    )
    new = copy.deepcopy(model)
    new.bert.set_attn_implementation(name)
    return new
