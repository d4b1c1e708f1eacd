"""Meta and fake tensors pass through: results of the right shape, dtype and device, and
no value is read (no ``.item()``, no finiteness check), as models are built on meta first."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
ftorch = pytest.importorskip("favorcore_backends.torch")
fake_tensor = pytest.importorskip("torch._subclasses.fake_tensor")

import favorcore as fc

CASES = [
    pytest.param({}, id="default-bidirectional"),
    pytest.param({"causal": True}, id="default-causal"),
    pytest.param({"features": fc.PositiveFeatures(m=32, seed=0)}, id="favor+"),
    pytest.param(
        {"features": fc.PositiveFeatures(m=32, seed=0), "causal": True}, id="favor+-causal"
    ),
    pytest.param({"features": fc.GeneralizedFeatures(kernel="relu")}, id="relu"),
]


def _inputs(device: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    q = torch.randn(2, 3, 40, 8, device=device, dtype=dtype)
    k = torch.randn(2, 3, 40, 8, device=device, dtype=dtype)
    v = torch.randn(2, 3, 40, 5, device=device, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("kwargs", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_favor_attention_on_meta_tensors(kwargs: dict, dtype: torch.dtype) -> None:
    q, k, v = _inputs("meta", dtype)
    mask = torch.ones(2, 1, 40, dtype=torch.bool, device="meta")
    for extra in ({}, {"key_mask": mask, "query_mask": mask}):
        out = fc.favor_attention(q, k, v, **kwargs, **extra)
        assert out.device.type == "meta"
        assert out.shape == (2, 3, 40, 5)
        assert out.dtype == dtype


def test_state_and_softmax_attention_on_meta_tensors() -> None:
    q, k, v = _inputs("meta")
    out, state = fc.favor_attention(q, k, v, causal=True, return_state=True)
    assert out.device.type == state.kv.device.type == "meta"
    assert state.kv.shape == (2, 3, 256, 6)  # the default map's m = 256; dv + 1 columns
    step = fc.favor_attention(q[..., :1, :], k[..., :1, :], v[..., :1, :], causal=True, state=state)
    assert step.shape == (2, 3, 1, 5)
    assert step.device.type == "meta"
    exact = fc.softmax_attention(q, k, v, causal=True)
    assert exact.shape == (2, 3, 40, 5)
    assert exact.device.type == "meta"


def test_meta_tensors_with_autograd() -> None:
    q, k, v = (t.requires_grad_() for t in _inputs("meta"))
    out = fc.favor_attention(q, k, v, features=fc.PositiveFeatures(m=16, seed=0), causal=True)
    out.sum().backward()
    assert q.grad is not None
    assert q.grad.shape == q.shape
    assert q.grad.device.type == "meta"


@pytest.mark.parametrize("kwargs", CASES)
def test_favor_attention_under_fake_tensor_mode(kwargs: dict) -> None:
    with fake_tensor.FakeTensorMode():
        q, k, v = _inputs("cpu")
        out = fc.favor_attention(q, k, v, **kwargs)
        assert fake_tensor.is_fake(out)
        assert out.shape == (2, 3, 40, 5)
        assert out.dtype == torch.float32
        assert out.device.type == "cpu"
        exact = fc.softmax_attention(q, k, v)
        assert fake_tensor.is_fake(exact)
        assert exact.shape == (2, 3, 40, 5)


@pytest.mark.parametrize("causal", [False, True])
def test_module_builds_and_runs_under_the_meta_device(causal: bool) -> None:
    with torch.device("meta"):
        attn = ftorch.FavorAttention(32, 4, batch_first=True)
        x = torch.randn(2, 24, 32)
        mask = torch.zeros(2, 24, dtype=torch.bool)
        out, weights = attn(x, x, x, is_causal=causal, key_padding_mask=None if causal else mask)
    assert weights is None
    assert out.shape == (2, 24, 32)
    assert out.device.type == "meta"
    assert all(p.device.type == "meta" for p in attn.parameters())
    attn.train()
    attn.redraw_interval = 1
    with torch.device("meta"):
        attn(x, x, x)  # the training call counter is a meta buffer: not read


def test_module_materialised_from_meta_runs_on_the_cpu() -> None:
    # The usual flow: build on meta, move to a real device with to_empty, load weights.
    with torch.device("meta"):
        attn = ftorch.FavorAttention(32, 4, batch_first=True)
    attn = attn.to_empty(device="cpu")
    attn.load_state_dict(ftorch.FavorAttention(32, 4, batch_first=True).state_dict())
    x = torch.randn(2, 24, 32)
    out, _ = attn(x, x, x)
    assert out.shape == (2, 24, 32)
    assert bool(torch.isfinite(out).all())


def test_module_under_fake_tensor_mode() -> None:
    attn = ftorch.FavorAttention(32, 4, batch_first=True)
    with fake_tensor.FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.randn(2, 24, 32)
        out, _ = attn(x, x, x, is_causal=True)
        assert fake_tensor.is_fake(out)
        assert out.shape == (2, 24, 32)
