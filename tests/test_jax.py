"""The JAX adapter: key-based draws, jit/vmap/grad, the Flax module."""

from __future__ import annotations

import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
from jax.test_util import check_grads

import favorcore as fc

fjax = pytest.importorskip("favorcore_backends.jax")

FMAP = fc.hyperbolic_features(16, seed=0)


@pytest.mark.parametrize("kind", ["iid", "orthogonal", "hadamard", "givens", "simplex"])
@pytest.mark.parametrize("norms", ["chi", "fixed"])
def test_key_draws_are_orthogonal_and_jittable(kind: str, norms: str) -> None:
    key = jax.random.key(3)
    w = fjax.draw_projection(key, 20, 8, kind=kind, norms=norms, dtype=jnp.float64)
    assert w.shape == (20, 8)
    assert w.dtype == jnp.float64
    jitted = jax.jit(
        fjax.draw_projection, static_argnums=(1, 2), static_argnames=("kind", "norms", "dtype")
    )
    np.testing.assert_allclose(
        jitted(key, 20, 8, kind=kind, norms=norms, dtype=jnp.float64), w, rtol=1e-12, atol=1e-12
    )
    lengths = np.linalg.norm(np.asarray(w), axis=1)
    if norms == "fixed":
        np.testing.assert_allclose(lengths, math.sqrt(8), rtol=1e-12)
    if kind != "iid":
        for start in (0, 8, 16):
            block = np.asarray(w[start : start + 8]) / lengths[start : start + 8, None]
            rows = len(block)
            want = (
                np.eye(rows)
                if kind != "simplex"
                else np.full((rows, rows), -1 / 7) + np.eye(rows) * (1 + 1 / 7)
            )
            np.testing.assert_allclose(block @ block.T, want, atol=1e-12)
    other = fjax.draw_projection(
        jax.random.key(4), 20, 8, kind=kind, norms=norms, dtype=jnp.float64
    )
    assert not np.allclose(w, other)


def test_key_drawn_positive_features_are_unbiased() -> None:
    # z-test of the mean over S keys of phi(x).phi(y) against exp(x.y), as in the core tests
    d, m, s = 8, 16, 3000
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, d))
    y = rng.standard_normal((6, d))
    x, y = (0.6 * a / np.linalg.norm(a, axis=1, keepdims=True) for a in (x, y))
    fmap = fc.PositiveFeatures(m=m)

    def estimate(key):
        w = fjax.feature_matrix(key, fmap, d, jnp.float64)
        phi = lambda a: jnp.exp(a @ w.T - (a * a).sum(-1, keepdims=True) / 2) / math.sqrt(m)
        return (phi(x) * phi(y)).sum(-1)

    est = np.asarray(jax.vmap(estimate)(jax.random.split(jax.random.key(0), s)))
    exact = np.exp((x * y).sum(-1))
    z = (est.mean(0) - exact) / (est.std(0, ddof=1) / math.sqrt(s))
    assert np.abs(z).max() < 5, z


def _qkv(shape=(2, 9, 4)):
    rng = np.random.default_rng(1)
    return tuple(jnp.asarray(rng.standard_normal(shape) / 2) for _ in range(3))


@pytest.mark.parametrize("causal", [False, True])
def test_jit_and_vmap_match_eager(causal: bool) -> None:
    q, k, v = _qkv((3, 2, 9, 4))
    eager = fc.favor_attention(q, k, v, features=FMAP, causal=causal, chunk_size=4)
    jitted = jax.jit(
        lambda q, k, v: fc.favor_attention(q, k, v, features=FMAP, causal=causal, chunk_size=4)
    )
    np.testing.assert_allclose(jitted(q, k, v), eager, rtol=1e-12, atol=1e-14)
    mapped = jax.vmap(
        lambda q, k, v: fc.favor_attention(q, k, v, features=FMAP, causal=causal, chunk_size=4)
    )
    np.testing.assert_allclose(mapped(q, k, v), eager, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("causal", "masked"), [(False, False), (False, True), (True, False), (True, True)]
)
def test_grad_matches_finite_differences(causal: bool, masked: bool) -> None:
    q, k, v = _qkv()
    mask = (
        jnp.asarray(np.random.default_rng(2).random((2, 9)) < 0.7).at[:, 0].set(True)
        if masked
        else None
    )

    # bidirectional calls balance by default with statistics held constant for autograd:
    # their gradient is that of the call with those statistics given (checked below)
    stats = None if causal else fc.balance_statistics(q, k, key_mask=mask)

    def f(q, k, v):  # check_grads' numerical side passes NumPy arrays
        q, k, v = (jnp.asarray(a) for a in (q, k, v))
        return fc.favor_attention(
            q, k, v, features=FMAP, causal=causal, key_mask=mask, chunk_size=4, balance=stats
        )

    # reverse mode: the engine's own backward pass (jax.custom_vjp); forward mode: JAX's
    # autodiff of the standard operations
    check_grads(f, (q, k, v), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)
    with fc.fast_paths(False):
        check_grads(f, (q, k, v), order=1, modes=["fwd"], eps=1e-6, atol=1e-6, rtol=1e-6)
    if not causal:
        default = jax.grad(
            lambda q: fc.favor_attention(q, k, v, features=FMAP, key_mask=mask).sum()
        )(q)
        np.testing.assert_allclose(default, jax.grad(lambda q: f(q, k, v).sum())(q), rtol=1e-12)


def test_redraw_inside_a_jitted_step() -> None:
    q, k, v = _qkv()

    @jax.jit
    def step(key, q, k, v):
        w = fjax.feature_matrix(key, FMAP, 4, jnp.float64)
        return fc.favor_attention(q, k, v, features=FMAP, projection=w)

    a, b, again = (
        step(jax.random.key(0), q, k, v),
        step(jax.random.key(1), q, k, v),
        step(jax.random.key(0), q, k, v),
    )
    np.testing.assert_array_equal(a, again)
    assert not np.allclose(a, b)
    w = fjax.feature_matrix(jax.random.key(0), FMAP, 4, jnp.float64)
    np.testing.assert_allclose(
        a, fc.favor_attention(q, k, v, features=FMAP, projection=w), rtol=1e-12
    )


fflax = pytest.importorskip("favorcore_backends.flax")


def test_flax_module_is_the_core_computation_and_is_causal() -> None:
    layer = fflax.FavorSelfAttention(
        num_heads=2, causal=True, features=FMAP, dtype=jnp.float64, chunk_size=4
    )
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 12, 8)))
    variables = layer.init(jax.random.key(0), x)
    out = layer.apply(variables, x)
    assert out.shape == (2, 12, 8)
    # by hand: the module's projections, the core, the output projection
    p, w = variables["params"], variables["favor"]["projection"]
    heads = [
        jnp.einsum("ble,ehd->bhld", x, p[n]["kernel"]) + p[n]["bias"][None, :, None, :]
        for n in ("query", "key", "value")
    ]
    att = fc.favor_attention(*heads, features=FMAP, causal=True, projection=w, chunk_size=4)
    want = jnp.einsum("bhld,hde->ble", att, p["out"]["kernel"]) + p["out"]["bias"]
    np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-12)
    future = x.at[:, 7:].set(100.0)
    np.testing.assert_allclose(
        layer.apply(variables, future)[:, :7], out[:, :7], rtol=1e-10, atol=1e-12
    )


def test_flax_module_redraw_mask_and_grad() -> None:
    layer = fflax.FavorSelfAttention(num_heads=2, features=FMAP, dtype=jnp.float64)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 10, 8)))
    variables = layer.init(jax.random.key(0), x)
    out, changed = layer.apply(
        variables, x, redraw=True, rngs={"projection": jax.random.key(7)}, mutable=["favor"]
    )
    assert not np.allclose(changed["favor"]["projection"], variables["favor"]["projection"])
    assert not np.allclose(out, layer.apply(variables, x))
    mask = jnp.ones((2, 10), bool).at[1, 6:].set(False)
    dirty = x.at[1, 6:].set(jnp.nan)
    np.testing.assert_allclose(
        layer.apply(variables, dirty, mask)[1, :6],
        layer.apply(variables, x, mask)[1, :6],
        rtol=1e-12,
    )
    grads = jax.grad(lambda p: layer.apply({**variables, "params": p}, x).sum())(
        variables["params"]
    )
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree_util.tree_leaves(grads))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rows": 0, "d": 4}, ValueError, "rows must be a positive integer"),
        ({"rows": 4, "d": 0}, ValueError, "d must be a positive integer"),
        ({"rows": 4, "d": 4, "kind": "qr"}, ValueError, "kind must be one of"),
        ({"rows": 4, "d": 4, "norms": "unit"}, ValueError, "norms must be one of"),
        ({"rows": 4, "d": 6, "kind": "hadamard"}, ValueError, "power of two"),
    ],
)
def test_key_draws_reject_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        fjax.draw_projection(jax.random.key(0), **kwargs)


def test_feature_matrix_and_flax_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="uses no projection"):
        fjax.feature_matrix(jax.random.key(0), fc.GeneralizedFeatures(m=None), 4)
    layer = fflax.FavorSelfAttention(num_heads=3, features=FMAP)
    with pytest.raises(
        ValueError, match=r"qkv_features \(8\) must be a multiple of num_heads \(3\)"
    ):
        layer.init(jax.random.key(0), jnp.ones((1, 4, 8)))


def test_flax_default_map_and_calibrated_causal_statistics() -> None:
    # Default FAVOR++: bidirectional calls balance themselves; causal calls use A = 0, or
    # the statistics of a calibration batch (calibrate=True), and stay causal.
    layer = fflax.FavorSelfAttention(num_heads=2, causal=True, dtype=jnp.float64)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 12, 8)))
    variables = layer.init(jax.random.key(0), x)
    calib = jnp.asarray(np.random.default_rng(6).standard_normal((4, 20, 8)))
    stats = layer.apply(variables, calib, calibrate=True)
    assert stats.query.shape == (1, 2, 4, 4)
    out = layer.apply(variables, x, balance=stats)
    later = x.at[:, 7:].set(5.0)
    np.testing.assert_allclose(layer.apply(variables, later, balance=stats)[:, :7], out[:, :7],
                               rtol=1e-10, atol=1e-12)  # fmt: skip
    plain = layer.apply(variables, x)  # no statistics: A = 0, unbalanced
    assert np.isfinite(plain).all()
    assert not np.allclose(plain, out)
    jitted = jax.jit(lambda v, x, s: layer.apply(v, x, balance=s))(variables, x, stats)
    np.testing.assert_allclose(jitted, out, rtol=1e-10, atol=1e-12)
