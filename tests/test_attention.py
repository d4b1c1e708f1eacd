"""Attention: linear = quadratic formula, causal prefixes, masks, state, dtypes, devices."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import reference as ref
from helpers import Backend, check_array, to_numpy, unit_roundoff

import favorcore as fc

lazy_xp_modules = [fc]  # see conftest.py: jax.jit on JAX, no compute on Dask


def bound(u: float, lk: int, m: int, vmax: float) -> float:
    """Worst-case absolute error of a computed D^-1 phi(Q) (phi(K)^T [V|1]) output.

    Each of numerator and denominator is a sum of Lk terms, contracted over m: the
    classical bound gamma_n = n u / (1 - n u) with n = Lk + m gives a relative error of the
    positive sums; the quotient of two such sums then errs by at most twice that, times the
    largest |v| it averages.
    """
    n = lk + m + 2
    return 2 * n * u / (1 - n * u) * vmax


def _positive(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.random(shape) + 0.05


SHAPES = [  # batch, Lq, Lk, m, dv
    ((), 5, 5, 4, 4),
    ((2,), 17, 17, 8, 3),
    ((2, 3), 33, 33, 6, 5),
    ((2,), 7, 12, 8, 5),  # cross-attention (not causal)
]


# (causal, chunk size): chunk sizes only matter, and Lq != Lk is only allowed, when not causal
MODES = [(False, None), (True, 1), (True, 4), (True, 64)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    ("shape", "causal", "chunk"),
    [(s, c, n) for s in SHAPES for c, n in MODES if not c or s[1] == s[2]],
)
@pytest.mark.parametrize("masked", [False, True])
def test_linear_attention_equals_the_quadratic_formula(
    backend: Backend,
    rng: np.random.Generator,
    dtype: str,
    shape,
    causal: bool,
    chunk: int | None,
    masked: bool,
) -> None:
    batch, lq, lk, m, dv = shape
    _xp, dt = backend.xp, getattr(backend.xp, dtype)
    qf = _positive(rng, *batch, lq, m).astype(dtype)
    kf = _positive(rng, *batch, lk, m).astype(dtype)
    v = rng.standard_normal((*batch, lk, dv)).astype(dtype)
    mask = rng.random((*batch, lk)) < 0.7 if masked else None
    out = fc.linear_attention(
        backend.asarray(qf, dt), backend.asarray(kf, dt), backend.asarray(v, dt),
        causal=causal, chunk_size=chunk,
        key_mask=None if mask is None else backend.asarray(mask),
    )  # fmt: skip
    got = check_array(backend, out, shape=(*batch, lq, dv), dtype=dt)
    want = ref.quadratic_attention(qf, kf, v, causal=causal, key_mask=mask)
    np.testing.assert_allclose(
        got, want, rtol=0, atol=bound(unit_roundoff(dtype), lk, m, np.abs(v).max())
    )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "fmap",
    [
        fc.PositiveFeatures(m=16, seed=0),
        fc.hyperbolic_features(16, seed=0),
        fc.GeneralizedFeatures(kernel="relu", m=8, seed=0),
    ],
    ids=["positive", "hyperbolic", "relu"],
)
def test_favor_attention_is_linear_attention_of_its_features(
    backend: Backend, rng: np.random.Generator, dtype: str, causal: bool, fmap: fc.FeatureMap
) -> None:
    xp, dt = backend.xp, getattr(backend.xp, dtype)
    q, k, v = (rng.standard_normal((2, 20, 8)).astype(dtype) for _ in range(3))
    mask = rng.random((2, 20)) < 0.8
    scale = 0.3
    out = fc.favor_attention(
        backend.asarray(q, dt), backend.asarray(k, dt), backend.asarray(v, dt),
        features=fmap, causal=causal, key_mask=backend.asarray(mask), scale=scale, chunk_size=6,
        balance=False,
    )  # fmt: skip
    got = check_array(backend, out, shape=(2, 20, 8), dtype=dt)
    # the same features, computed by the library on the same (scaled) inputs, in float64
    root = math.sqrt(scale)
    qf, kf = fmap(backend.asarray(q * root, xp.float64), backend.asarray(k * root, xp.float64))
    want = ref.quadratic_attention(to_numpy(qf), to_numpy(kf), v, causal=causal, key_mask=mask)
    # float32: the features themselves carry the error of exp of float32 arguments, so
    # add their relative error (a few u times the argument size) to the bound.
    u = unit_roundoff(dtype)
    args = 1 + np.abs(q).max() * np.abs(k).max() * 8 * scale
    tol = bound(u, 20, fmap.num_features(8), np.abs(v).max()) + 8 * args * u * np.abs(v).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_softmax_attention_matches_the_textbook_formula(
    backend: Backend, rng: np.random.Generator, causal: bool, masked: bool
) -> None:
    q, k, v = (rng.standard_normal((3, 9, 4)) for _ in range(3))
    mask = rng.random((3, 9)) < 0.6 if masked else None
    out = fc.softmax_attention(
        backend.asarray(q), backend.asarray(k), backend.asarray(v),
        causal=causal, key_mask=None if mask is None else backend.asarray(mask), scale=0.7,
    )  # fmt: skip
    got = check_array(backend, out, shape=(3, 9, 4), dtype=backend.xp.float64)
    np.testing.assert_allclose(
        got,
        ref.softmax_attention(q, k, v, causal=causal, key_mask=mask, scale=0.7),
        rtol=1e-12,
        atol=1e-14,
    )


@pytest.mark.parametrize(
    ("fmap", "huge"),
    [
        (fc.PositiveFeatures(m=32, seed=1), 1e3),
        (fc.hyperbolic_features(32, seed=1), 1e3),
        # exp(|k|^2 / 2) of the trigonometric map overflows float64 beyond |k| ~ 37
        (fc.TrigonometricFeatures(m=32, seed=1), 30.0),
        (fc.GeneralizedFeatures(kernel="elu+1", m=None), 1e3),
    ],
    ids=["positive", "hyperbolic", "trigonometric", "elu"],
)
@pytest.mark.parametrize("t", [1, 7, 16, 29])
def test_causal_outputs_do_not_see_the_future(
    backend: Backend, rng: np.random.Generator, fmap: fc.FeatureMap, huge: float, t: int
) -> None:
    # Outputs before t equal the call on the prefix alone, whatever follows -- keys of
    # huge norm and values of 1e6 included (a data-dependent key shift would change them).
    L, d = 40, 8
    q, k, v = (rng.standard_normal((2, L, d)) / 2 for _ in range(3))
    k2, v2 = k.copy(), v.copy()
    k2[:, t:] = rng.standard_normal((2, L - t, d)) * huge / math.sqrt(d)
    v2[:, t:] = 1e6
    a = backend.asarray
    with warnings.catch_warnings():
        # huge future keys make trigonometric normalisers <= 0 there: warned, rows set to 0
        warnings.simplefilter("ignore", fc.AccuracyWarning)
        full = to_numpy(
            fc.favor_attention(a(q), a(k2), a(v2), features=fmap, causal=True, chunk_size=8)
        )
    prefix = to_numpy(
        fc.favor_attention(
            a(q[:, :t]), a(k[:, :t]), a(v[:, :t]), features=fmap, causal=True, chunk_size=8
        )
    )
    assert np.isfinite(full[:, :t]).all()
    np.testing.assert_allclose(
        full[:, :t], prefix, rtol=0, atol=bound(ref_u64(), L, 32, np.abs(v).max())
    )
    # the exact reference has the same property
    full_exact = to_numpy(fc.softmax_attention(a(q), a(k2), a(v2), causal=True))
    np.testing.assert_allclose(
        full_exact[:, :t],
        ref.softmax_attention(q[:, :t], k[:, :t], v[:, :t], causal=True),
        rtol=1e-12,
        atol=1e-14,
    )


def ref_u64() -> float:
    return unit_roundoff("float64")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("function", ["favor", "softmax"])
def test_masked_keys_have_no_influence_even_when_nan(
    backend: Backend, rng: np.random.Generator, causal: bool, function: str
) -> None:
    L, d = 24, 8
    q, k, v = (rng.standard_normal((2, L, d)) / 2 for _ in range(3))
    mask = rng.random((2, L)) < 0.6
    mask[:, 0] = True
    k_bad, v_bad = k.copy(), v.copy()
    k_bad[~mask] = np.nan
    v_bad[~mask] = np.inf
    fmap = fc.PositiveFeatures(m=64, seed=5)
    a = backend.asarray

    def call(kk, vv):
        if function == "favor":
            return fc.favor_attention(
                a(q), a(kk), a(vv), features=fmap, causal=causal, key_mask=a(mask), chunk_size=5
            )
        return fc.softmax_attention(a(q), a(kk), a(vv), causal=causal, key_mask=a(mask))

    bad, clean = to_numpy(call(k_bad, v_bad)), to_numpy(call(k, v))
    assert np.isfinite(bad).all()
    np.testing.assert_array_equal(bad, clean)
    if not causal:  # equal to the call on the valid keys alone
        for b in range(2):
            sel = mask[b]
            if function == "favor":
                alone = fc.favor_attention(a(q[b]), a(k[b][sel]), a(v[b][sel]), features=fmap)
            else:
                alone = fc.softmax_attention(a(q[b]), a(k[b][sel]), a(v[b][sel]))
            np.testing.assert_allclose(
                bad[b], to_numpy(alone), rtol=0, atol=bound(ref_u64(), L, 64, 2.0)
            )
    else:  # the textbook formula with the mask, on the library's own features
        if function == "favor":
            root = d**-0.25
            qf, kf = fmap(a(q * root), a(k * root))
            want = ref.quadratic_attention(
                to_numpy(qf), to_numpy(kf), v, causal=True, key_mask=mask
            )
        else:
            want = ref.softmax_attention(q, k, v, causal=True, key_mask=mask)
        np.testing.assert_allclose(bad, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("function", ["favor", "softmax", "linear"])
def test_a_query_with_no_valid_key_returns_zero(
    backend: Backend, rng: np.random.Generator, causal: bool, function: str
) -> None:
    L = 10
    q, k, v = (rng.standard_normal((2, L, 4)) for _ in range(3))
    mask = np.ones((2, L), dtype=bool)
    mask[0] = False  # batch 0: nothing to attend to
    mask[1, :3] = False  # batch 1: causal queries 0..2 have no valid key
    a = backend.asarray
    if function == "favor":
        out = fc.favor_attention(
            a(q),
            a(k),
            a(v),
            features=fc.PositiveFeatures(m=8, seed=0),
            causal=causal,
            key_mask=a(mask),
        )
    elif function == "softmax":
        out = fc.softmax_attention(a(q), a(k), a(v), causal=causal, key_mask=a(mask))
    else:
        out = fc.linear_attention(a(np.abs(q)), a(np.abs(k)), a(v), causal=causal, key_mask=a(mask))
    got = to_numpy(out)
    np.testing.assert_array_equal(got[0], 0.0)
    if causal:
        np.testing.assert_array_equal(got[1, :3], 0.0)
        assert (np.abs(got[1, 3:]).sum(-1) > 0).all()
    else:
        assert (np.abs(got[1]).sum(-1) > 0).all()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("splits", [[1], [5, 17], [16, 16], [3, 1, 1, 30, 2]])
def test_state_carrying_calls_equal_one_call(
    backend: Backend, rng: np.random.Generator, dtype: str, splits
) -> None:
    _xp, dt = backend.xp, getattr(backend.xp, dtype)
    L = sum(splits) + 7
    q, k, v = (rng.standard_normal((2, 3, L, 8)).astype(dtype) / 2 for _ in range(3))
    mask = rng.random((2, 1, L)) < 0.8
    fmap = fc.hyperbolic_features(16, seed=9)
    a = lambda x: backend.asarray(x, dt if x.dtype != bool else None)
    one = to_numpy(
        fc.favor_attention(
            a(q), a(k), a(v), features=fmap, causal=True, key_mask=a(mask), chunk_size=4
        )
    )
    pieces, state, start = [], None, 0
    for n in [*splits, L - sum(splits)]:
        s = slice(start, start + n)
        out, state = fc.favor_attention(
            a(q[..., s, :]), a(k[..., s, :]), a(v[..., s, :]), features=fmap, causal=True,
            key_mask=a(mask[..., s]), state=state, return_state=True, chunk_size=4,
        )  # fmt: skip
        pieces.append(to_numpy(out))
        start += n
    assert isinstance(state, fc.AttentionState)
    check_array(backend, state.kv, shape=(2, 3, 16, 9), dtype=dt)
    np.testing.assert_allclose(
        np.concatenate(pieces, axis=-2),
        one,
        rtol=0,
        atol=4 * bound(unit_roundoff(dtype), L, 16, 2.0),
    )


def test_one_token_decoding_equals_one_call(backend: Backend, rng: np.random.Generator) -> None:
    L = 12
    q, k, v = (rng.standard_normal((4, L, 8)) / 2 for _ in range(3))
    fmap = fc.PositiveFeatures(m=16, seed=2)
    a = backend.asarray
    one = to_numpy(fc.favor_attention(a(q), a(k), a(v), features=fmap, causal=True))
    state, steps = None, []
    for t in range(L):
        out, state = fc.favor_attention(
            a(q[:, t : t + 1]), a(k[:, t : t + 1]), a(v[:, t : t + 1]),
            features=fmap, causal=True, state=state, return_state=True,
        )  # fmt: skip
        steps.append(to_numpy(out))
    np.testing.assert_allclose(
        np.concatenate(steps, axis=1), one, rtol=0, atol=bound(ref_u64(), L, 16, 2.0)
    )


def test_broadcast_batch_dimensions(backend: Backend, rng: np.random.Generator) -> None:
    q = rng.standard_normal((2, 3, 6, 4))
    k = rng.standard_normal((3, 6, 4))
    v = rng.standard_normal((6, 5))
    mask = rng.random((2, 1, 6)) < 0.7
    mask[..., 0] = True
    fmap = fc.PositiveFeatures(m=8, seed=0)
    a = backend.asarray
    for causal in (False, True):
        out = fc.favor_attention(a(q), a(k), a(v), features=fmap, causal=causal, key_mask=a(mask))
        got = check_array(backend, out, shape=(2, 3, 6, 5), dtype=backend.xp.float64)
        for i in range(2):
            for j in range(3):
                one = fc.favor_attention(
                    a(q[i, j]), a(k[j]), a(v), features=fmap, causal=causal, key_mask=a(mask[i, 0])
                )
                # the balance's eigendecompositions run batched here and one at a time
                # there: their rounding differs, amplified by cond(M) <= 100
                np.testing.assert_allclose(got[i, j], to_numpy(one), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("half", "unit"), [("float16", 2.0**-11), ("bfloat16", 2.0**-8)])
def test_half_precision_computes_in_float32(
    backend: Backend, rng: np.random.Generator, half: str, unit: float
) -> None:
    xp = backend.xp
    dtype = getattr(xp, half, None)
    if dtype is None:
        pytest.skip(f"{backend.name} has no {half} (it is not in the Array API standard)")
    # inputs exactly representable in the half dtype: round on the host through float32
    # then the backend (bfloat16 has no NumPy dtype)
    q, k, v = (
        to_numpy(xp.astype(backend.asarray(rng.standard_normal((2, 16, 8)), dtype), xp.float64))
        for _ in range(3)
    )
    fmap = fc.PositiveFeatures(m=16, seed=0)
    for causal in (False, True):
        out = fc.favor_attention(
            *(xp.astype(backend.asarray(x), dtype) for x in (q, k, v)), features=fmap, causal=causal
        )
        got = check_array(backend, out, shape=(2, 16, 8), dtype=dtype)
        want = to_numpy(
            fc.favor_attention(
                *(backend.asarray(x) for x in (q, k, v)), features=fmap, causal=causal
            )
        )
        # float32 compute, then one rounding of the output to the half dtype (unit
        # roundoff ``unit``); absolute slack for outputs near 0 of the float32 part
        np.testing.assert_allclose(
            got.astype(np.float64), want, rtol=unit, atol=1e-4 * np.abs(v).max()
        )


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 31, 32, 33, 100])
def test_chunk_size_only_changes_rounding(
    backend: Backend, rng: np.random.Generator, chunk: int
) -> None:
    q, k, v = (rng.standard_normal((32, 4)) for _ in range(3))
    fmap = fc.PositiveFeatures(m=8, seed=0)
    a = backend.asarray
    got = to_numpy(
        fc.favor_attention(a(q), a(k), a(v), features=fmap, causal=True, chunk_size=chunk)
    )
    want = to_numpy(fc.favor_attention(a(q), a(k), a(v), features=fmap, causal=True, chunk_size=1))
    np.testing.assert_allclose(got, want, rtol=0, atol=bound(ref_u64(), 32, 8, np.abs(v).max()))


@pytest.mark.parametrize("causal", [False, True])
def test_an_explicit_projection_is_used(
    backend: Backend, rng: np.random.Generator, causal: bool
) -> None:
    # Adapters pass their own matrix (a module buffer, a jax.random draw): the map's own
    # matrix gives the map's result, another matrix gives the other map's result.
    q, k, v = (rng.standard_normal((2, 12, 8)) / 2 for _ in range(3))
    a = backend.asarray
    mine, other = fc.hyperbolic_features(16, seed=1), fc.hyperbolic_features(16, seed=2)
    w_other = a(other.feature_matrix(8))
    got = to_numpy(
        fc.favor_attention(a(q), a(k), a(v), features=mine, causal=causal, projection=w_other)
    )
    want = to_numpy(fc.favor_attention(a(q), a(k), a(v), features=other, causal=causal))
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)
    assert not np.allclose(
        got, to_numpy(fc.favor_attention(a(q), a(k), a(v), features=mine, causal=causal))
    )


@pytest.mark.parametrize("masked", [False, True])
def test_bidirectional_state_stands_for_keys_given_elsewhere(
    backend: Backend, rng: np.random.Generator, masked: bool
) -> None:
    # Keys split into pieces (as on the workers of a distributed computation): the sums of
    # each piece, added, and then applied to the queries, equal one call over all keys.
    # The call over all keys balances them by default; the pieces get its statistics.
    q, k, v = (
        rng.standard_normal((2, 7, 8)) / 2,
        rng.standard_normal((2, 30, 8)) / 2,
        rng.standard_normal((2, 30, 5)),
    )
    mask = rng.random((2, 30)) < 0.7 if masked else np.ones((2, 30), bool)
    fmap = fc.PositiveFeatures(m=16, seed=4)
    a = backend.asarray
    one = to_numpy(fc.favor_attention(a(q), a(k), a(v), features=fmap, key_mask=a(mask)))
    stats = fc.balance_statistics(a(q), a(k), key_mask=a(mask))
    state = None
    for s in (slice(0, 11), slice(11, 12), slice(12, 30)):
        _, state = fc.favor_attention(
            a(q[:, :0]), a(k[:, s]), a(v[:, s]), features=fmap, key_mask=a(mask[:, s]),
            state=state, return_state=True, balance=stats,
        )  # fmt: skip
    none = a(np.zeros((2, 0, 8)))
    got = fc.favor_attention(
        a(q), none, a(np.zeros((2, 0, 5))), features=fmap, state=state, balance=stats
    )
    np.testing.assert_allclose(
        to_numpy(got), one, rtol=0, atol=bound(ref_u64(), 30, 16, np.abs(v).max())
    )
