"""Training: PyTorch autograd and jax.grad through favor_attention against autodiff of the
quadratic float64 reference, with masks, a state, packed documents and grouped key heads;
mixed precision; torch.compile forward and backward."""

from __future__ import annotations

import math
import warnings

import array_api_compat
import numpy as np
import pytest
from reference import favor_plus

import favorcore as fc

FMAP = fc.PositiveFeatures(m=16, seed=2)
B, HKV, L, D, DV = 2, 2, 37, 8, 5
CASES = {
    "bidirectional": {},
    "causal": {"causal": True},
    "masked": {"masked": True},
    "causal, masked, state": {"causal": True, "masked": True, "state": True},
    "packed": {"packed": True},
    "causal, packed, masked": {"causal": True, "packed": True, "masked": True},
    "gqa": {"group": 3},
    "causal, gqa, packed, masked": {"causal": True, "group": 3, "packed": True, "masked": True},
}


def _problem(case: dict, rng: np.random.Generator) -> dict:
    """Inputs (float64, host) and what the reference needs: ``allowed`` per key head."""
    h = HKV * case.get("group", 1)
    q = rng.standard_normal((B, h, L, D)) / 2
    k = rng.standard_normal((B, HKV, L, D)) / 2
    v = rng.standard_normal((B, HKV, L, DV))
    ids = np.zeros((B, L), np.int64)
    if case.get("packed"):
        ids[0, 12:30], ids[0, 30:], ids[1, 5:] = 1, 2, 1
    mask = rng.random((B, L)) < 0.75 if case.get("masked") else np.ones((B, L), bool)
    starts = np.r_[True, ids[0, 1:] != ids[0, :-1]][None].repeat(B, 0)
    starts[1] = np.r_[True, ids[1, 1:] != ids[1, :-1]]
    mask |= starts  # every document's first key is kept: every row has a weight
    ok = (ids[:, :, None] == ids[:, None, :]) & mask[:, None, :]
    if case.get("causal"):
        ok &= np.tril(np.ones((L, L), bool))
    kv0 = rng.random((B, HKV, FMAP.m, DV + 1)) if case.get("state") else None
    return {"q": q, "k": k, "v": v, "ids": ids, "mask": mask, "allowed": ok[:, None], "kv0": kv0,
            "g": rng.standard_normal((B, h, L, DV)), "group": case.get("group", 1)}  # fmt: skip


def _call(p: dict, case: dict, q, k, v, kv0, asarray):
    kw = {"features": FMAP, "causal": bool(case.get("causal")), "balance": False, "chunk_size": 4,
          "enable_gqa": p["group"] > 1}  # fmt: skip
    if case.get("packed"):
        kw["segment_ids"] = asarray(p["ids"][:, None, :])
    if case.get("masked"):
        kw["key_mask"] = asarray(p["mask"][:, None, :])
    if kv0 is not None:
        kw["state"] = fc.AttentionState(kv0)
    return fc.favor_attention(q, k, v, **kw)


def _reference(xp, p: dict, q, k, v, kv0):
    """The reference with grouped heads as a leading axis of the key head: (B, Hkv, G, L, .)."""
    g = p["group"]
    w = xp.asarray(FMAP.feature_matrix(D), dtype=q.dtype)
    if array_api_compat.is_torch_array(q):
        w = w.to(q.device)
    q5 = xp.reshape(q, (B, HKV, g, L, D))
    k5, v5 = k[:, :, None], v[:, :, None]
    allowed = xp.asarray(p["allowed"][:, :, None])
    state = None if kv0 is None else kv0[:, :, None]
    out = favor_plus(xp, q5, k5, v5, w, allowed=allowed, scale=1 / math.sqrt(D), kv0=state)
    return xp.reshape(out, (B, HKV * g, L, DV))


@pytest.mark.parametrize("kept", [True, False], ids=["features kept", "recomputed"])
@pytest.mark.parametrize("name", list(CASES))
def test_torch_autograd_equals_the_reference(name: str, kept: bool) -> None:
    torch = pytest.importorskip("torch")
    from favorcore_backends.torch import kept_features

    case, rng = CASES[name], np.random.default_rng(len(name))
    p = _problem(case, rng)
    xp = array_api_compat.array_namespace(torch.zeros(1))
    leaves = [torch.tensor(p[n], requires_grad=True) for n in ("q", "k", "v")]
    kv0 = None if p["kv0"] is None else torch.tensor(p["kv0"], requires_grad=True)
    leaves += [] if kv0 is None else [kv0]
    g = torch.tensor(p["g"])
    with kept_features(1 if kept else 0):  # (these calls' features take a few KiB)
        got = _call(p, case, *leaves[:3], kv0, torch.tensor)
    want = _reference(xp, p, *leaves[:3], kv0)
    # float64, <= 37 keys and 16 features summed in another order: ~1e-14 relative
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad((got * g).sum(), leaves)
    refs = torch.autograd.grad((want * g).sum(), leaves)
    for a, b in zip(grads, refs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("budget", [1, 0], ids=["features kept", "recomputed"])
def test_torch_second_backward_of_a_retained_graph_gives_the_same_gradients(budget) -> None:
    # the backward reads what the forward kept (features, normalisers) without changing it
    torch = pytest.importorskip("torch")
    from favorcore_backends.torch import kept_features

    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 40, 8, generator=gen, requires_grad=True) for _ in range(3))
    with kept_features(budget):
        out = fc.favor_attention(q, k, v, features=FMAP)
    first = torch.autograd.grad(out.sum(), (q, k, v), retain_graph=True)
    second = torch.autograd.grad(out.sum(), (q, k, v))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_torch_backward_recomputes_features_only_beyond_the_budget(monkeypatch) -> None:
    # a bidirectional call keeps its features within the budget: its backward computes
    # no key features; beyond the budget (and in this thread only) it recomputes them
    torch = pytest.importorskip("torch")
    import threading

    from favorcore_backends._torch_steps import TorchSteps
    from favorcore_backends.torch import kept_features

    blocks: list[str] = []
    keys = TorchSteps.keys

    def counted(self, *args):
        blocks.append(threading.current_thread().name)
        return keys(self, *args)

    monkeypatch.setattr(TorchSteps, "keys", counted)
    q, k, v = (torch.randn(1, 2, 50, 8, requires_grad=True) for _ in range(3))

    def step() -> int:
        out = fc.favor_attention(q, k, v, features=FMAP)
        blocks.clear()
        out.sum().backward()
        return len(blocks)

    assert step() == 0
    with kept_features(0):
        assert step() == 2  # one block of keys per head
        seen: list[int] = []
        other = threading.Thread(target=lambda: seen.append(step()))
        other.start()
        other.join()
        assert seen == [0]  # another thread keeps its default
    assert step() == 0
    for bad in (-1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="budget_mib"), kept_features(bad):
            pass


# packed calls run eagerly on JAX, compiling each document's shapes on first use (seconds
# each): one packed case here covers them with every other feature
@pytest.mark.parametrize(
    "name", [n for n in CASES if n not in ("packed", "causal, packed, masked")]
)
def test_jax_grad_equals_the_reference(name: str) -> None:
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    case, rng = CASES[name], np.random.default_rng(len(name))
    p = _problem(case, rng)
    xp = array_api_compat.array_namespace(jnp.zeros(1))
    args = [jnp.asarray(p[n]) for n in ("q", "k", "v")]
    args += [] if p["kv0"] is None else [jnp.asarray(p["kv0"])]
    g = jnp.asarray(p["g"])

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a[:3], a[3] if len(a) > 3 else None) * g)

    got_fn = lambda q, k, v, kv0: _call(p, case, q, k, v, kv0, jnp.asarray)
    want_fn = lambda q, k, v, kv0: _reference(xp, p, q, k, v, kv0)
    np.testing.assert_allclose(got_fn(*args[:3], args[3] if len(args) > 3 else None),
                               want_fn(*args[:3], args[3] if len(args) > 3 else None),
                               rtol=1e-10, atol=1e-12)  # fmt: skip
    argnums = tuple(range(len(args)))
    # segment ids are read on the host, so the packed calls are differentiated eagerly
    grad = jax.grad if case.get("packed") else lambda f, argnums: jax.jit(jax.grad(f, argnums))
    grads = grad(loss(got_fn), argnums=argnums)(*args)
    refs = jax.grad(loss(want_fn), argnums=argnums)(*args)
    for a, b in zip(grads, refs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", [n for n in CASES if "packed" in n])
def test_jax_jit_grad_with_traced_ids_equals_the_reference(name: str) -> None:
    # the ids an argument of the jitted step: the scans restart where documents start
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    case, rng = CASES[name], np.random.default_rng(len(name))
    p = _problem(case, rng)
    xp = array_api_compat.array_namespace(jnp.zeros(1))
    q, k, v, g = (jnp.asarray(p[n]) for n in ("q", "k", "v", "g"))

    def got(q, k, v, ids):
        return _call({**p, "ids": ids}, case, q, k, v, None, jnp.asarray)

    def loss(out):
        return jnp.sum(out * g)

    step = jax.jit(jax.value_and_grad(lambda q, k, v, ids: loss(got(q, k, v, ids)), (0, 1, 2)))
    value, grads = step(q, k, v, jnp.asarray(p["ids"]))
    want_fn = lambda q, k, v: loss(_reference(xp, p, q, k, v, None))
    want, refs = jax.value_and_grad(want_fn, (0, 1, 2))(q, k, v)
    np.testing.assert_allclose(value, want, rtol=1e-10)
    for a, b in zip(grads, refs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_torch_float32_gradients_at_length_4096_match_float64() -> None:
    # the float32 chunked path over 4096 tokens against the same path in float64: the
    # step accumulates in float32 (relative error ~ sqrt(L) * 2^-24 per sum, far below 1e-3)
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, 2, 4096, 32, generator=gen, dtype=torch.float64) * 0.5 for _ in range(3)
    )
    g = torch.randn(1, 2, 4096, 32, generator=gen, dtype=torch.float64)
    fmap = fc.PositiveFeatures(m=64, seed=0)
    for causal in (False, True):
        grads = {}
        for dt in (torch.float32, torch.float64):
            leaves = [t.to(dt).requires_grad_() for t in (q, k, v)]
            out = fc.favor_attention(*leaves, features=fmap, causal=causal, balance=False)
            grads[dt] = torch.autograd.grad((out * g.to(dt)).sum(), leaves)
        for a, b in zip(grads[torch.float32], grads[torch.float64], strict=True):
            err = ((a.double() - b).norm() / b.norm()).item()
            assert err < 1e-4, (causal, err)


NORMS = (1e-3, 1e-1, 1.0, 10.0, 1e2, 1e3)  # the stress grid's


def _scaled(rng: np.random.Generator, norm: float, shape: tuple[int, ...]) -> np.ndarray:
    x = rng.standard_normal(shape)
    return x * norm / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.filterwarnings("ignore::favorcore.AccuracyWarning")  # large norms: rows warned
@pytest.mark.parametrize("causal", [False, True])
def test_torch_bf16_autocast_training_step_is_finite(causal: bool) -> None:
    # Under autocast the module's projections run in bfloat16 and the attention in float32;
    # over the stress grid's norms the loss and every gradient stay finite, and at unit
    # scale the step's gradients are those of float32 to bfloat16's precision.
    torch = pytest.importorskip("torch")
    ftorch = pytest.importorskip("favorcore_backends.torch")
    torch.manual_seed(0)
    mod = ftorch.FavorAttention(32, 4, batch_first=True, features=fc.PositiveFeatures(m=32, seed=0))
    rng = np.random.default_rng(0)
    for norm in NORMS:
        x = torch.tensor(_scaled(rng, norm * math.sqrt(32), (2, 48, 32)), dtype=torch.float32)
        grads = {}
        for autocast in (False, True):
            x_ = x.clone().requires_grad_()
            mod.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = mod(x_, x_, x_, is_causal=causal)[0]
            assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
            loss = out.float().square().mean()
            loss.backward()
            grads[autocast] = [x_.grad] + [p.grad for p in mod.parameters()]
            assert torch.isfinite(loss), (norm, autocast)
            assert all(bool(torch.isfinite(t).all()) for t in grads[autocast]), (norm, autocast)
        if norm == 1.0:
            for a, b in zip(grads[True], grads[False], strict=True):
                assert ((a - b).norm() / b.norm()).item() < 0.05  # 2^-8 roundings, a few deep


@pytest.mark.filterwarnings("ignore::favorcore.AccuracyWarning")
@pytest.mark.parametrize("causal", [False, True])
def test_jax_bf16_inputs_train_in_float32(causal: bool) -> None:
    # bfloat16 inputs: the result and gradients are bfloat16, finite over the stress grid,
    # and equal to the float32 computation on the same (rounded) inputs to bfloat16's
    # rounding of the result: the engine accumulates in float32.
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    fmap = fc.PositiveFeatures(m=32, seed=0)
    rng = np.random.default_rng(1)

    def loss(q, k, v):
        out = fc.favor_attention(q, k, v, features=fmap, causal=causal, balance=False)
        return jnp.sum(out.astype(jnp.float32) ** 2), out

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    for norm in NORMS:
        q, k = (jnp.asarray(_scaled(rng, norm, (2, 64, 16)), dtype=jnp.bfloat16) for _ in range(2))
        v = jnp.asarray(rng.standard_normal((2, 64, 8)), dtype=jnp.bfloat16)
        (value, out), grads = step(q, k, v)
        assert out.dtype == jnp.bfloat16
        assert bool(jnp.isfinite(value)), norm
        assert all(g.dtype == jnp.bfloat16 and bool(jnp.isfinite(g).all()) for g in grads), norm
        (_, want), _ = step(*(t.astype(jnp.float32) for t in (q, k, v)))
        np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=2**-7, atol=2**-7)


def test_torch_fp16_autocast_on_a_gpu() -> None:
    torch = pytest.importorskip("torch")
    ftorch = pytest.importorskip("favorcore_backends.torch")
    if not torch.cuda.is_available():
        pytest.skip("float16 autocast needs a CUDA GPU; none is visible here")
    mod = ftorch.FavorAttention(
        32, 4, batch_first=True, features=fc.PositiveFeatures(m=32, seed=0)
    ).cuda()
    for norm in NORMS:
        x = torch.tensor(_scaled(np.random.default_rng(0), norm * math.sqrt(32), (2, 48, 32)),
                         dtype=torch.float32, device="cuda", requires_grad=True)  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fc.AccuracyWarning)
            with torch.autocast("cuda", dtype=torch.float16):
                out = mod(x, x, x, is_causal=True)[0]
            out.float().square().mean().backward()
        assert out.dtype == torch.float16
        assert bool(torch.isfinite(x.grad).all()), norm


def test_torch_compile_forward_and_backward_match_eager() -> None:
    torch = pytest.importorskip("torch")
    ftorch = pytest.importorskip("favorcore_backends.torch")
    torch.manual_seed(0)
    mod = ftorch.FavorAttention(32, 4, batch_first=True, features=fc.PositiveFeatures(m=16, seed=0))
    x = torch.randn(2, 24, 32)

    def step(fn):
        x_ = x.clone().requires_grad_()
        mod.zero_grad()
        out = fn(x_, x_, x_, is_causal=True)[0]
        out.square().sum().backward()
        return out.detach(), [x_.grad] + [p.grad.clone() for p in mod.parameters()]

    want, want_grads = step(mod)
    got, got_grads = step(torch.compile(mod))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
