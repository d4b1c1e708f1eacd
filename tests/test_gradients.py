"""The backward pass written once: favor_attention_vjp against finite differences, on
every backend and through every block layout."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import pytest
from helpers import Backend, to_numpy

import favorcore as fc
from favorcore.steps import Steps, register_steps, steps_for


@contextlib.contextmanager
def _steps(xp, steps: Steps | None) -> Iterator[None]:
    if steps is None:
        yield
        return
    before = steps_for(xp)
    register_steps(xp.__name__, steps)
    try:
        yield
    finally:
        register_steps(xp.__name__, before)


class _Workers(Steps):
    workers = 3


LAYOUTS = {
    "registered": None,
    "standard, blocks of 7, one row at a time": Steps(block=7, vectorized=False),
    "standard, blocks of 5, every row at once": Steps(block=5),
    "standard, 3 workers": _Workers(block=11, vectorized=False),
}

MAPS = {
    "favor+": lambda: fc.PositiveFeatures(m=16, seed=3),
    "hyperbolic": lambda: fc.hyperbolic_features(16, seed=3),
    "favor++": lambda: fc.OptimalPositiveFeatures(m=16, seed=3, a=-0.2),
}


def _directional(backend: Backend, f, args: dict, direction: dict, h: float = 1e-5) -> float:
    """The central difference of ``f`` along ``direction`` (float64)."""
    a = backend.asarray
    plus = {n: a(t + h * direction[n]) if n in direction else a(t) for n, t in args.items()}
    minus = {n: a(t - h * direction[n]) if n in direction else a(t) for n, t in args.items()}
    return (f(**plus) - f(**minus)) / (2 * h)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kind", [*MAPS, "balanced"])
def test_vjp_equals_finite_differences(
    backend: Backend, rng: np.random.Generator, layout: str, causal: bool, masked: bool, kind: str
) -> None:
    # <dq, eq> + <dk, ek> + <dv, ev> + <dstate, es> against the central difference of
    # <out, g> + <state_after, gs> along (eq, ek, ev, es): float64, h = 1e-5, so the
    # difference is exact to ~h^2 |f'''| + eps |f| / h ~ 1e-9 relative; 1e-6 still fails
    # on any wrong term (a missing chunk, suffix, mask or state: errors of order 1e-2).
    xp, a = backend.xp, backend.asarray
    lq = 29
    lk = lq if causal else 33
    q, k = rng.standard_normal((2, 3, lq, 8)) / 2, rng.standard_normal((2, 3, lk, 8)) / 2
    v = rng.standard_normal((2, 3, lk, 5))
    mask = rng.random((2, 1, lk)) < 0.7 if masked else None
    kv0 = rng.random((2, 3, 16, 6))
    g, gs = rng.standard_normal((2, 3, lq, 5)), rng.standard_normal((2, 3, 16, 6))
    fmap = MAPS["favor++" if kind == "balanced" else kind]()
    stats = fc.balance_statistics(a(q), a(k), scale=0.3) if kind == "balanced" else False
    kw = {"features": fmap, "causal": causal, "scale": 0.3, "chunk_size": 4, "balance": stats,
          "key_mask": None if mask is None else a(mask)}  # fmt: skip

    def loss(q, k, v, kv0) -> float:
        out, state = fc.favor_attention(
            q, k, v, state=fc.AttentionState(kv0), return_state=True, **kw
        )
        return float(np.sum(to_numpy(out) * g) + np.sum(to_numpy(state.kv) * gs))

    with _steps(xp, LAYOUTS[layout]):
        dq, dk, dv, dstate = fc.favor_attention_vjp(
            a(q), a(k), a(v), a(g), grad_state=fc.AttentionState(a(gs)),
            state=fc.AttentionState(a(kv0)), **kw,
        )  # fmt: skip
        assert dstate is not None
        direction = {
            n: rng.standard_normal(t.shape) for n, t in (("q", q), ("k", k), ("v", v), ("kv0", kv0))
        }
        fd = _directional(backend, loss, {"q": q, "k": k, "v": v, "kv0": kv0}, direction)
    got = sum(float(np.sum(to_numpy(d) * direction[n])) for n, d in
              (("q", dq), ("k", dk), ("v", dv), ("kv0", dstate.kv)))  # fmt: skip
    assert got == pytest.approx(fd, rel=1e-6, abs=1e-9)
    if masked:  # masked keys and values get exactly 0
        drop = ~np.broadcast_to(mask[..., None], k.shape)
        assert (to_numpy(dk)[drop] == 0).all()
        assert (to_numpy(dv)[np.broadcast_to(~mask[..., None], v.shape)] == 0).all()


def test_vjp_broadcast_batch_dimensions(backend: Backend, rng: np.random.Generator) -> None:
    # keys and values shared by every head: their cotangents are summed over the heads
    a = backend.asarray
    q = rng.standard_normal((2, 3, 12, 4)) / 2
    k, v = rng.standard_normal((2, 1, 12, 4)) / 2, rng.standard_normal((1, 12, 3))
    g = rng.standard_normal((2, 3, 12, 3))
    kw = {"features": fc.PositiveFeatures(m=8, seed=0), "causal": True}
    _, dk, dv, _ = fc.favor_attention_vjp(a(q), a(k), a(v), a(g), **kw)
    assert tuple(dk.shape) == k.shape
    assert tuple(dv.shape) == v.shape
    k_wide, v_wide = np.broadcast_to(k, q.shape).copy(), np.broadcast_to(v, (2, 3, 12, 3)).copy()
    wide = fc.favor_attention_vjp(a(q), a(k_wide), a(v_wide), a(g), **kw)
    np.testing.assert_allclose(to_numpy(dk), to_numpy(wide[1]).sum(1, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(to_numpy(dv), to_numpy(wide[2]).sum((0, 1))[None], rtol=1e-12)


def test_vjp_of_rows_without_a_normaliser_is_zero(backend: Backend) -> None:
    # a query with no valid key returns 0, a constant: its cotangent is 0, not NaN
    a = backend.asarray
    q = k = v = np.ones((1, 4, 2)) / 2
    mask = np.array([[False, True, True, True]])
    dq, _, _, _ = fc.favor_attention_vjp(
        a(q), a(k), a(v), a(np.ones((1, 4, 2))), features=fc.PositiveFeatures(m=4, seed=0),
        causal=True, key_mask=a(mask),
    )  # fmt: skip
    assert np.isfinite(to_numpy(dq)).all()
    np.testing.assert_array_equal(to_numpy(dq)[0, 0], 0.0)


def test_vjp_of_maps_without_an_exponent_raises() -> None:
    x = np.ones((3, 4)) / 4
    with pytest.raises(NotImplementedError, match="RowForm has no gradient formula"):
        fc.favor_attention_vjp(x, x, x, x, features=fc.TrigonometricFeatures(m=8, seed=0))
    with pytest.raises(ValueError, match="grad must have shape"):
        fc.favor_attention_vjp(x, x, x, x[:2], features=fc.PositiveFeatures(m=8, seed=0))


def test_vjp_default_estimator_treats_its_statistics_as_constants(rng: np.random.Generator) -> None:
    # The per-call balance and A are gradient constants: the VJP equals the one with the
    # same statistics given.
    q, k, v, g = (rng.standard_normal((2, 20, 8)) / 2 for _ in range(4))
    stats = fc.balance_statistics(q, k)
    got = fc.favor_attention_vjp(q, k, v, g)
    want = fc.favor_attention_vjp(q, k, v, g, features=fc.DEFAULT_FEATURES, balance=stats)
    for x, y in zip(got[:3], want[:3], strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14)
    assert math.isfinite(float(np.abs(got[0]).sum()))
