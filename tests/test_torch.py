"""The PyTorch adapter: the module's idioms (the conformance matrix covers the math)."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ftorch = pytest.importorskip("favorcore_backends.torch")

import favorcore as fc

FMAP = fc.PositiveFeatures(m=64, seed=0)


def _module(**kw):
    kw.setdefault("features", FMAP)
    return ftorch.FavorAttention(32, 4, batch_first=True, dtype=torch.float64, **kw)


def _reference(mod, x, *, causal=False, key_mask=None, features=None, balance=None):
    """The module's computation written out: projections, core attention, output."""
    w = mod.q_proj_weight, mod.k_proj_weight, mod.v_proj_weight
    b = mod.in_proj_bias.chunk(3)
    q, k, v = (torch.nn.functional.linear(x, wi, bi) for wi, bi in zip(w, b, strict=True))
    q, k, v = (t.unflatten(-1, (4, 8)).transpose(1, 2) for t in (q, k, v))
    out = fc.favor_attention(
        q, k, v, features=features or mod.features, causal=causal, key_mask=key_mask,
        balance=balance,
    )  # fmt: skip
    return mod.out_proj(out.transpose(1, 2).flatten(-2))


def test_default_module_and_calibrated_statistics() -> None:
    # The default map is FAVOR++ with per-call statistics in bidirectional calls; causal
    # calls use A = 0 without statistics, and the calibrated ones (balance, shift, A per
    # head) once calibrate() has run -- still causal.
    torch.manual_seed(0)
    mod = ftorch.FavorAttention(32, 4, batch_first=True, dtype=torch.float64)
    assert isinstance(mod.features, fc.OptimalPositiveFeatures)
    assert mod.features.a is None
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    torch.testing.assert_close(mod(x, x, x)[0], _reference(mod, x), rtol=1e-12, atol=1e-12)
    plain = fc.OptimalPositiveFeatures(m=256, a=0.0, seed=mod.features.seed)
    torch.testing.assert_close(
        mod(x, x, x, is_causal=True)[0], _reference(mod, x, causal=True, features=plain),
        rtol=1e-12, atol=1e-12,
    )  # fmt: skip
    calib = torch.randn(4, 30, 32, dtype=torch.float64)
    stats = mod.calibrate(calib, calib)
    assert stats.query.shape == (1, 4, 8, 8)
    assert stats.spread.shape == (1, 4, 1, 1)
    out = mod(x, x, x, is_causal=True)[0]
    torch.testing.assert_close(
        out, _reference(mod, x, causal=True, balance=stats), rtol=1e-12, atol=1e-12
    )
    later = x.clone()
    later[:, 12:] = 10.0
    torch.testing.assert_close(mod(later, later, later, is_causal=True)[0][:, :12], out[:, :12])
    # the same statistics as the core's pooled over the calibration tokens
    w, b = mod.q_proj_weight, mod.in_proj_bias.chunk(3)
    q = torch.nn.functional.linear(calib, w, b[0]).unflatten(-1, (4, 8)).transpose(1, 2)
    k = torch.nn.functional.linear(calib, mod.k_proj_weight, b[1]).unflatten(-1, (4, 8))
    k = k.transpose(1, 2)
    pooled = fc.balance_statistics(
        q.transpose(0, 1).reshape(1, 4, 120, 8), k.transpose(0, 1).reshape(1, 4, 120, 8)
    )
    for got, want in zip(stats, pooled, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_module_is_the_core_computation(causal: bool) -> None:
    torch.manual_seed(0)
    mod = _module()
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    out, weights = mod(x, x, x, is_causal=causal)
    assert weights is None
    torch.testing.assert_close(out, _reference(mod, x, causal=causal), rtol=1e-12, atol=1e-12)


def test_sequence_first_and_unbatched_layouts() -> None:
    torch.manual_seed(0)
    mod = _module()
    seq_first = copy.deepcopy(mod)
    seq_first.batch_first = False
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    want = mod(x, x, x)[0]
    torch.testing.assert_close(
        seq_first(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1))[0].transpose(0, 1), want
    )
    torch.testing.assert_close(mod(x[0], x[0], x[0])[0], want[0])


def test_key_padding_mask_bool_and_float_ignore_padding_garbage() -> None:
    torch.manual_seed(0)
    mod = _module()
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[0, 7:] = True
    dirty = x.clone()
    dirty[0, 7:] = float("nan")
    got_bool = mod(x, dirty, dirty, key_padding_mask=pad)[0]
    float_mask = torch.zeros(2, 10, dtype=torch.float64).masked_fill(pad, float("-inf"))
    got_float = mod(x, dirty, dirty, key_padding_mask=float_mask)[0]
    want = _reference(mod, x, key_mask=~pad[:, None, :])
    torch.testing.assert_close(got_bool, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_float, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="only 0 \\(attend\\) and -inf"):
        mod(x, x, x, key_padding_mask=float_mask + 0.5)
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        mod(x, x, x, key_padding_mask=pad[:, :5])


def test_causal_attn_mask_is_honoured_and_others_raise() -> None:
    torch.manual_seed(0)
    mod = _module()
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    want = mod(x, x, x, is_causal=True)[0]
    float_mask = torch.nn.Transformer.generate_square_subsequent_mask(12, dtype=torch.float64)
    torch.testing.assert_close(mod(x, x, x, attn_mask=float_mask)[0], want)
    torch.testing.assert_close(mod(x, x, x, attn_mask=float_mask.isinf())[0], want)
    torch.testing.assert_close(mod(x, x, x, attn_mask=float_mask, is_causal=True)[0], want)
    with pytest.raises(ValueError, match="can honour only the causal mask"):
        mod(x, x, x, attn_mask=torch.zeros(12, 12, dtype=torch.bool).fill_diagonal_(True))
    with pytest.raises(ValueError, match="need_weights=True: FAVOR attention never forms"):
        mod(x, x, x, need_weights=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dropout": 0.1}, "attention-weight dropout has no counterpart"),
        ({"add_bias_kv": True}, "add_bias_kv and add_zero_attn are not supported"),
        ({"redraw_interval": 0}, "redraw_interval must be a positive integer"),
    ],
)
def test_constructor_rejects_what_linear_attention_cannot_honour(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        _module(**kwargs)
    with pytest.raises(ValueError, match="embed_dim must be a positive multiple of num_heads"):
        ftorch.FavorAttention(30, 4)


@pytest.mark.parametrize(
    ("causal", "masked"), [(False, False), (False, True), (True, False), (True, True)]
)
def test_gradcheck_float64(causal: bool, masked: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 7, 4, dtype=torch.float64, generator=gen, requires_grad=True)
        for _ in range(3)
    )
    mask = torch.rand(2, 7, generator=gen) < 0.7 if masked else None
    if mask is not None:
        mask[:, 0] = True
    fmap = fc.hyperbolic_features(8, seed=1)
    # bidirectional calls balance by default with statistics held constant for autograd:
    # their gradient is that of the call with those statistics given (checked below)
    stats = fc.balance_statistics(q, k, key_mask=mask)

    def f(q, k, v):
        return fc.favor_attention(q, k, v, features=fmap, key_mask=mask, chunk_size=2,
                                  causal=causal, balance=None if causal else stats)  # fmt: skip

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-8, rtol=1e-6)
    if not causal:
        default = torch.autograd.grad(
            fc.favor_attention(q, k, v, features=fmap, key_mask=mask).sum(), (q, k, v)
        )
        given = torch.autograd.grad(f(q, k, v).sum(), (q, k, v))
        for a, b in zip(default, given, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("causal", [False, True])
def test_backward_saves_inputs_and_output_not_features(causal: bool) -> None:
    # The engine's backward recomputes the features block by block: autograd keeps the
    # inputs, the output and the key sums (states of the causal pieces besides), never an
    # L x m array of features; gradients equal autodiff of the standard operations.
    gen = torch.Generator().manual_seed(0)
    L, d, m = 512, 16, 64
    q, k, v = (torch.randn(1, L, d, dtype=torch.float64, generator=gen, requires_grad=True)
               for _ in range(3))  # fmt: skip
    fmap = fc.PositiveFeatures(m=m, seed=2)

    def run():
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t
        ):
            out = fc.favor_attention(
                q, k, v, features=fmap, causal=causal, chunk_size=32, balance=False
            )
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        return out, grads, sum(saved)

    out, grads, saved = run()
    with fc.fast_paths(False):
        out_std, grads_std, saved_std = run()
    torch.testing.assert_close(out, out_std, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, grads_std, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert saved_std > L * m * 8  # autodiff of the standard operations keeps the features
    assert saved <= 4 * L * d * 8 + 2 * m * (d + 1) * 8, saved  # q, k, v, out, the sums


def test_redraw_interval_freeze_and_determinism() -> None:
    mod = _module(redraw_interval=2)
    x = torch.randn(1, 5, 32, dtype=torch.float64)
    first = mod.projection.clone()
    mod.train()
    mod(x, x, x)
    mod(x, x, x)
    torch.testing.assert_close(mod.projection, first)  # 2 calls: no redraw yet
    mod(x, x, x)
    assert not torch.equal(mod.projection, first)
    assert int(mod.draws) == 1
    twin = _module()
    twin.redraw()
    torch.testing.assert_close(twin.projection, mod.projection)  # same seed, same redraw
    mod.freeze()
    drawn = mod.projection.clone()
    for _ in range(5):
        mod(x, x, x)
    torch.testing.assert_close(mod.projection, drawn)
    mod.freeze(False).eval()
    for _ in range(5):
        mod(x, x, x)
    torch.testing.assert_close(mod.projection, drawn)  # eval mode never redraws


def test_state_dict_round_trip_and_to() -> None:
    mod = _module()
    mod.redraw()
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    other = ftorch.FavorAttention(
        32, 4, batch_first=True, dtype=torch.float64, features=fc.PositiveFeatures(m=64, seed=99)
    )
    other.load_state_dict(mod.state_dict())
    torch.testing.assert_close(other(x, x, x)[0], mod(x, x, x)[0], rtol=0, atol=0)
    as32 = copy.deepcopy(mod).to(torch.float32)
    assert as32.projection.dtype == torch.float32
    out32 = as32(x.float(), x.float(), x.float())[0]
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), mod(x, x, x)[0], rtol=1e-4, atol=1e-5)
    if torch.cuda.is_available():
        cuda = copy.deepcopy(mod).to("cuda")
        torch.testing.assert_close(cuda(x.cuda(), x.cuda(), x.cuda())[0].cpu(), mod(x, x, x)[0])


def test_bf16_autocast_on_cpu() -> None:
    torch.manual_seed(0)
    mod = ftorch.FavorAttention(32, 4, batch_first=True, features=FMAP)
    x = torch.randn(2, 16, 32)
    want = mod(x, x, x, is_causal=True)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mod(x, x, x, is_causal=True)[0]
    assert got.dtype == torch.bfloat16
    assert torch.isfinite(got).all()
    # bf16 projections in and out (unit roundoff 2^-8, a few roundings deep)
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05 * want.abs().max().item())


def test_torch_compile_of_a_module_call() -> None:
    torch.manual_seed(0)
    mod = ftorch.FavorAttention(32, 4, batch_first=True, features=FMAP)
    x = torch.randn(2, 24, 32)
    want = mod(x, x, x, is_causal=True)[0]
    compiled = torch.compile(mod)
    got = compiled(x, x, x, is_causal=True)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_call_does_not_import_the_compiler() -> None:
    # torch._dynamo costs a process about 70 MiB and a second to import; a plain call
    # (forward and backward) must not bring it in, only torch.compile does.
    code = (
        "import sys, torch, favorcore as fc, favorcore_backends.torch\n"
        "x = torch.randn(1, 2, 8, 4, requires_grad=True)\n"
        "fc.favor_attention(x, x, x, features=fc.PositiveFeatures(m=8, seed=0)).sum().backward()\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


def test_from_multihead_keeps_the_weights() -> None:
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True, dtype=torch.float64)
    fav = ftorch.FavorAttention.from_multihead(mha, features=FMAP)
    e = 32
    torch.testing.assert_close(fav.q_proj_weight, mha.in_proj_weight[:e])
    torch.testing.assert_close(fav.v_proj_weight, mha.in_proj_weight[2 * e :])
    torch.testing.assert_close(fav.out_proj.weight, mha.out_proj.weight)
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    torch.testing.assert_close(fav(x, x, x)[0], _reference(fav, x), rtol=1e-12, atol=1e-12)


def test_favorized_model_approximates_the_original() -> None:
    # Swapping attention keeps the weights, so the model's output stays close to the
    # softmax model's; the error falls as m grows (FAVOR's estimator, not a new model).
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True, dtype=torch.float64)
    x = 0.5 * torch.randn(2, 64, 32, dtype=torch.float64)
    exact = mha(x, x, x, need_weights=False)[0]

    def error(m: int, seed: int) -> float:
        fav = ftorch.favorize(copy.deepcopy(mha), features=fc.PositiveFeatures(m=m, seed=seed))
        return ((fav(x, x, x)[0] - exact).norm() / exact.norm()).item()

    errs = [np.mean([error(m, s) for s in range(5)]) for m in (16, 1024)]
    assert errs[1] < errs[0] / 3, errs
    assert errs[1] < 0.1, errs


@pytest.mark.parametrize("nested", [False, True])
def test_favorize_transformer_encoder_never_takes_the_fused_fast_path(nested: bool) -> None:
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(
        32, 4, dim_feedforward=64, dropout=0.0, batch_first=True
    )
    model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested).eval()
    model = ftorch.favorize(model, features=FMAP)
    assert not model.use_nested_tensor
    assert all(isinstance(lay.self_attn, ftorch.FavorAttention) for lay in model.layers)
    x = torch.randn(2, 10, 32)
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[1, 6:] = True
    with torch.no_grad():
        got = model(x, src_key_padding_mask=pad)
        # the same layers with PyTorch's fast paths switched off: our modules run
        with _fastpath(False):
            want = model(x, src_key_padding_mask=pad)
    torch.testing.assert_close(got, want)
    dirty = x.clone()
    dirty[1, 6:] = 1e3
    with torch.no_grad():
        torch.testing.assert_close(model(dirty, src_key_padding_mask=pad)[1, :6], got[1, :6])


class _fastpath:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __enter__(self) -> None:
        self.before = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(self.enabled)

    def __exit__(self, *exc) -> None:
        torch.backends.mha.set_fastpath_enabled(self.before)


def test_module_rejects_bad_calls() -> None:
    mod = _module()
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    with pytest.raises(TypeError, match="key_padding_mask must be bool or float"):
        mod(x, x, x, key_padding_mask=torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"query must have shape \(L, N, E\)"):
        mod(x[None], x[None], x[None])
    with pytest.raises(TypeError, match="features must be a FeatureMap"):
        ftorch.FavorAttention(32, 4, features="favor+")


@pytest.mark.parametrize(
    ("causal", "needs"),
    [(False, "k"), (False, "v"), (True, "k"), (True, "v"), (True, "state")],
)
def test_gradient_of_keys_alone_across_blocks(causal: bool, needs: str) -> None:
    # Only the keys, the values or the carried state require grad (queries do not): the
    # fast path's reused query buffers, saved by autograd in one block and overwritten in
    # the next, once made backward fail. The engine now runs the standard steps for the
    # whole call; gradients equal the plain core's.
    import array_api_compat

    from favorcore.steps import register_steps, steps_for

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 150, 8, dtype=torch.float64, generator=gen) for _ in range(3))
    kv0 = torch.rand(1, 2, 16, 9, dtype=torch.float64, generator=gen) if causal else None
    leaf = {"k": k, "v": v, "state": kv0}[needs]
    assert leaf is not None
    leaf.requires_grad_()
    fmap = fc.PositiveFeatures(m=16, seed=4)

    def grad() -> torch.Tensor:
        state = None if kv0 is None else fc.AttentionState(kv0)
        out = fc.favor_attention(q, k, v, features=fmap, causal=causal, balance=False,
                                 state=state, chunk_size=8)  # fmt: skip
        (g,) = torch.autograd.grad(out.square().sum(), leaf)
        return g

    registered = steps_for(array_api_compat.array_namespace(q))
    small = copy.copy(registered)
    small.block = 32  # several blocks (bidirectional: 4 x 32 rows)
    register_steps("array_api_compat.torch", small)
    try:
        fast = grad()
    finally:
        register_steps("array_api_compat.torch", registered)
    with fc.fast_paths(False):
        plain = grad()
    # float64, both the standard steps (in blocks of 32 rows, and whole): rounding in
    # sums over 150 keys and 16 features (~1e-14 relative) is far inside 1e-10
    torch.testing.assert_close(fast, plain, rtol=1e-10, atol=1e-12)
