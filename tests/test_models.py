"""favorcore_backends.models: the Performer LM (FAVOR or exact attention), tiny sizes."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="the Performer model needs torch")
models = pytest.importorskip("favorcore_backends.models")

import favorcore as fc

V = 11


def _model(attention="favor", positions="rotary", features=None, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = models.PerformerConfig(
        vocab_size=V, d_model=16, n_heads=2, n_layers=2, max_len=64, positions=positions,
        attention=attention,
    )  # fmt: skip
    if features is None and attention == "favor":
        features = fc.OptimalPositiveFeatures(m=32, seed=3)
    return models.PerformerLM(cfg, features=features, **kw).double().eval()


def _tokens(n=2, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (n, length), generator=g)


@pytest.mark.parametrize("attention", ["favor", "exact"])
@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_greedy_generate_equals_causal_argmax(attention, positions):
    model = _model(attention, positions)
    prompt = _tokens(2, 5)
    if attention == "favor":
        model.calibrate(_tokens(3, 16, seed=1))  # fixed statistics for causal calls
    out = model.generate(prompt, 9)
    assert out.shape == (2, 14)
    assert torch.equal(out[:, :5], prompt)
    full = model(out, causal=True).argmax(-1)
    assert torch.equal(full[:, 4:-1], out[:, 5:])


def test_generate_uncalibrated_causal_form():
    model = _model()  # no statistics: causal calls run the map's causal form
    out = model.generate(_tokens(1, 3), 6)
    assert torch.equal(model(out, causal=True).argmax(-1)[:, 2:-1], out[:, 3:])


def test_carried_states_equal_full_call():
    model = _model()
    model.calibrate(_tokens(2, 16, seed=2))
    x = _tokens(2, 10)
    full = model(x, causal=True)
    a, states = model(x[:, :6], causal=True, return_states=True)
    b, _ = model(x[:, 6:], causal=True, offset=6, states=states, return_states=True)
    torch.testing.assert_close(torch.cat([a, b], 1), full)


@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_exact_checkpoint_loads_strict(positions):
    exact = _model("exact", positions, seed=5)
    favor = _model("favor", positions, seed=6)
    state = exact.state_dict()
    assert not any("projection" in name for name in state)
    favor.load_state_dict(state, strict=True)
    exact.load_state_dict(favor.state_dict(), strict=True)
    for a, b in zip(exact.parameters(), favor.parameters(), strict=True):
        assert torch.equal(a, b)
    # the projections survive (rebuilt from the map, not from the checkpoint)
    assert all(m.projection is not None for m in favor.attention_modules())
    converted = models.exact_to_favor(exact, features=fc.OptimalPositiveFeatures(m=256, seed=1))
    x = _tokens(2, 12)
    ref, approx = exact(x), converted(x)
    # near-zero weights: small logits, so FAVOR is close to exact attention
    torch.testing.assert_close(approx, ref, atol=1e-3, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_favor_attention_close_to_exact(causal):
    torch.manual_seed(0)
    fmap = fc.OptimalPositiveFeatures(m=1024, seed=0)
    exact = models.SelfAttention(16, 2, features=None).double()
    favor = models.SelfAttention(16, 2, features=fmap).double()
    favor.load_state_dict(exact.state_dict(), strict=True)
    x = torch.randn(2, 20, 16, dtype=torch.float64)
    pos = torch.arange(20).expand(2, 20)
    if causal:
        favor.statistics = None
        favor._calibrating = True
    with torch.no_grad():
        ref, _ = exact(x, pos, causal=causal)
        out, _ = favor(x, pos, causal=causal)
        uniform = exact.out(exact.qkv(x)[..., 32:].mean(1, keepdim=True)).expand_as(ref)
    err = float((out - ref).norm() / (uniform - ref).norm())
    assert err < 0.25


def test_rotary_is_a_rotation():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 8, 6, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 8, 6, generator=g, dtype=torch.float64)
    pos = torch.arange(8)[None]
    rq = models.apply_rotary(q, pos)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    # the same vectors at positions (i, j) and (i + s, j + s): equal dot products
    same_q, same_k = q[..., :1, :].expand_as(q), k[..., :1, :].expand_as(k)
    a = models.apply_rotary(same_q, pos) @ models.apply_rotary(same_k, pos).transpose(-1, -2)
    for s in range(1, 8):
        for t in range(8 - s):
            torch.testing.assert_close(a[..., t + s, t], a[..., s, 0])
            torch.testing.assert_close(a[..., t, t + s], a[..., 0, s])


def test_positions_from_segments():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    expected = [[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 3, 4]]
    assert models.positions_from_segments(ids).tolist() == expected


@pytest.mark.parametrize("attention", ["favor", "exact"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_packed_batch_equals_separate_calls(attention, causal, positions):
    model = _model(attention, positions)
    if attention == "favor" and causal:
        model.calibrate(_tokens(2, 16, seed=4))
    docs = [_tokens(1, n, seed=n) for n in (5, 3, 7)]
    packed = torch.cat(docs, dim=1)
    ids = torch.cat([torch.full((1, d.shape[1]), i) for i, d in enumerate(docs)], dim=1)
    out = model(packed, causal=causal, segment_ids=ids)
    separate = torch.cat([model(d, causal=causal) for d in docs], dim=1)
    torch.testing.assert_close(out, separate)


@pytest.mark.parametrize("attention", ["favor", "exact"])
def test_padding_leaves_real_tokens(attention):
    model = _model(attention)
    x = _tokens(1, 7)
    padded = torch.cat([x, torch.zeros(1, 3, dtype=x.dtype)], dim=1)
    mask = torch.arange(10)[None] < 7
    torch.testing.assert_close(model(padded, key_mask=mask)[:, :7], model(x))


def test_trains_and_backward():
    model = _model(balance=False).train()
    x = _tokens(2, 12)
    loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
    loss.backward()
    for name, p in model.named_parameters():  # the next-token head is not in an MLM call
        assert (p.grad is None) == name.startswith("lm_head."), name
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    causal = _model(balance=True).train()
    causal.calibrate(_tokens(2, 12, seed=9))
    causal(x, causal=True).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in causal.layers.parameters())


def test_config_checks():
    with pytest.raises(ValueError, match="even"):
        models.PerformerConfig(vocab_size=5, d_model=12, n_heads=4)
    with pytest.raises(ValueError, match="attention"):
        models.PerformerConfig(vocab_size=5, attention="linear")
