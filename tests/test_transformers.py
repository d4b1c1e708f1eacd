"""Hugging Face ``transformers`` registration: padding honoured, causality kept."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ftrans = pytest.importorskip("favorcore_backends.transformers")

import favorcore as fc

NAME = ftrans.register_transformers("favor_test", features=fc.PositiveFeatures(m=512, seed=0))


def _bert(impl: str):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation=impl,
    )  # fmt: skip
    return transformers.BertModel(config).eval()


def _llama(impl: str):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attn_implementation=impl,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def test_bert_with_favor_ignores_padding_and_approximates_sdpa() -> None:
    favor, sdpa = _bert(NAME), _bert("sdpa")
    ids = torch.randint(0, 64, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    with torch.no_grad():
        out = favor(input_ids=ids, attention_mask=mask).last_hidden_state
        other = ids.clone()
        other[1, 8:] = (other[1, 8:] + 7) % 64  # change only the padding
        out2 = favor(input_ids=other, attention_mask=mask).last_hidden_state
        exact = sdpa(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out2[1, :8], out[1, :8], rtol=1e-5, atol=1e-5)
    valid = mask.bool()
    err = (out - exact)[valid].norm() / exact[valid].norm()
    # FAVOR ran (not sdpa), with the same weights: the random init's tiny weights make
    # attention nearly uniform, so the estimate is very close
    assert 1e-6 < err < 0.05, err


def test_llama_with_favor_is_causal_and_honours_padding() -> None:
    favor, sdpa = _llama(NAME), _llama("sdpa")
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        logits = favor(input_ids=ids).logits
        later = ids.clone()
        later[:, 6:] = (later[:, 6:] + 5) % 64  # change the future only
        logits2 = favor(input_ids=later).logits
        exact = sdpa(input_ids=ids).logits
    torch.testing.assert_close(logits2[:, :6], logits[:, :6], rtol=1e-5, atol=1e-5)
    assert 1e-4 < (logits - exact).norm() / exact.norm() < 0.05
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    with torch.no_grad():
        a = favor(input_ids=ids, attention_mask=mask).logits
        changed = ids.clone()
        changed[0, :3] = (changed[0, :3] + 9) % 64
        b = favor(input_ids=changed, attention_mask=mask).logits
    torch.testing.assert_close(a[0, 3:], b[0, 3:], rtol=1e-5, atol=1e-5)


def test_unregistered_mask_is_refused() -> None:
    attention = transformers.AttentionInterface._global_mapping[NAME]
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="needs its own mask function"):
        attention(torch.nn.Module(), q, q, q, torch.zeros(1, 1, 4, 4))


def test_calibrated_statistics_keep_a_causal_model_causal_and_close() -> None:
    # transformers_statistics pools each layer's q/k over a calibration batch; the default
    # map (FAVOR++) then takes its balance, shift and A from them in causal layers.
    name = ftrans.register_transformers("favor_test_default")
    favor, sdpa = _llama(name), _llama("sdpa")
    calib = {"input_ids": torch.randint(0, 64, (4, 16))}
    stats = ftrans.transformers_statistics(sdpa, [calib])
    assert sorted(stats) == [0, 1]
    assert stats[0].query.shape == (1, 2, 8, 8)  # one per key head (2, for 4 query heads)
    calibrated = ftrans.register_transformers("favor_test_calibrated", statistics=stats)
    favor.set_attn_implementation(calibrated)
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        logits = favor(input_ids=ids).logits
        later = ids.clone()
        later[:, 6:] = (later[:, 6:] + 5) % 64
        torch.testing.assert_close(favor(input_ids=later).logits[:, :6], logits[:, :6])
        exact = sdpa(input_ids=ids).logits
    assert 1e-6 < (logits - exact).norm() / exact.norm() < 0.05
    assert sdpa.config._attn_implementation == "sdpa"  # restored after the recording run


def test_other_mask_patterns_are_refused() -> None:
    # a composed pattern is checked against packed sequences: without restarting position
    # ids, or when it is not "same document", it is refused
    mask = ftrans._hf_mask(1, 4, 4, mask_function=lambda b, h, q, k: q == k)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="FAVOR attention honours causal or full attention"):
        ftrans._hf_call_mask("x", module, mask, None)
    with pytest.raises(ValueError, match="FAVOR attention honours causal or full attention"):
        ftrans._hf_call_mask("x", module, mask, torch.tensor([[0, 1, 0, 1]]))
    with pytest.raises(ValueError, match="sliding-window"):
        ftrans._hf_mask(1, 4, 4, local_size=2)


def test_llama_packed_sequences_and_grouped_key_heads() -> None:
    # Two documents packed in one row (position ids that restart, as a flattening data
    # collator makes them): each is its own sequence; the key heads (2 of them, for 4
    # query heads) are computed once each, not repeated.
    favor = _llama(NAME)
    ids = torch.randint(0, 64, (1, 14))
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6, 7]])
    with torch.no_grad():  # (packing is read without a cache, as in training)
        packed = favor(input_ids=ids, position_ids=pos, use_cache=False).logits
        first = favor(input_ids=ids[:, :6]).logits
        second = favor(input_ids=ids[:, 6:]).logits
    torch.testing.assert_close(packed[:, :6], first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[:, 6:], second, rtol=1e-5, atol=1e-5)


def test_attention_dropout_in_training_is_refused() -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, attention_probs_dropout_prob=0.1, attn_implementation=NAME,
    )  # fmt: skip
    model = transformers.BertModel(config).train()
    with pytest.raises(ValueError, match="attention dropout"):
        model(input_ids=torch.randint(0, 64, (1, 8)))
    model.eval()  # (no dropout at evaluation)
    model(input_ids=torch.randint(0, 64, (1, 8)))
