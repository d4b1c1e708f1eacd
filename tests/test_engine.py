"""The engine: every path (standard and adapters' operations, any blocks, work items,
chunks) against the naive float64 reference, and the contract's shape."""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from collections.abc import Iterator

import numpy as np
import pytest
import reference as ref
from helpers import Backend, to_numpy

import favorcore as fc
from favorcore.steps import Steps, register_steps, steps_for


@contextlib.contextmanager
def registered(xp, steps: Steps) -> Iterator[Steps]:
    """``steps`` registered for ``xp`` inside the block."""
    before = steps_for(xp)
    register_steps(xp.__name__, steps)
    try:
        yield steps
    finally:
        register_steps(xp.__name__, before)


def _configurations(xp) -> dict[str, Steps]:
    """The standard operations on tiny eager and vectorized blocks, with several work items,
    and the backend's registered operations on small blocks."""
    own = copy.copy(steps_for(xp))
    own.block = 48
    configs = {
        "standard eager": Steps(block=7, vectorized=False),
        "standard vectorized": Steps(block=5),
        "registered": own,
    }

    class Workers(Steps):
        workers = 3

    configs["standard workers"] = Workers(block=9, vectorized=False)
    return configs


KINDS = ["favor+", "hyperbolic", "favor++ fixed", "favor++ data", "favor++ balanced", "default"]


def _a_star(rho: np.ndarray) -> np.ndarray:
    """FAVOR++'s A*(rho), written out (arXiv 2205.15317)."""
    return (1 - 2 * rho - np.sqrt((2 * rho + 1) ** 2 + 8 * rho)) / 16


def _case(kind, causal, q, k, mask, a):
    """``(features, balance argument, naive A, naive balance, carries a state)``."""
    d, s = q.shape[-1], 0.3
    maps = {
        "favor+": fc.PositiveFeatures(m=16, seed=3),
        "hyperbolic": fc.hyperbolic_features(16, seed=3),
        "favor++ fixed": fc.OptimalPositiveFeatures(m=16, seed=3, a=-0.3),
        "favor++ data": fc.OptimalPositiveFeatures(m=16, seed=3),
        "favor++ balanced": fc.OptimalPositiveFeatures(m=16, seed=3),
        "default": None,
    }
    fmap = maps[kind]
    if kind in ("favor+", "hyperbolic"):
        return fmap, False, 0.0, None, True
    if kind == "favor++ fixed":
        return fmap, False, -0.3, None, True
    if kind == "favor++ data":  # A* of mean_ij |x_i + y_j|^2 over the valid pairs
        x, y = math.sqrt(s) * q, math.sqrt(s) * np.where(np.isnan(k), 0.0, k)
        pair = ((x[..., :, None, :] + y[..., None, :, :]) ** 2).sum(-1)
        valid = (
            np.ones(pair.shape, bool)
            if mask is None
            else np.broadcast_to(mask[..., None, :], pair.shape)
        )
        rho = (pair * valid).sum((-2, -1)) / valid.sum((-2, -1)) / d
        return fmap, False, _a_star(rho)[..., None, None], None, False
    if kind == "default" and causal:  # its causal form: A = 0, no balance
        return fmap, None, 0.0, None, True
    key_mask = None if mask is None else a(mask)
    stats = fc.balance_statistics(a(q), a(k), key_mask=key_mask, scale=s)
    host = [to_numpy(t) for t in stats]
    coef = _a_star(host[3] / d)
    if kind == "default":  # the per-call balance: the same statistics, computed inside
        return fmap, None, coef, host, False
    return fmap, stats, coef, host, True


@pytest.mark.parametrize(
    "config", ["standard eager", "standard vectorized", "standard workers", "registered"]
)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(  # (a data-dependent A is refused in causal calls: test_oprf)
    ("kind", "causal"),
    [(k, c) for k in KINDS for c in (False, True) if (k, c) != ("favor++ data", True)],
)
def test_every_path_equals_the_naive_reference(
    backend: Backend, rng: np.random.Generator, config: str, causal: bool, masked: bool, kind: str
) -> None:
    lq = 61
    lk = lq if causal else 75
    q, k = rng.standard_normal((2, 3, lq, 8)) / 2, rng.standard_normal((2, 3, lk, 8)) / 2
    v = rng.standard_normal((2, 3, lk, 5))
    mask = rng.random((2, 1, lk)) < 0.7 if masked else None
    if mask is not None:  # masked garbage never reaches the result
        k = np.where(mask[..., None], k, np.nan)
        v = np.where(mask[..., None], v, np.inf)
    a = backend.asarray
    fmap, balance, coef, stats, carries = _case(kind, causal, q, k, mask, a)
    used = fc.resolve(fmap, causal=causal, balance=balance, return_state=carries)[0]
    kv0 = rng.random((2, 3, used.num_features(8), 6)) if carries else None
    with registered(backend.xp, _configurations(backend.xp)[config]):
        got = fc.favor_attention(
            a(q), a(k), a(v), features=fmap, causal=causal, key_mask=None if mask is None else a(mask),
            chunk_size=4, scale=0.3, balance=balance, return_state=carries,
            state=None if kv0 is None else fc.AttentionState(a(kv0)), check_finite=not masked,
        )  # fmt: skip
    want, want_kv = ref.naive_favor(q, k, v, used.feature_matrix(8), a=coef, balance=stats,
                                    scale=0.3, causal=causal, key_mask=mask, kv0=kv0)  # fmt: skip
    # float64 sums of <= 75 keys and 16 features in another order (~1e-14 relative) times
    # the exponent's conditioning; 1e-10 still fails on any wrong chunk, state, block,
    # mask or statistic (errors of order 1e-2 and more)
    if carries:
        got, state = got
        np.testing.assert_allclose(to_numpy(state.kv), want_kv, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_numpy(got), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("config", ["standard eager", "standard vectorized", "registered"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", ["trigonometric", "generalized", "subclass"])
def test_maps_without_an_exponent_run_the_same_schedule(
    backend: Backend, rng: np.random.Generator, config: str, causal: bool, name: str
) -> None:
    # Maps that give only row features (and a user's subclass) run block by block like
    # the others: the quadratic formula of their own features.
    class Squares(fc.FeatureMap):
        def query_features(self, xp, x, w):
            return (x @ xp.matrix_transpose(w)) ** 2 + 0.1

        key_features = query_features

        def phi(self, x):  # pragma: no cover - not used here
            raise NotImplementedError

    fmap = {
        "trigonometric": fc.TrigonometricFeatures(m=32, seed=1),
        "generalized": fc.GeneralizedFeatures(kernel="elu+1", m=12, seed=1),
        "subclass": Squares(m=12, seed=1),
    }[name]
    q, k = rng.standard_normal((2, 37, 6)) / 3, rng.standard_normal((2, 37, 6)) / 3
    v = rng.standard_normal((2, 37, 4))
    mask = rng.random((2, 37)) < 0.8
    xp, a = backend.xp, backend.asarray
    with registered(xp, _configurations(xp)[config]):
        got = fc.favor_attention(a(q), a(k), a(v), features=fmap, causal=causal,
                                 key_mask=a(mask), chunk_size=4, scale=1.0)  # fmt: skip
    w = fmap.feature_matrix(6)
    qf = to_numpy(fmap.query_features(np, q, w))
    kf = to_numpy(fmap.key_features(np, k, w))
    want = ref.quadratic_attention(qf, kf, v, causal=causal, key_mask=mask)
    np.testing.assert_allclose(to_numpy(got), want, rtol=1e-10, atol=1e-12)


def test_linear_attention_runs_the_schedule(backend: Backend, rng: np.random.Generator) -> None:
    qf, kf = rng.random((3, 40, 7)), rng.random((3, 40, 7))
    v = rng.standard_normal((3, 40, 2))
    xp, a = backend.xp, backend.asarray
    for causal in (False, True):
        with registered(xp, Steps(block=6, vectorized=False)):
            got = fc.linear_attention(a(qf), a(kf), a(v), causal=causal, chunk_size=5)
        want = ref.quadratic_attention(qf, kf, v, causal=causal)
        np.testing.assert_allclose(to_numpy(got), want, rtol=1e-12, atol=1e-13)


class _Recording:
    """Wraps a Steps instance: counts each operation and fails on a nested one (an
    operation entered while another runs in the same call: a second crossing)."""

    OPERATIONS = ("keys", "key_sums", "answer", "causal")

    def __init__(self, inner: Steps) -> None:
        self.inner, self.calls, self.depth = inner, dict.fromkeys(self.OPERATIONS, 0), 0

    def make(self) -> Steps:
        rec = self

        class Recorded(type(self.inner)):  # type: ignore[misc]
            pass

        steps = copy.copy(self.inner)
        steps.__class__ = Recorded
        for name in self.OPERATIONS:
            op = getattr(type(self.inner), name)

            def wrapper(self, *args, _op=op, _name=name, **kw):
                assert rec.depth == 0, f"{_name} called inside another operation"
                rec.depth += 1
                rec.calls[_name] += 1
                try:
                    return _op(self, *args, **kw)
                finally:
                    rec.depth -= 1

            setattr(Recorded, name, wrapper)
        return steps


@pytest.mark.parametrize("causal", [False, True])
def test_one_crossing_per_operation(
    backend: Backend, rng: np.random.Generator, causal: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The schedule calls each operation of the registered steps once per block (and the
    # causal operation once per piece: full chunks, then the rest); an adapter's
    # operation runs whole, without calling another operation or the standard ones.
    xp, a = backend.xp, backend.asarray
    inner = copy.copy(steps_for(xp))
    inner.block = 64
    rec = _Recording(inner)
    standard_calls = []
    own = [n for n in rec.OPERATIONS if getattr(type(inner), n) is not getattr(Steps, n)]
    if own:  # an adapter's own operations must not fall back on the standard ones
        for name in rec.OPERATIONS:
            base = getattr(Steps, name)
            monkeypatch.setattr(
                Steps,
                name,
                lambda self, *args, _b=base, _n=name, **kw: (
                    standard_calls.append(_n) or _b(self, *args, **kw)
                ),
            )
    q, k, v = (rng.standard_normal((2, 200, 8)) / 2 for _ in range(3))
    with registered(xp, rec.make()) as steps:
        fc.favor_attention(a(q), a(k), a(v), features=fc.PositiveFeatures(m=16, seed=0),
                           causal=causal, balance=False, chunk_size=16)  # fmt: skip
    groups = 1 if steps.vectorized else 2
    bounds = steps.blocks(a(q), 0, 200, 16 if causal else None)
    blocks = len(bounds) * groups
    if causal:  # a block is passed as its full chunks of 16 rows, then the rest
        pieces = sum(((e - s) // 16 > 0) + ((e - s) % 16 > 0) for s, e in bounds) * groups
        assert rec.calls["causal"] == pieces
        assert rec.calls["answer"] == 0
        assert rec.calls["keys"] >= blocks  # (segments but the last also sum their keys)
    else:
        assert rec.calls["answer"] == blocks
        assert rec.calls["key_sums"] == rec.calls["keys"] == blocks
    assert standard_calls == []


def test_configuration_errors_come_before_any_pass_over_the_data(rng: np.random.Generator) -> None:
    # An array that fails when read: the configuration errors are raised without reading it.
    class Unreadable(np.ndarray):
        def __array_function__(self, func, types, args, kwargs):
            if func.__name__ in ("sum", "isfinite", "all", "where", "max", "matmul"):
                raise AssertionError(f"read by {func.__name__}")
            return super().__array_function__(func, types, args, kwargs)

    q = rng.standard_normal((2, 16, 8)).view(Unreadable)
    with pytest.raises(ValueError, match="computes statistics from each call's tokens"):
        fc.favor_attention(q, q, q, features=fc.OptimalPositiveFeatures(m=16), causal=True)
    with pytest.raises(ValueError, match="balance='matrix' computes its statistics"):
        fc.favor_attention(q, q, q, balance="matrix", causal=True)
    with pytest.raises(ValueError, match="does not estimate the softmax kernel"):
        fc.favor_attention(q, q, q, features=fc.GeneralizedFeatures(), balance=True)


def test_default_estimator_and_its_causal_form() -> None:
    # features=None is FAVOR++ (m = 256, seed 0) with the per-call balance; a causal call
    # without statistics runs its causal form: A = 0, no balance.
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 50, 8)) / 2 for _ in range(3))
    same = fc.OptimalPositiveFeatures(m=256, seed=0)
    np.testing.assert_array_equal(
        fc.favor_attention(q, k, v), fc.favor_attention(q, k, v, features=same)
    )
    plain = fc.OptimalPositiveFeatures(m=256, seed=0, a=0.0)
    np.testing.assert_array_equal(
        fc.favor_attention(q, k, v, causal=True),
        fc.favor_attention(q, k, v, features=plain, causal=True, balance=False),
    )
    assert fc.resolve(None, causal=True) == (plain, None)
    assert fc.resolve(None) == (same, "matrix")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("huge", ["many", "few"])
def test_query_norms_from_tiny_to_huge(
    backend: Backend, rng: np.random.Generator, causal: bool, huge: str
) -> None:
    # Eager adapters shift query exponents by a bound computed from |x|; rows whose
    # exponents may fall far below it (large norms) take the exact row max: no underflow,
    # the reference's result. "many": norms 1e-3 ... 316 (a third of the rows above the
    # limit: every row of the block takes the exact max); "few": 5 rows of norm 300 among
    # rows of norm 0.1 (only those rows take it).
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
    got = to_numpy(
        fc.favor_attention(a(q), a(k), a(v), features=fmap, causal=causal, balance=False)
    )
    assert np.isfinite(got).all()
    with fc.fast_paths(False):
        plain = to_numpy(
            fc.favor_attention(a(q), a(k), a(v), features=fmap, causal=causal, balance=False)
        )
    np.testing.assert_allclose(got, plain, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("causal", [False, True])
def test_keys_of_large_norm(backend: Backend, rng: np.random.Generator, causal: bool) -> None:
    # Keys of large norm give key features far below 1 (-|y|^2 / 2 in the exponent):
    # float32 features under the normal range are set to 0 by the eager adapters, which
    # must still agree with the standard operations to float32 rounding.
    q = rng.standard_normal((1, 2, 300, 16)).astype(np.float32)
    k = (rng.standard_normal((1, 2, 300, 16)) * 6.5).astype(np.float32)
    k[..., :150, :] /= 6  # half the keys ordinary, so the normalisers stay normal
    v = rng.standard_normal((1, 2, 300, 16)).astype(np.float32)
    fmap = fc.PositiveFeatures(m=64, seed=2)
    a = backend.asarray
    kw = {"features": fmap, "causal": causal, "balance": False}
    got = to_numpy(fc.favor_attention(a(q), a(k), a(v), **kw))
    with fc.fast_paths(False):
        plain = to_numpy(fc.favor_attention(a(q), a(k), a(v), **kw))
    assert np.isfinite(got).all()
    # float32 sums over <= 300 keys and 64 features in another order: the gamma_n bound
    # 2 (n + m) u max|v| (times 4 for the division); the features set to 0 (< 1.2e-38
    # each, against normalisers of ordinary keys' features) change nothing at this
    # precision
    u = float(np.finfo(np.float32).eps)
    np.testing.assert_allclose(got, plain, rtol=0, atol=2 * (300 + 64) * u * np.abs(v).max() * 4)


@pytest.mark.parametrize(("rows", "chunk"), [(192, 64), (30, 30), (1, 1), (7, 7)])
def test_causal_operation_on_edge_sizes(
    backend: Backend, rng: np.random.Generator, rows: int, chunk: int
) -> None:
    # The registered causal operation of a block (full chunks; the schedule passes a last,
    # shorter chunk on its own), with and without a state, against the standard one.
    xp, a = backend.xp, backend.asarray
    steps = steps_for(xp)
    fmap = fc.PositiveFeatures(m=16, seed=0)
    x, y = a(rng.standard_normal((rows, 8)) / 2), a(rng.standard_normal((rows, 8)) / 2)
    vals, kv0 = a(rng.standard_normal((rows, 5))), a(rng.random((16, 6)))
    w = fmap.projection_like(x)
    form = fmap.form(xp, x, y, w, root=0.5).flatten(())
    standard = Steps(vectorized=False)
    for state in (None, kv0):
        kf, vb = steps.keys(xp, form, y, vals, None)
        out = steps.output(xp, (1, rows, 5), x)
        got, small, kv = steps.causal(
            xp, form, x, kf, vb, state, chunk, None if out is None else out[0]
        )
        kf_s, vb_s = standard.keys(xp, form, y, vals, None)
        want, small_s, kv_s = standard.causal(xp, form, x, kf_s, vb_s, state, chunk, None)
        np.testing.assert_allclose(to_numpy(got), to_numpy(want), rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(to_numpy(kv), to_numpy(kv_s), rtol=1e-12, atol=1e-13)
        np.testing.assert_array_equal(to_numpy(small), to_numpy(small_s))


@pytest.mark.parametrize("chunk", [4, 7])
def test_causal_operation_restarts_where_documents_start(
    backend: Backend, rng: np.random.Generator, chunk: int
) -> None:
    # Packed documents with traced boundaries: the registered causal operation given where
    # each document starts (inside a chunk, on a chunk's bound, a document of one row)
    # equals the standard operation run on each document alone, the state given to the
    # first; the state after is the last document's.
    xp, a = backend.xp, backend.asarray
    steps, standard = steps_for(xp), Steps(vectorized=False)
    fmap = fc.PositiveFeatures(m=16, seed=0)
    rows, cuts = 28, [0, 5, 8, 9, 28]
    x, y = rng.standard_normal((rows, 8)) / 2, rng.standard_normal((rows, 8)) / 2
    vals, kv0 = rng.standard_normal((rows, 5)), rng.random((16, 6))
    resets = np.zeros((rows, 1), bool)
    resets[cuts[1:-1]] = True
    w = fmap.projection_like(a(x))
    form = fmap.form(xp, a(x), a(y), w, root=0.5).flatten(())
    kf, vb = steps.keys(xp, form, a(y), a(vals), None)
    out = steps.output(xp, (1, rows, 5), a(x))
    got, _, kv = steps.causal(xp, form, a(x), kf, vb, a(kv0), chunk,
                              None if out is None else out[0], a(resets))  # fmt: skip
    got, kv = to_numpy(got), to_numpy(kv)
    for lo, hi in itertools.pairwise(cuts):
        kf_s, vb_s = standard.keys(xp, form, a(y[lo:hi]), a(vals[lo:hi]), None)
        state = a(kv0) if lo == 0 else None
        want, _, kv_s = standard.causal(xp, form, a(x[lo:hi]), kf_s, vb_s, state, hi - lo, None)
        np.testing.assert_allclose(got[lo:hi], to_numpy(want), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(kv, to_numpy(kv_s), rtol=1e-12, atol=1e-13)


def test_query_norm_limit_is_a_bound_and_tight() -> None:
    # Below norm_limit, a query row's largest exponent is within GAP of the eager
    # adapters' shift |x| R + max c + 1 (so only rows above it need the exact row max).
    eager = pytest.importorskip("favorcore_backends._eager")
    gap, limit = eager.GAP, eager.norm_limit
    rng = np.random.default_rng(5)
    # one feature: x against w is the worst case, and the bound is tight at the limit
    w, c = rng.standard_normal(8), np.array([3.0])
    n = np.array([np.linalg.norm(w)])
    lim = limit(n, c)
    for t, ok in ((lim * (1 - 1e-9), True), (lim * (1 + 1e-6), False)):
        x = -t * w / n[0]
        assert ((x @ w + c[0]) - (t * n[0] + c[0] + 1) >= -gap) == ok
    # many features, biases spread over 12
    wq = rng.standard_normal((8, 64)) * rng.uniform(0.2, 2.0, 64)
    bias = rng.uniform(-12.0, 0.0, 64)
    norms = np.linalg.norm(wq, axis=0)
    lim = limit(norms, bias)
    assert 0 < lim < np.inf
    # the limit is where the bound max_j (c_j - t n_j) - t R - max c - 1 crosses -GAP
    bound = lambda t: (bias - t * norms).max() - t * norms.max() - bias.max() - 1
    assert bound(lim) == pytest.approx(-gap, rel=1e-12)
    assert bound(lim * (1 + 1e-6)) < -gap
    # and rows of every norm up to the limit are within it (soundness, on random rows)
    x = rng.standard_normal((4000, 8))
    x *= rng.uniform(0, lim, (4000, 1)) / np.linalg.norm(x, axis=1, keepdims=True)
    top = (x @ wq + bias).max(axis=1)
    shift = np.linalg.norm(x, axis=1) * norms.max() + bias.max() + 1
    assert (top - shift >= -gap).all()
    # a zero projection: every exponent is its bias, the largest is the shift minus 1
    assert limit(np.zeros(3), np.array([0.0, -50.0, -2.0])) == np.inf


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_features_below_the_normal_range_are_set_to_zero(framework: str) -> None:
    # The eager exp: features that would be denormal (10-100x slower on x86, in the exp and
    # in every product after it) are 0; others are exp's own; NaN stays NaN; the lower
    # bound only spares reading the exponents for their min.
    eager = pytest.importorskip("favorcore_backends._eager")
    if framework == "torch":
        torch = pytest.importorskip("torch")
        steps = pytest.importorskip("favorcore_backends._torch_steps").TorchSteps()
        wrap, back = torch.from_numpy, lambda t: t.numpy()
    else:
        steps = pytest.importorskip("favorcore_backends.numpy").NumpySteps()
        wrap, back = (lambda a: a), (lambda a: a)
    tiny = np.finfo(np.float32).smallest_normal
    e = np.array([[-300, -103.5, -95, -87.5, -87.3, -87.0, -60, 0, 3, np.nan]], np.float32)
    floor = eager._floor("float32")
    assert np.exp(np.float32(floor)) >= tiny > np.exp(np.nextafter(np.float32(floor), -np.inf))
    exp = back(steps.lib.native.exp(wrap(e.copy())))  # (the framework's own exp)
    want = np.where(np.isnan(e) | (e >= floor), exp, 0.0)
    for lower in (-np.inf, -400.0):
        got = back(steps._exp(wrap(e.copy()), lower))
        np.testing.assert_array_equal(got, want)
        assert not ((got > 0) & (got < tiny)).any()
    np.testing.assert_array_equal(back(steps._exp(wrap(e[:, 6:9].copy()), -70.0)), exp[:, 6:9])


def test_flush_to_zero_is_scoped_to_its_block_and_reports_underflow() -> None:
    # The NumPy causal scores set flush-to-zero around one product (x86-64 Linux): inside,
    # a result below the smallest normal number is 0 and the underflow is reported; after
    # it, and meanwhile in the other threads, gradual underflow is as before.
    import platform
    import sys
    import threading

    fenv = pytest.importorskip("favorcore_backends._fenv")
    if not (sys.platform.startswith("linux") and platform.machine() == "x86_64"):
        pytest.skip("flush-to-zero is set only on x86-64 Linux (NumPy then flushes nothing)")
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
    with pytest.raises(KeyError), fenv.flush_to_zero():  # an exception inside: mode restored
        raise KeyError
    assert float(a * b) == 2.0**-130


@pytest.mark.parametrize("tiny_rows", [3, 64])
def test_numpy_causal_scores_recompute_the_rows_the_flush_changed(
    rng: np.random.Generator, tiny_rows: int
) -> None:
    # Rows whose keys so far all have features of 2^-65 with queries of 2^-65: each score
    # product is 2^-130, below the normal range, so the flushed product gives them 0 and
    # a normaliser of 0 (result 0), while their true normaliser (i + 1) m 2^-130 is a
    # normal number: rescore must recompute them, exactly (the products are exact
    # denormals). The chunk products around the two hooks are written out here.
    fnumpy = pytest.importorskip("favorcore_backends.numpy")
    rows, m, dv, c = 256, 32, 8, 64
    n = rows // c
    qf = rng.random((rows, m)).astype(np.float32) + 0.5
    kf = rng.random((rows, m)).astype(np.float32) + 0.5
    qf[:tiny_rows] = kf[:tiny_rows] = 2.0**-65
    v = rng.standard_normal((rows, dv)).astype(np.float32)
    v1 = np.concatenate([v, np.ones((rows, 1), np.float32)], axis=1)
    qc, kc, vc = qf.reshape(n, c, m), kf.reshape(n, c, m), v1.reshape(n, c, dv + 1)
    pre = np.concatenate(
        [np.zeros((1, m, dv + 1), np.float32), np.cumsum(kc.transpose(0, 2, 1) @ vc, axis=0)]
    )
    steps = fnumpy.NumpySteps(workers=1)
    scores = np.empty((n, c, c), np.float32)
    flushed = steps.scores(qc, kc, scores)
    np.copyto(scores, 0.0, where=np.triu(np.ones((c, c), bool), 1))
    oc = qc @ pre[:n] + scores @ vc
    steps.rescore(qc, kc, vc, pre, oc)
    o = oc.reshape(rows, dv + 1)
    got = o[:, :dv] / o[:, dv:]
    q64, k64 = qf.astype(np.float64), kf.astype(np.float64)
    full = np.tril(q64 @ k64.T)
    want = (full @ v) / full.sum(axis=1, keepdims=True)
    import platform
    import sys

    if sys.platform.startswith("linux") and platform.machine() == "x86_64":
        assert flushed  # (else nothing was flushed, and the rows are exact as they are)
    # float32 rounding of sums of <= 256 + 32 terms of one sign (gamma_n, relative)
    u = float(np.finfo(np.float32).eps)
    np.testing.assert_allclose(got, want, rtol=0, atol=2 * (rows + m) * u * np.abs(v).max())


@pytest.mark.parametrize("config", ["standard eager", "standard vectorized", "registered"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["favor+", "default"])
def test_grouped_query_heads_equal_repeated_key_heads(
    backend: Backend, rng: np.random.Generator, config: str, causal: bool, kind: str
) -> None:
    # enable_gqa: query head h attends with key head h // G, key features once per key
    # head; the result equals repeating the key heads. (A carried state: no statistics
    # from the tokens, which grouped heads pool and repeated ones would not.)
    a = backend.asarray
    q = rng.standard_normal((2, 6, 37, 8)) / 2
    k, v = rng.standard_normal((2, 2, 37, 8)) / 2, rng.standard_normal((2, 2, 37, 5))
    mask = rng.random((2, 1, 37)) < 0.8
    fmap = fc.PositiveFeatures(m=16, seed=3) if kind == "favor+" else None
    kw = {"features": fmap, "causal": causal, "key_mask": a(mask), "chunk_size": 4}
    if kind == "favor+":
        kw["balance"] = False
    state = fc.AttentionState(a(rng.random((2, 2, 16 if fmap else 256, 6))))
    with registered(backend.xp, _configurations(backend.xp)[config]):
        got, after = fc.favor_attention(a(q), a(k), a(v), enable_gqa=True, state=state,
                                        return_state=True, **kw)  # fmt: skip
    if kind == "default":  # causal: A = 0 and no balance, as the repeated call
        kw["balance"] = False
        kw["features"] = fc.resolve(None, causal=True)[0]
    rep = lambda t: a(np.repeat(to_numpy(t), 3, axis=1))
    want, want_after = fc.favor_attention(
        a(q), rep(a(k)), rep(a(v)), state=fc.AttentionState(rep(state.kv)), return_state=True, **kw
    )  # fmt: skip
    np.testing.assert_allclose(to_numpy(got), to_numpy(want), rtol=1e-10, atol=1e-12)
    # the state: each key head's sums once (the repeated heads hold copies)
    np.testing.assert_allclose(
        to_numpy(after.kv), to_numpy(want_after.kv)[:, ::3], rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("framework", ["numpy"])  # (PyTorch takes every row's exact max)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("weak_rows", [0, 1, 20])
def test_trusted_bound_is_checked_after_the_products(
    monkeypatch: pytest.MonkeyPatch, framework: str, causal: bool, weak_rows: int
) -> None:
    # The eager adapters trust their bound shift for rows beyond the norm limit when the
    # largest-norm ones (the probe) are within GAP of it, and check the others after the
    # products through their normaliser. Here the probe rows are aligned with the longest
    # projection row (exponent ~ the bound) and rows of smaller norm are anti-aligned with
    # every row (exponents ~ 1.5 |x| R below the bound: their float32 features underflow to
    # 0 with the bound shift). They must be caught and recomputed with the exact row max:
    # those rows alone (causal too), or the whole causal block once they are more than an
    # eighth of it.
    eager = pytest.importorskip("favorcore_backends._eager")
    if framework == "torch":
        torch = pytest.importorskip("torch")
        steps, wrap = (
            pytest.importorskip("favorcore_backends._torch_steps").TorchSteps(),
            torch.from_numpy,
        )
        import array_api_compat.torch as xp
    else:
        steps, wrap = (
            pytest.importorskip("favorcore_backends.numpy").NumpySteps(workers=1),
            np.asarray,
        )
        import array_api_compat.numpy as xp
    rng = np.random.default_rng(5)
    d, m, n = 16, 4, 100
    fmap = fc.PositiveFeatures(m=m, seed=0)
    w = fmap.feature_matrix(d)  # (m, d)
    lengths = np.linalg.norm(w, axis=1)
    s = 80.0 / lengths.max()  # ~ -1.5 * 80 = -120 below the bound for the weak rows
    q = rng.standard_normal((1, 1, n, d)) * 0.05
    q[0, 0, :20] = 2 * s * w[np.argmax(lengths)] / lengths.max()  # the probe: aligned
    u = (w / lengths[:, None]).sum(axis=0)
    q[0, 0, 50 : 50 + weak_rows] = -s * u / np.linalg.norm(u)  # every w . x < 0
    k, v = rng.standard_normal((1, 1, n, d)) * 0.3, rng.standard_normal((1, 1, n, d))
    q, k, v = (wrap(a.astype(np.float32)) for a in (q, k, v))
    calls = []
    exact = eager.EagerSteps._exact
    monkeypatch.setattr(
        eager.EagerSteps, "_exact", lambda self, f, x: calls.append(x.shape[0]) or exact(self, f, x)
    )
    kw = {"features": fmap, "causal": causal, "balance": False, "scale": 1.0}
    with registered(xp, steps):
        got = to_numpy(fc.favor_attention(q, k, v, **kw))
    with fc.fast_paths(False):
        plain = to_numpy(fc.favor_attention(q, k, v, **kw))
    # causal: the block's first piece (64 rows: full chunks) holds 14 of the 20 weak rows,
    # more than an eighth: recomputed whole; its last piece (36 rows) holds only weak rows
    # beyond the limit, which fail the probe and take the exact max up front
    want = [] if not weak_rows else [64] if causal and weak_rows > 1 else [weak_rows]
    assert calls == want
    # float32 sums over 100 keys and 4 features in another order: the gamma_n bound,
    # 2 (n + m) u max|v| (times 4 for the division); the weak rows' outputs would be 0 (an
    # underflowed normaliser) without the check: errors of order 1
    u = float(np.finfo(np.float32).eps)
    np.testing.assert_allclose(
        got, plain, rtol=0, atol=2 * (n + m) * u * np.abs(to_numpy(v)).max() * 4
    )
