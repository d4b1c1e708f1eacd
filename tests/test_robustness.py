"""Hostile and extreme input: properties over shapes, stress, NaN, determinism, fuzzing."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import reference as ref
from helpers import Backend, to_numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import favorcore as fc

lazy_xp_modules = [fc]  # see conftest.py: jax.jit on JAX, no compute on Dask

FULL = {"numpy", "array_api_strict"}  # the full property runs; a smaller one elsewhere


def _examples(backend: Backend, full: int) -> int:
    return full if backend.name in FULL else max(full // 5, 4)


shapes = st.fixed_dictionaries(
    {
        "batch": st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple),
        "lq": st.integers(1, 40),
        "lk": st.integers(1, 40),
        "d": st.integers(1, 9),
        "dv": st.integers(1, 6),
        "m": st.sampled_from([2, 4, 6, 16, 24]),
        "chunk": st.integers(1, 17),
        "causal": st.booleans(),
        "masked": st.booleans(),
        "seed": st.integers(0, 2**16),
    }
)


@pytest.mark.parametrize("fmap_name", ["positive", "hyperbolic", "relu"])
def test_properties_over_shapes(backend: Backend, fmap_name: str) -> None:
    # The core invariants on random shapes: L = 1, L not a multiple of the chunk, Lq != Lk,
    # 0-3 batch dims, d = 1, m < d and m > d, masks. Linear attention equals the quadratic
    # formula on the library's own features, outputs have the input dtype and shape, causal
    # prefixes are the prefix call, and masked keys never matter.

    @settings(max_examples=_examples(backend, 60), deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
    @given(shapes)
    def run(s: dict) -> None:
        rng = np.random.default_rng(s["seed"])
        lk = s["lq"] if s["causal"] else s["lk"]
        q = rng.standard_normal((*s["batch"], s["lq"], s["d"])) / 2
        k = rng.standard_normal((*s["batch"], lk, s["d"])) / 2
        v = rng.standard_normal((*s["batch"], lk, s["dv"]))
        mask = rng.random((*s["batch"], lk)) < 0.7 if s["masked"] else None
        fmap = {
            "positive": fc.PositiveFeatures(m=s["m"], seed=1),
            "hyperbolic": fc.hyperbolic_features(s["m"], seed=1),
            "relu": fc.GeneralizedFeatures(kernel="relu", m=s["m"], seed=1),
        }[fmap_name]
        a = backend.asarray
        km = None if mask is None else a(mask)
        out = fc.favor_attention(
            a(q), a(k), a(v), features=fmap, causal=s["causal"], key_mask=km, chunk_size=s["chunk"]
        )
        got = to_numpy(out)
        assert got.shape == (*s["batch"], s["lq"], s["dv"])
        assert out.dtype == backend.xp.float64
        assert np.isfinite(got).all()
        root = s["d"] ** -0.25
        if fmap_name != "relu" and not s["causal"]:  # balanced by default: the same rows
            x, y = fc.apply_balance(a(q), a(k), fc.balance_statistics(a(q), a(k), key_mask=km))
            qf, kf = fmap(x, y)
        else:
            qf, kf = fmap(a(q * root), a(k * root))
        want = ref.quadratic_attention(
            to_numpy(qf), to_numpy(kf), v, causal=s["causal"], key_mask=mask
        )
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)
        if s["causal"] and s["lq"] > 1:
            t = s["lq"] // 2
            pre = fc.favor_attention(
                a(q[..., :t, :]), a(k[..., :t, :]), a(v[..., :t, :]), features=fmap, causal=True,
                key_mask=None if mask is None else a(mask[..., :t]), chunk_size=s["chunk"],
            )  # fmt: skip
            np.testing.assert_allclose(got[..., :t, :], to_numpy(pre), rtol=1e-9, atol=1e-11)

    run()


@pytest.mark.parametrize("norm", [1e-3, 1e-1, 1.0, 10.0, 1e2, 1e3])
@pytest.mark.parametrize("antithetic", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_positive_maps_stay_finite_at_any_norm(
    backend: Backend, norm: float, antithetic: bool, dtype: str
) -> None:
    # Positive features bound every key feature and take the row max out of queries:
    # whatever the norms, the output is finite and a convex combination of the values.
    rng = np.random.default_rng(0)
    q, k = (rng.standard_normal((2, 50, 16)) for _ in range(2))
    q *= norm / np.linalg.norm(q, axis=-1, keepdims=True)
    k *= norm / np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((2, 50, 4))
    dt = getattr(backend.xp, dtype)
    a = lambda x: backend.asarray(x, dt)
    fmap = fc.PositiveFeatures(m=32, seed=0, antithetic=antithetic)
    for causal in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", fc.AccuracyWarning)
            out = to_numpy(fc.favor_attention(a(q), a(k), a(v), features=fmap, causal=causal))
        assert np.isfinite(out).all()
        slack = 1e-3 if dtype == "float32" else 1e-9
        # a convex combination of (causally visible) values: within their range
        assert (out <= v.max() + slack).all()
        assert (out >= v.min() - slack).all()
        # rows set to 0 because their normaliser underflowed are never silent (eager arrays)
        if backend.name not in ("jax", "dask"):
            zero_rows = bool((out == 0).all(-1).any())
            warned = any(issubclass(w.category, fc.AccuracyWarning) for w in caught)
            assert zero_rows == warned, (norm, causal)


def test_one_token_and_all_masked(backend: Backend) -> None:
    a = backend.asarray
    x = a(np.ones((3, 1, 4)))
    fmap = fc.PositiveFeatures(m=8, seed=0)
    for causal in (False, True):
        out = to_numpy(fc.favor_attention(x, x, x, features=fmap, causal=causal))
        np.testing.assert_allclose(out, 1.0, rtol=1e-12)  # one key: its value
        none = to_numpy(
            fc.favor_attention(
                x, x, x, features=fmap, causal=causal, key_mask=a(np.zeros((3, 1), bool))
            )
        )
        np.testing.assert_array_equal(none, 0.0)


def test_very_long_causal_sequence_numpy() -> None:
    # 2^20 tokens (1 head): finite, and the first 2048 outputs equal the call on them alone
    rng = np.random.default_rng(0)
    L = 2**20
    q, k, v = (rng.standard_normal((1, L, 16)).astype(np.float32) * 0.5 for _ in range(3))
    fmap = fc.PositiveFeatures(m=32, seed=0)
    out = fc.favor_attention(q, k, v, features=fmap, causal=True)
    assert np.isfinite(out).all()
    head = fc.favor_attention(q[:, :2048], k[:, :2048], v[:, :2048], features=fmap, causal=True)
    np.testing.assert_allclose(out[:, :2048], head, rtol=2e-4, atol=2e-5)


@pytest.mark.filterwarnings("ignore::favorcore.AccuracyWarning")  # norm 30: underflow, warned
def test_torch_half_precision_backward_is_finite() -> None:
    torch = pytest.importorskip("torch")
    for dtype in (torch.float16, torch.bfloat16):
        for norm in (1e-3, 1.0, 30.0):
            q, k, v = (torch.randn(2, 64, 16) for _ in range(3))
            q = (q * norm / q.norm(dim=-1, keepdim=True)).to(dtype).requires_grad_()
            k = (k * norm / k.norm(dim=-1, keepdim=True)).to(dtype).requires_grad_()
            v = v.to(dtype).requires_grad_()
            for causal in (False, True):
                out = fc.favor_attention(
                    q, k, v, features=fc.hyperbolic_features(32, seed=0), causal=causal
                )
                assert out.dtype == dtype
                assert torch.isfinite(out).all()
                grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
                assert all(bool(torch.isfinite(g).all()) for g in grads), (dtype, norm, causal)


def test_trigonometric_features_refuse_overflow_and_warn(backend: Backend) -> None:
    if backend.name in ("jax", "dask"):
        pytest.skip("lazy arrays are not read: NaN/inf propagate instead (documented)")
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 40, 8)) for _ in range(3))
    a = backend.asarray
    trig = fc.TrigonometricFeatures(m=32, seed=0)
    with pytest.raises(ValueError, match="keys too large for trigonometric features"):
        fc.favor_attention(a(q), a(k * 100), a(v), features=trig)
    with pytest.warns(fc.AccuracyWarning, match="normaliser <= 0"):
        fc.favor_attention(a(q * 4), a(k * 4), a(v), features=trig)


def test_check_finite(backend: Backend) -> None:
    if backend.name in ("jax", "dask"):
        pytest.skip("lazy arrays are not read (documented): check_finite does nothing there")
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 10, 4)) for _ in range(3))
    a = backend.asarray
    fmap = fc.PositiveFeatures(m=8, seed=0)
    bad = q.copy()
    bad[0, 3, 1] = np.nan
    with pytest.raises(ValueError, match="q holds NaN or inf"):
        fc.favor_attention(a(bad), a(k), a(v), features=fmap)
    with pytest.raises(ValueError, match="k holds NaN or inf at unmasked positions"):
        fc.favor_attention(a(q), a(bad), a(v), features=fmap)
    with pytest.raises(ValueError, match="v holds NaN or inf"):
        fc.softmax_attention(a(q), a(k), a(bad), causal=True)
    mask = np.ones((2, 10), bool)
    mask[0, 3] = False  # the NaN is padding: allowed
    out = to_numpy(fc.favor_attention(a(q), a(bad), a(bad), features=fmap, key_mask=a(mask)))
    assert np.isfinite(out).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        skipped = to_numpy(
            fc.favor_attention(a(bad), a(k), a(v), features=fmap, check_finite=False)
        )
    assert np.isnan(skipped[0, 3]).all()
    assert np.isfinite(skipped[1]).all()  # NaN stays in the rows it touches


def test_check_finite_when_the_sum_overflows(backend: Backend) -> None:
    """The check sums first (one pass); finite values whose sum overflows still pass."""
    if backend.name in ("jax", "dask"):
        pytest.skip("lazy arrays are not read (documented): check_finite does nothing there")
    rng = np.random.default_rng(1)
    q, k = (0.1 * rng.standard_normal((1, 6, 4)) for _ in range(2))
    big = np.full((1, 6, 4), 3e38, dtype=np.float32)  # finite; their float32 sum is inf
    a = backend.asarray
    fmap = fc.PositiveFeatures(m=8, seed=0)
    out = to_numpy(fc.favor_attention(a(q.astype(np.float32)), a(k.astype(np.float32)), a(big),
                                      features=fmap))  # fmt: skip
    assert np.isfinite(out).all()
    opposite = big.copy()
    opposite[0, 0, 0], opposite[0, 1, 0] = np.inf, -np.inf  # their sum is NaN, not inf
    with pytest.raises(ValueError, match="v holds NaN or inf"):
        fc.favor_attention(a(q.astype(np.float32)), a(k.astype(np.float32)), a(opposite),
                           features=fmap)  # fmt: skip


def test_arrays_on_two_devices_raise() -> None:
    strict = pytest.importorskip("array_api_strict")
    x = np.ones((5, 4))
    one, other = strict.asarray(x, device=strict.Device("device1")), strict.asarray(x)
    with pytest.raises(ValueError, match="arrays on more than one device"):
        fc.favor_attention(one, other, one, features=fc.PositiveFeatures(m=4, seed=0))


def test_bit_identical_run_to_run(backend: Backend) -> None:
    if backend.name in ("cupy", "torch_cuda"):
        pytest.skip("GPU reductions may reorder; the promise is for the CPU backends")
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 4, 700, 16)) for _ in range(3))
    a = backend.asarray
    fmap = fc.PositiveFeatures(m=64, seed=3)
    for causal in (False, True):
        runs = [
            to_numpy(fc.favor_attention(a(q), a(k), a(v), features=fmap, causal=causal))
            for _ in range(3)
        ]
        for r in runs[1:]:
            np.testing.assert_array_equal(r, runs[0])
    np.testing.assert_array_equal(
        fc.PositiveFeatures(m=64, seed=3).host_projection(16), fmap.host_projection(16)
    )


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    batch=st.lists(st.integers(0, 3), max_size=2).map(tuple),
    lq=st.integers(0, 6), lk=st.integers(0, 6), d=st.integers(0, 4), dk=st.integers(0, 4),
    dv=st.integers(0, 3), dtype=st.sampled_from(["float32", "float64", "int64", "bool"]),
    dtype_k=st.sampled_from(["same", "float32", "float64"]),
    causal=st.booleans(), mask=st.sampled_from([None, "ok", "short", "int", "scalar"]),
    chunk=st.sampled_from([None, 1, 0, -3, 2.5]), scale=st.sampled_from([None, 0.5, 0.0, -1.0, float("nan")]),
    values=st.sampled_from(["normal", "nan", "inf", "huge", "zero"]),
)  # fmt: skip
def test_fuzz_public_entry_points(
    batch, lq, lk, d, dk, dv, dtype, dtype_k, causal, mask, chunk, scale, values
) -> None:
    # Any combination either returns a finite array of the documented shape and dtype, or
    # raises ValueError/TypeError -- never a crash, a hang, or a silent NaN.
    rng = np.random.default_rng(0)
    fill = {"normal": 1.0, "nan": np.nan, "inf": np.inf, "huge": 1e30, "zero": 0.0}[values]
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf cast to ints: the test's own input
        q = (rng.standard_normal((*batch, lq, d)) * (1.0 if values == "normal" else fill)).astype(
            dtype
        )
        k = rng.standard_normal((*batch, lk, dk)).astype(dtype if dtype_k == "same" else dtype_k)
        v = rng.standard_normal((*batch, lk, dv)).astype(dtype)
    key_mask = {
        None: None, "ok": rng.random((*batch, lk)) < 0.5, "short": np.ones((*batch, lk + 1), bool),
        "int": np.ones((*batch, lk), np.int64), "scalar": np.array(True),
    }[mask]  # fmt: skip
    calls = [
        lambda: fc.favor_attention(q, k, v, features=fc.PositiveFeatures(m=4, seed=0), causal=causal,
                                   key_mask=key_mask, chunk_size=chunk, scale=scale),
        lambda: fc.softmax_attention(q, k, v, causal=causal, key_mask=key_mask, scale=scale),
        lambda: fc.linear_attention(np.abs(q), np.abs(k), v, causal=causal, key_mask=key_mask, chunk_size=chunk),
    ]  # fmt: skip
    for call in calls:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                out = call()
        except (ValueError, TypeError):
            continue
        assert out.shape == (*batch, lq, dv)
        assert np.isfinite(out).all()


def test_estimate_error_suggests_m() -> None:
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 4, 300, 16)) * 0.3
    est = fc.estimate_error(q, q, ms=(16, 64, 256, 1024), seeds=3, target=0.05)
    assert list(est.errors) == sorted(est.errors, reverse=True)  # falls with m
    assert est.suggested_m == 256  # measured (FAVOR++, balanced): 0.35, 0.080, 0.041, 0.020
    plain = fc.estimate_error(q, q, features=fc.PositiveFeatures(), ms=(256,), seeds=3)
    assert plain.errors[0] > 2 * est.errors[2]  # FAVOR+ (also balanced), measured: 0.15
    assert str(est.suggested_m) in str(est)
    hard = fc.estimate_error(q * 5, q * 5, ms=(16, 32), seeds=2, target=0.01)
    assert hard.suggested_m is None
    assert "no m up to 32" in str(hard)
    with pytest.raises(ValueError, match="ms must be positive integers"):
        fc.estimate_error(q, q, ms=(0,))
    torch = pytest.importorskip("torch")
    est_t = fc.estimate_error(
        torch.as_tensor(q, dtype=torch.float16), torch.as_tensor(q), ms=(64,), seeds=1
    )
    assert 0 < est_t.errors[0] < 1
