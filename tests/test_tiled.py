"""The tiled engine equals the plain core path (conformance of every fast path)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import Backend, to_numpy

import favorcore as fc
from favorcore._compat import compute_dtype
from favorcore._tiled import TiledOps, tiled_attention


class SmallOps(TiledOps):
    """The standard-only steps, with tiny blocks and several work items per row (or every
    row in one block: ``vectorized``)."""

    def __init__(self, block: int, workers: int, vectorized: bool = False) -> None:
        self.block, self.workers, self.vectorized = block, workers, vectorized


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(("block", "workers", "vectorized"),
                         [(7, 1, False), (5, 4, False), (64, 3, False), (7, 1, True), (5, 3, True)])  # fmt: skip
@pytest.mark.parametrize("kind", ["favor+", "hyperbolic", "favor++", "favor++ balanced"])
def test_engine_equals_core_path(
    backend: Backend,
    rng: np.random.Generator,
    causal: bool,
    masked: bool,
    block: int,
    workers: int,
    vectorized: bool,
    kind: str,
) -> None:
    xp = backend.xp
    lq = 23
    lk = 23 if causal else 31
    q, k = rng.standard_normal((2, 3, lq, 8)) / 2, rng.standard_normal((2, 3, lk, 8)) / 2
    v = rng.standard_normal((2, 3, lk, 5))
    mask = rng.random((2, 1, lk)) < 0.7 if masked else None
    kv0 = rng.random((2, 3, 16, 6)) if causal else None
    fmap: fc.PositiveFeatures = {
        "favor+": fc.PositiveFeatures(m=16, seed=3),
        "hyperbolic": fc.hyperbolic_features(16, seed=3),
        # bidirectional: A per batch row and head from the data; causal needs a fixed A
        "favor++": fc.OptimalPositiveFeatures(m=16, seed=3, a=-0.3 if causal else None),
        # given statistics: the engine folds M into the queries, transforms keys per block
        "favor++ balanced": fc.OptimalPositiveFeatures(m=16, seed=3),
    }[kind]
    a = backend.asarray
    key_mask = None if mask is None else a(mask)
    stats = (
        fc.balance_statistics(a(q), a(k), key_mask=key_mask, scale=0.3)
        if kind == "favor++ balanced"
        else None
    )
    carry = stats is not None or not fmap.data_dependent  # else no state can be carried
    with fc.fast_paths(False):
        want = fc.favor_attention(
            a(q), a(k), a(v), features=fmap, causal=causal, key_mask=key_mask, chunk_size=4,
            return_state=carry, state=None if kv0 is None else fc.AttentionState(a(kv0)), scale=0.3,
            balance=False if stats is None else stats,
        )  # fmt: skip
    x, y, vv = a(q), a(k), a(v)
    root = math.sqrt(0.3)
    spread = None if stats is None else stats.spread
    coef = fmap.coefficient(x * root, y * root, key_mask=key_mask, spread=spread)
    dtype = compute_dtype(xp, x.dtype)
    out, kv, _ = tiled_attention(
        xp, SmallOps(block, workers, vectorized), x, y, vv, w=fmap.projection_like(x), root=root, a=coef,
        causal=causal, mask=None if mask is None else key_mask[..., None], chunk=4,
        kv0=None if kv0 is None else a(kv0), batch=(2, 3), balance=stats,
    )  # fmt: skip
    assert out.dtype == dtype
    if carry:
        want, want_state = want
        # the state is the same sum of the same stabilised key features
        np.testing.assert_allclose(to_numpy(kv), to_numpy(want_state.kv), rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(to_numpy(out), to_numpy(want), rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", ["favor+", "favor++"])
def test_registered_fast_path_equals_core_path(
    backend: Backend, rng: np.random.Generator, causal: bool, dtype: str, kind: str
) -> None:
    # A plain favor_attention call reaches the adapter's fast path where one is registered
    # (NumPy, PyTorch); it must agree with the plain core to rounding. Bidirectional
    # calls balance by default; FAVOR++ takes A from the data (a fixed A when causal).
    dt = getattr(backend.xp, dtype)
    q, k, v = (rng.standard_normal((2, 4, 700, 16)).astype(dtype) / 2 for _ in range(3))
    mask = rng.random((2, 1, 700)) < 0.9
    fmap = (
        fc.PositiveFeatures(m=32, seed=0)
        if kind == "favor+"
        else fc.OptimalPositiveFeatures(m=32, seed=0, a=-0.2 if causal else None)
    )
    a = lambda x: backend.asarray(x, dt if x.dtype != bool else None)
    fast = to_numpy(
        fc.favor_attention(a(q), a(k), a(v), features=fmap, causal=causal, key_mask=a(mask))
    )
    with fc.fast_paths(False):
        plain = to_numpy(
            fc.favor_attention(a(q), a(k), a(v), features=fmap, causal=causal, key_mask=a(mask))
        )
    u = float(np.finfo(dtype).eps)
    # both round differently over sums of 700 keys and 32 features (gamma_n bound)
    np.testing.assert_allclose(fast, plain, rtol=0, atol=2 * (700 + 32) * u * np.abs(v).max() * 4)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("huge", ["many", "few"])
def test_fast_path_with_query_norms_from_tiny_to_huge(
    backend: Backend, rng: np.random.Generator, causal: bool, huge: str
) -> None:
    # The NumPy fast path shifts query exponents by a bound computed from |x|; rows whose
    # exponents may fall far below it (large norms) must take the exact row max: no
    # underflow, same result as the core path. "many": norms 1e-3 ... 316 (about a third
    # of the rows above the limit: every row of the block takes the exact max); "few":
    # 5 rows of norm 300 among rows of norm 0.1 (only those rows take it).
    q = rng.standard_normal((1, 2, 600, 16))
    norms = (
        np.logspace(-3, 2.5, 600)
        if huge == "many"
        else np.where(np.arange(600) % 120 == 7, 300.0, 0.1)
    )
    q *= norms[:, None] / np.linalg.norm(q, axis=-1, keepdims=True)
    k, v = rng.standard_normal((1, 2, 600, 16)), rng.standard_normal((1, 2, 600, 16))
    fmap = fc.PositiveFeatures(m=64, seed=1)
    a = backend.asarray
    fast = to_numpy(fc.favor_attention(a(q), a(k), a(v), features=fmap, causal=causal))
    with fc.fast_paths(False):
        plain = to_numpy(fc.favor_attention(a(q), a(k), a(v), features=fmap, causal=causal))
    assert np.isfinite(fast).all()
    np.testing.assert_allclose(fast, plain, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(("rows", "chunk"), [(200, 64), (128, 64), (30, 64), (1, 7), (0, 64)])
def test_registered_causal_step_equals_core(
    backend: Backend, rng: np.random.Generator, rows: int, chunk: int
) -> None:
    # An adapter's in-place causal step (buffers, in-place prefix and masking) against the
    # standard one of [V | 1]: full chunks, a shorter last chunk, with and without a state.
    from favorcore._linear import causal_sums
    from favorcore._registry import lookup

    xp = backend.xp
    ops = lookup(xp, "tiled")
    if ops is None or type(ops).causal is TiledOps.causal:
        pytest.skip(f"{backend.name} has no causal step of its own")
    a = backend.asarray
    qf, kf = a(rng.random((rows, 16))), a(rng.random((rows, 16)))
    vals, kv0 = rng.standard_normal((rows, 5)), a(rng.random((16, 6)))
    v1 = a(np.concatenate([vals, np.ones((rows, 1))], axis=1))
    for state in (None, kv0):
        o, kv = ops.causal(xp, qf, kf, a(vals), state, chunk)
        o_ref, kv_ref = causal_sums(xp, qf, kf, v1, state, chunk)
        np.testing.assert_allclose(to_numpy(o), to_numpy(o_ref), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(to_numpy(kv), to_numpy(kv_ref), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kind", ["favor+", "favor++ balanced"])
def test_adapter_steps_across_blocks_equal_core_path(
    backend: Backend, rng: np.random.Generator, causal: bool, masked: bool, kind: str
) -> None:
    # The registered adapter's own steps (buffers reused from block to block, several work
    # items per row, the causal step, prepared query matrices) with small blocks, against
    # the plain core: many blocks and chunks, a short last one, masks, a carried state.
    import copy

    from favorcore._registry import lookup

    xp = backend.xp
    registered = lookup(xp, "tiled")
    if registered is None:
        pytest.skip(f"{backend.name} has no fast path")
    ops = copy.copy(registered)
    ops.block, ops.chunk = 48, 16
    if ops.workers > 1:
        ops.workers = 3
    lq = 203
    lk = lq if causal else 230
    q, k = rng.standard_normal((2, 3, lq, 8)) / 2, rng.standard_normal((2, 3, lk, 8)) / 2
    v = rng.standard_normal((2, 3, lk, 5))
    mask = rng.random((2, 1, lk)) < 0.7 if masked else None
    kv0 = rng.random((2, 3, 16, 6)) if causal else None
    fmap: fc.PositiveFeatures = (
        fc.PositiveFeatures(m=16, seed=3)
        if kind == "favor+"
        else fc.OptimalPositiveFeatures(m=16, seed=3)
    )
    a = backend.asarray
    key_mask = None if mask is None else a(mask)
    stats = (
        fc.balance_statistics(a(q), a(k), key_mask=key_mask, scale=0.3)
        if kind != "favor+"
        else None
    )
    with fc.fast_paths(False):
        want, want_state = fc.favor_attention(
            a(q), a(k), a(v), features=fmap, causal=causal, key_mask=key_mask, chunk_size=16,
            return_state=True, state=None if kv0 is None else fc.AttentionState(a(kv0)),
            scale=0.3, balance=False if stats is None else stats,
        )  # fmt: skip
    x, y, vv = a(q), a(k), a(v)
    root = math.sqrt(0.3)
    coef = fmap.coefficient(
        x * root, y * root, key_mask=key_mask, spread=None if stats is None else stats.spread
    )
    out, kv, _ = tiled_attention(
        xp, ops, x, y, vv, w=fmap.projection_like(x), root=root, a=coef, causal=causal,
        mask=None if mask is None else key_mask[..., None], chunk=16,
        kv0=None if kv0 is None else a(kv0), batch=(2, 3), balance=stats,
    )  # fmt: skip
    # float64, sums over <= 230 keys and 16 features in another order: rounding ~ (230 + 16)
    # * 1.1e-16 relative (~3e-14), times the exponent's conditioning; 1e-10 leaves room for
    # that and still fails on any wrong chunk, state or mask (errors of order 1)
    np.testing.assert_allclose(to_numpy(kv), to_numpy(want_state.kv), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_numpy(out), to_numpy(want), rtol=1e-10, atol=1e-12)


def test_query_norm_limit_is_a_bound_and_tight() -> None:
    # Below _limit, a query row's largest exponent is within GAP of the fast path's shift
    # |x| R + max c + 1 (so only rows above it need the exact row max).
    from favorcore_backends.numpy import GAP, _limit

    rng = np.random.default_rng(5)
    # one feature: x against w is the worst case, and the bound is tight at the limit
    w, c = rng.standard_normal(8), np.array([3.0])
    n = np.array([np.linalg.norm(w)])
    lim = _limit(n, c)
    for t, ok in ((lim * (1 - 1e-9), True), (lim * (1 + 1e-6), False)):
        x = -t * w / n[0]
        gap = (x @ w + c[0]) - (t * n[0] + c[0] + 1)
        assert (gap >= -GAP) == ok
    # many features, biases spread over 12
    wq = rng.standard_normal((8, 64)) * rng.uniform(0.2, 2.0, 64)
    bias = rng.uniform(-12.0, 0.0, 64)
    norms = np.linalg.norm(wq, axis=0)
    lim = _limit(norms, bias)
    assert 0 < lim < np.inf
    # the limit is where the bound max_j (c_j - t n_j) - t R - max c - 1 crosses -GAP
    bound = lambda t: (bias - t * norms).max() - t * norms.max() - bias.max() - 1
    assert bound(lim) == pytest.approx(-GAP, rel=1e-12)
    assert bound(lim * (1 + 1e-6)) < -GAP
    # and rows of every norm up to the limit are within it (soundness, on random rows)
    x = rng.standard_normal((4000, 8))
    x *= rng.uniform(0, lim, (4000, 1)) / np.linalg.norm(x, axis=1, keepdims=True)
    top = (x @ wq + bias).max(axis=1)
    shift = np.linalg.norm(x, axis=1) * norms.max() + bias.max() + 1
    assert (top - shift >= -GAP).all()
    # a zero projection: every exponent is its bias, the largest is the shift minus 1
    assert _limit(np.zeros(3), np.array([0.0, -50.0, -2.0])) == np.inf


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("weak_rows", [0, 1, 20])
def test_numpy_bound_trusted_then_checked(
    monkeypatch: pytest.MonkeyPatch, causal: bool, weak_rows: int
) -> None:
    # NumPy's fast path trusts its bound shift for rows above the norm limit when the
    # largest-norm ones (the probe) are within GAP of it, and checks the others
    # after the products through their normaliser. Here the probe rows are aligned with
    # the longest projection row (exponent ~ the bound), and rows of smaller norm are
    # anti-aligned with every row (exponents ~ 1.5 |x| R below the bound: their float32
    # features underflow to 0 with the bound shift). They must be caught and
    # recomputed with the exact row max: those rows alone (causal too), or the whole
    # causal block once they are more than an eighth of it.
    import array_api_compat.numpy

    from favorcore._registry import lookup, register_step

    fnumpy = pytest.importorskip("favorcore_backends.numpy")
    rng = np.random.default_rng(5)
    d, m, n = 16, 4, 100
    fmap = fc.PositiveFeatures(m=m, seed=0)
    w = np.asarray(fmap.projection_like(np.zeros((1, d))), dtype=np.float64)  # (m, d)
    lengths = np.linalg.norm(w, axis=1)
    s = 80.0 / lengths.max()  # ~ -1.5 * 80 = -120 below the bound for the weak rows
    q = rng.standard_normal((1, 1, n, d)) * 0.05
    q[0, 0, :20] = 2 * s * w[np.argmax(lengths)] / lengths.max()  # the probe: aligned
    u = (w / lengths[:, None]).sum(axis=0)
    q[0, 0, 50 : 50 + weak_rows] = -s * u / np.linalg.norm(u)  # every w . x < 0
    k, v = rng.standard_normal((1, 1, n, d)) * 0.3, rng.standard_normal((1, 1, n, d))
    q, k, v = (a.astype(np.float32) for a in (q, k, v))
    calls = []
    exact = fnumpy.NumpyOps._exact
    monkeypatch.setattr(
        fnumpy.NumpyOps, "_exact", staticmethod(lambda x, wq: calls.append(len(x)) or exact(x, wq))
    )
    kw = {"features": fmap, "causal": causal, "balance": False, "scale": 1.0}
    registered = lookup(array_api_compat.numpy, "tiled")
    register_step("array_api_compat.numpy", "tiled", fnumpy.NumpyOps(workers=1))  # one block
    try:
        fast = fc.favor_attention(q, k, v, **kw)
    finally:
        register_step("array_api_compat.numpy", "tiled", registered)
    with fc.fast_paths(False):
        plain = fc.favor_attention(q, k, v, **kw)
    assert calls == ([] if not weak_rows else [n] if causal and weak_rows > 1 else [weak_rows])
    # float32 sums over 100 keys and 4 features in another order: the gamma_n bound, as in
    # test_registered_fast_path_equals_core_path (~3e-4); the weak rows' outputs would be 0
    # (an underflowed normaliser, and a warning) without the check: errors of order 1
    u = float(np.finfo(np.float32).eps)
    np.testing.assert_allclose(fast, plain, rtol=0, atol=2 * (n + m) * u * np.abs(v).max() * 4)


def test_features_below_the_normal_range_are_flushed() -> None:
    # The fast paths' exp: features that would be denormal (10-100x slower on x86, in the
    # exp and in every product after it) are 0; others are exp's own; NaN stays NaN; the
    # lower bound only spares reading the exponents for their min.
    fnumpy = pytest.importorskip("favorcore_backends.numpy")
    tiny = np.finfo(np.float32).smallest_normal
    e = np.array([-300, -103.5, -95, -87.5, -87.3, -87.0, -60, 0, 3, np.nan], np.float32)
    floor = fnumpy._floor(np.float32)
    assert np.exp(np.float32(floor)) >= tiny > np.exp(np.nextafter(np.float32(floor), -np.inf))
    want = np.where(np.isnan(e) | (e >= floor), np.exp(e), 0.0)
    for lower in (-np.inf, -400.0):
        got = fnumpy._exp(e.copy(), lower)
        np.testing.assert_array_equal(got, want)
        assert not ((got > 0) & (got < tiny)).any()
    np.testing.assert_array_equal(fnumpy._exp(e[6:9].copy(), -70.0), np.exp(e[6:9]))
    torch = pytest.importorskip("torch")
    ftorch = pytest.importorskip("favorcore_backends.torch")
    got_t = ftorch._exp_(torch.from_numpy(e.copy()), -np.inf).numpy()
    # PyTorch zeroes up to twice the smallest normal number in the same pass
    np.testing.assert_array_equal(got_t, np.where(np.isnan(want) | (want > 2 * tiny), want, 0.0))


@pytest.mark.parametrize("causal", [False, True])
def test_fast_path_with_keys_of_large_norm(
    backend: Backend, rng: np.random.Generator, causal: bool
) -> None:
    # Keys of large norm give key features far below 1 (-|y|^2 / 2 in the exponent):
    # float32 features under the normal range are flushed to 0 by the fast paths, which
    # must still agree with the plain core path to float32 rounding.
    q = rng.standard_normal((1, 2, 300, 16)).astype(np.float32)
    k = (rng.standard_normal((1, 2, 300, 16)) * 6.5).astype(np.float32)
    k[..., :150, :] /= 6  # half the keys ordinary, so the normalisers stay normal
    v = rng.standard_normal((1, 2, 300, 16)).astype(np.float32)
    fmap = fc.PositiveFeatures(m=64, seed=2)
    a = backend.asarray
    kw = {"features": fmap, "causal": causal, "balance": False}
    fast = to_numpy(fc.favor_attention(a(q), a(k), a(v), **kw))
    with fc.fast_paths(False):
        plain = to_numpy(fc.favor_attention(a(q), a(k), a(v), **kw))
    assert np.isfinite(fast).all()
    # float32 sums over <= 300 keys and 64 features in another order: the gamma_n bound,
    # as in test_registered_fast_path_equals_core_path; flushed features (< 1.2e-38 each,
    # against normalisers of ordinary keys' features) change nothing at this precision
    u = float(np.finfo(np.float32).eps)
    np.testing.assert_allclose(fast, plain, rtol=0, atol=2 * (300 + 64) * u * np.abs(v).max() * 4)


def test_flush_to_zero_is_scoped_to_its_block_and_reports_underflow() -> None:
    # The NumPy causal step sets flush-to-zero around one product (x86-64 Linux): inside,
    # a result below the smallest normal number is 0 and the underflow is reported; after
    # it, and meanwhile in the other threads, gradual underflow is as before.
    import platform
    import sys
    import threading

    fenv = pytest.importorskip("favorcore_backends._fenv")
    if not (sys.platform.startswith("linux") and platform.machine() == "x86_64"):
        pytest.skip(
            "flush-to-zero is set only on x86-64 Linux (the NumPy step then flushes nothing)"
        )
    # here it must work: a failing self-test would silently lose the speed, not the accuracy
    assert fenv.supported()

    a, b = np.float32(2.0**-100), np.float32(2.0**-30)
    other: list[float] = []
    go = threading.Event()
    thread = threading.Thread(target=lambda: (go.wait(), other.append(float(a * b))))
    thread.start()  # (a thread started inside the block would inherit the mode)
    with fenv.flush_to_zero() as flush:
        inside = float(a * b)
        go.set()
        thread.join()
    assert (inside, flush.underflowed) == (0.0, True)
    assert other == [2.0**-130]
    assert float(a * b) == 2.0**-130
    with fenv.flush_to_zero() as flush:
        normal = float(a * np.float32(2.0**20))
    assert (normal, flush.underflowed) == (2.0**-80, False)


@pytest.mark.parametrize("tiny_rows", [3, 64])
def test_numpy_causal_step_recomputes_rows_the_flush_changed(
    rng: np.random.Generator, tiny_rows: int
) -> None:
    # Rows whose keys so far all have features of 2^-65 with queries of 2^-65: each score
    # product is 2^-130, below the normal range, so the flushed product gives them 0 and
    # a normaliser of 0 (result 0), while their true normaliser (i + 1) m 2^-130 is a
    # normal number: they must be recomputed, exactly (the products are exact denormals).
    fnumpy = pytest.importorskip("favorcore_backends.numpy")
    rows, m, dv, chunk = 256, 32, 8, 64
    qf = rng.random((rows, m)).astype(np.float32) + 0.5
    kf = rng.random((rows, m)).astype(np.float32) + 0.5
    qf[:tiny_rows] = kf[:tiny_rows] = 2.0**-65
    v = rng.standard_normal((rows, dv)).astype(np.float32)
    o, kv = fnumpy.NumpyOps(workers=1).causal(np, qf, kf, v, None, chunk)
    q64, k64 = qf.astype(np.float64), kf.astype(np.float64)
    scores = np.tril(q64 @ k64.T)
    want = (scores @ v) / scores.sum(axis=1, keepdims=True)
    got = o[:, :dv] / o[:, dv:]
    # float32 rounding of sums of <= 256 + 32 terms of one sign (gamma_n, relative)
    u = float(np.finfo(np.float32).eps)
    np.testing.assert_allclose(got, want, rtol=0, atol=2 * (rows + m) * u * np.abs(v).max())
    np.testing.assert_allclose(kv[:, :dv], k64.T @ v, rtol=2 * rows * u)
