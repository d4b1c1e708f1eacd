"""The exact balance and key shift: exact attention unchanged, FAVOR's error far lower."""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as ref
from helpers import Backend, to_numpy

import favorcore as fc

lazy_xp_modules = [fc]  # see conftest.py: jax.jit on JAX, no compute on Dask


def _offset_inputs(rng: np.random.Generator, lq: int = 40, lk: int = 50, d: int = 16):
    # like real models' q/k: rows share a large common component, keys spread less, and
    # each spreads over its own few directions
    mu_q, mu_k = rng.standard_normal(d) * 1.5, rng.standard_normal(d) * 1.5
    spread = np.logspace(0, -1.5, d)
    q = mu_q + 0.8 * spread * rng.standard_normal((2, lq, d))
    k = mu_k + 0.3 * spread[::-1] * rng.standard_normal((2, lk, d))
    v = rng.standard_normal((2, lk, 4))
    return q, k, v


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kind", ["matrix", "scalar"])
def test_balance_and_shift_leave_exact_attention_unchanged(
    backend: Backend, rng: np.random.Generator, masked: bool, kind: str
) -> None:
    q, k, v = _offset_inputs(rng)
    mask = rng.random((2, 50)) < 0.7 if masked else np.ones((2, 50), bool)
    a = backend.asarray
    km = a(mask) if masked else None
    stats = fc.balance_statistics(a(q), a(k), key_mask=km, kind=kind)
    x, y = fc.apply_balance(a(q), a(k), stats)
    got = to_numpy(fc.softmax_attention(x, y, a(v), key_mask=km, scale=1.0))
    np.testing.assert_allclose(
        got, ref.softmax_attention(q, k, v, key_mask=mask), rtol=1e-11, atol=1e-13
    )
    for row in range(2):
        xs, ys = to_numpy(x)[row], to_numpy(y)[row][mask[row]]
        cov_x, cov_y = np.cov(xs.T, bias=True), np.cov(ys.T, bias=True)
        if kind == "scalar":  # equal total variances
            np.testing.assert_allclose(np.trace(cov_x), np.trace(cov_y), rtol=1e-10)
        else:  # G (C_x + r_x I) G = C_y + r_y I, G = M M^T, ridges r = 1e-2 tr(C) / d:
            # the balanced covariances are equal but for r_x M^T M - r_y M^-1 M^-T
            m, m_inv = to_numpy(stats.query)[row], to_numpy(stats.key)[row]
            np.testing.assert_allclose(m @ m_inv.T, np.eye(16), atol=1e-12)
            r_x = 1e-2 * np.trace(np.cov(q[row].T, bias=True) / 4) / 16
            r_y = 1e-2 * np.trace(np.cov(k[row][mask[row]].T, bias=True) / 4) / 16
            np.testing.assert_allclose(
                cov_y - cov_x, r_x * m.T @ m - r_y * m_inv.T @ m_inv, rtol=0, atol=1e-13
            )
        # the shift centres x + y; spread is the mean of |x_i + y_j|^2 over all pairs
        pairs = xs[:, None, :] + ys[None, :, :]
        np.testing.assert_allclose(pairs.mean((0, 1)), 0.0, atol=1e-12)
        want = (pairs**2).sum(-1).mean()
        np.testing.assert_allclose(to_numpy(stats.spread)[row, 0, 0], want, rtol=1e-10)


def test_matrix_balance_beats_the_scalar_one_on_anisotropic_rows() -> None:
    # Queries and keys that spread over different directions: the matrix balance makes
    # the mean |x + y|^2 (the driver of the variance) smaller, and FAVOR+'s error with it.
    rng = np.random.default_rng(1)
    q, k, v = _offset_inputs(rng, lq=200, lk=200)
    exact = ref.softmax_attention(q, k, v)
    spreads = {
        kind: float(fc.balance_statistics(q, k, kind=kind).spread.mean())
        for kind in ("scalar", "matrix")
    }
    assert spreads["matrix"] < 0.7 * spreads["scalar"], spreads

    def errors(kind: str) -> np.ndarray:
        return np.array([
            np.linalg.norm(fc.favor_attention(q, k, v, features=fc.PositiveFeatures(m=64, seed=s),
                                              balance=kind) - exact) / np.linalg.norm(exact)
            for s in range(30)
        ])  # fmt: skip

    scalar, matrix = errors("scalar"), errors("matrix")
    z = (scalar.mean() - matrix.mean()) / math.hypot(
        scalar.std(ddof=1) / math.sqrt(30), matrix.std(ddof=1) / math.sqrt(30)
    )
    assert z > 3, (scalar.mean(), matrix.mean())


@pytest.mark.parametrize("masked", [False, True])
def test_balanced_favor_is_favor_of_the_transformed_rows(
    backend: Backend, rng: np.random.Generator, masked: bool
) -> None:
    q, k, v = _offset_inputs(rng)
    mask = rng.random((2, 50)) < 0.7 if masked else None
    a = backend.asarray
    km = None if mask is None else a(mask)
    fmap = fc.hyperbolic_features(32, seed=0)
    got = to_numpy(fc.favor_attention(a(q), a(k), a(v), features=fmap, key_mask=km, balance=True))
    x, y = fc.apply_balance(a(q), a(k), fc.balance_statistics(a(q), a(k), key_mask=km))
    want = to_numpy(
        fc.favor_attention(x, y, a(v), features=fmap, key_mask=km, scale=1.0, balance=False)
    )
    np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-13)


def test_balance_lowers_the_error_on_offset_inputs() -> None:
    # Rows with a common component are where FAVOR+ fails (variance ~ exp|x + y|^2);
    # the shift removes it. Mean relative error over seeds, two-sample z > 5.
    rng = np.random.default_rng(0)
    q, k, v = _offset_inputs(rng, lq=200, lk=200)
    exact = ref.softmax_attention(q, k, v)

    def errors(balance: bool) -> np.ndarray:
        return np.array(
            [
                np.linalg.norm(
                    fc.favor_attention(
                        q, k, v, features=fc.PositiveFeatures(m=64, seed=s), balance=balance
                    )
                    - exact
                )
                / np.linalg.norm(exact)
                for s in range(30)
            ]
        )

    plain, balanced = errors(False), errors(True)
    z = (plain.mean() - balanced.mean()) / math.hypot(
        plain.std(ddof=1) / math.sqrt(30), balanced.std(ddof=1) / math.sqrt(30)
    )
    assert z > 5, (plain.mean(), balanced.mean())
    assert balanced.mean() < plain.mean() / 2  # measured: 0.22 -> 0.079


def test_causal_balance_uses_given_statistics_and_keeps_prefixes(
    backend: Backend, rng: np.random.Generator
) -> None:
    q, k, v = _offset_inputs(rng, lq=30, lk=30)
    a = backend.asarray
    fmap = fc.PositiveFeatures(m=32, seed=1)
    with pytest.raises(ValueError, match="balance=True computes its statistics from this call"):
        fc.favor_attention(a(q), a(k), a(v), features=fmap, causal=True, balance=True)
    # statistics from a calibration batch: fixed along the sequence, exact, causal
    calib = fc.balance_statistics(a(q[:, :10]), a(k[:, :10]))
    full = to_numpy(fc.favor_attention(a(q), a(k), a(v), features=fmap, causal=True, balance=calib))
    k2 = k.copy()
    k2[:, 20:] = 50.0
    changed = to_numpy(
        fc.favor_attention(a(q), a(k2), a(v), features=fmap, causal=True, balance=calib)
    )
    np.testing.assert_allclose(changed[:, :20], full[:, :20], rtol=1e-11, atol=1e-13)
    pieces, state = [], None
    for s in (slice(0, 13), slice(13, 30)):
        out, state = fc.favor_attention(
            a(q[:, s]), a(k[:, s]), a(v[:, s]), features=fmap, causal=True, balance=calib,
            state=state, return_state=True,
        )  # fmt: skip
        pieces.append(to_numpy(out))
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=1e-10, atol=1e-12)


def test_bad_balance_arguments_raise(backend: Backend, rng: np.random.Generator) -> None:
    q, k, v = _offset_inputs(rng)
    a = backend.asarray
    fmap = fc.PositiveFeatures(m=8, seed=0)
    with pytest.raises(ValueError, match="balance=True computes"):
        fc.favor_attention(a(q), a(k), a(v), features=fmap, balance=True, return_state=True)
    eye = a(np.eye(16))
    bad = fc.Balance(eye, eye, a(np.zeros((2, 1, 5))))
    with pytest.raises(ValueError, match=r"balance.shift must have shape batch \+ \(1, 16\)"):
        fc.favor_attention(a(q), a(k), a(v), features=fmap, balance=bad)
    with pytest.raises(TypeError, match="balance must be None, a bool, one of"):
        fc.favor_attention(a(q), a(k), a(v), features=fmap, balance="auto")


def test_gradients_treat_the_statistics_as_constants() -> None:
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 7, 4, dtype=torch.float64, generator=gen, requires_grad=True)
        for _ in range(3)
    )
    stats = fc.balance_statistics(q.detach(), k.detach())
    fmap = fc.hyperbolic_features(8, seed=1)
    for causal in (False, True):
        f = lambda q, k, v, c=causal: fc.favor_attention(
            q, k, v, features=fmap, causal=c, balance=stats
        )
        assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_default_is_balanced_for_positive_maps_in_bidirectional_calls_only(
    backend: Backend, rng: np.random.Generator
) -> None:
    q, k, v = _offset_inputs(rng, lq=30, lk=30)
    a = backend.asarray

    def call(fmap: fc.FeatureMap, causal: bool, balance: bool | None) -> np.ndarray:
        return to_numpy(
            fc.favor_attention(a(q), a(k), a(v), features=fmap, causal=causal, balance=balance)
        )

    for fmap in (fc.PositiveFeatures(m=16, seed=0), fc.OptimalPositiveFeatures(m=16, seed=0)):
        np.testing.assert_array_equal(call(fmap, False, None), call(fmap, False, True))
        assert not np.allclose(call(fmap, False, None), call(fmap, False, False))
    plus = fc.PositiveFeatures(m=16, seed=0)
    np.testing.assert_array_equal(call(plus, True, None), call(plus, True, False))
    relu = fc.GeneralizedFeatures(kernel="relu", m=16, seed=0)
    np.testing.assert_array_equal(call(relu, False, None), call(relu, False, False))


@pytest.mark.parametrize("masked", [False, True])
def test_spread_gives_favorpp_the_a_of_the_balanced_rows(
    backend: Backend, rng: np.random.Generator, masked: bool
) -> None:
    # mean_ij |x_i + y_j|^2 of the balanced, shifted rows is the sum of their total
    # variances: A* from the spread equals A* recomputed from the rows themselves.
    q, k, _ = _offset_inputs(rng)
    a = backend.asarray
    km = a(rng.random((2, 50)) < 0.6) if masked else None
    qm = a(rng.random((2, 40)) < 0.8) if masked else None
    stats = fc.balance_statistics(a(q), a(k), key_mask=km, query_mask=qm)
    x, y = fc.apply_balance(a(q), a(k), stats)
    fmap = fc.OptimalPositiveFeatures(m=16, seed=0)
    want = fc.OptimalPositiveFeatures.optimal_a(x, y, key_mask=km, query_mask=qm)
    got = fmap.coefficient(x, y, spread=stats.spread)
    np.testing.assert_allclose(to_numpy(got), to_numpy(want), rtol=1e-12)


@pytest.mark.parametrize(
    "fmap", [fc.PositiveFeatures(m=32, seed=2), fc.OptimalPositiveFeatures(m=32, seed=2)]
)
def test_padding_changes_nothing_with_query_and_key_masks(
    backend: Backend, rng: np.random.Generator, fmap: fc.FeatureMap
) -> None:
    # Self-attention over a padded batch: with query_mask = key_mask the statistics (the
    # balance, FAVOR++'s A) come from the real tokens only, so each sequence's output
    # equals a call on that sequence alone, whatever the padding holds (NaN here).
    q, k, v = _offset_inputs(rng, lq=30, lk=30)
    lengths = (30, 19)
    mask = np.arange(30)[None, :] < np.array(lengths)[:, None]
    dirty = [t.copy() for t in (q, k, v)]
    for t in dirty:
        t[1, 19:] = np.nan
    a = backend.asarray
    out = to_numpy(
        fc.favor_attention(
            *(a(t) for t in dirty),
            features=fmap,
            key_mask=a(mask),
            query_mask=a(mask),
            check_finite=False,
        )
    )
    for row, n in enumerate(lengths):
        alone = fc.favor_attention(
            a(q[row : row + 1, :n]), a(k[row : row + 1, :n]), a(v[row : row + 1, :n]),
            features=fmap,
        )  # fmt: skip
        np.testing.assert_allclose(out[row, :n], to_numpy(alone)[0], rtol=1e-10, atol=1e-12)


def test_causal_favorpp_takes_a_from_given_statistics(
    backend: Backend, rng: np.random.Generator
) -> None:
    # A data-dependent FAVOR++ in causal attention: statistics of a calibration batch fix
    # the balance and A along the whole sequence; prefixes and carried states stay exact.
    q, k, v = _offset_inputs(rng, lq=30, lk=30)
    a = backend.asarray
    fmap = fc.OptimalPositiveFeatures(m=32, seed=1)
    calib = fc.balance_statistics(a(q[:, :10]), a(k[:, :10]))
    full = to_numpy(fc.favor_attention(a(q), a(k), a(v), features=fmap, causal=True, balance=calib))
    k2 = k.copy()
    k2[:, 20:] = 50.0
    changed = fc.favor_attention(a(q), a(k2), a(v), features=fmap, causal=True, balance=calib)
    np.testing.assert_allclose(to_numpy(changed)[:, :20], full[:, :20], rtol=1e-11, atol=1e-13)
    one, state = fc.favor_attention(
        a(q[:, :11]), a(k[:, :11]), a(v[:, :11]), features=fmap, causal=True, balance=calib,
        return_state=True,
    )  # fmt: skip
    two = fc.favor_attention(
        a(q[:, 11:]), a(k[:, 11:]), a(v[:, 11:]), features=fmap, causal=True, balance=calib,
        state=state,
    )  # fmt: skip
    np.testing.assert_allclose(
        np.concatenate([to_numpy(one), to_numpy(two)], axis=1), full, rtol=1e-10, atol=1e-12
    )
    # the same as FAVOR++ with that A fixed, per batch row
    x, y = fc.apply_balance(a(q), a(k), calib)
    spread = to_numpy(calib.spread)[:, 0, 0]
    for row in range(2):
        a_row = float(to_numpy(fmap.coefficient(x, y, spread=calib.spread))[row, 0, 0])
        assert a_row < 0 < spread[row]
        fixed = fc.OptimalPositiveFeatures(m=32, seed=1, a=a_row)
        want = fc.favor_attention(
            x[row, ...],
            y[row, ...],
            a(v[row]),
            features=fixed,
            causal=True,
            scale=1.0,
            balance=False,
        )
        np.testing.assert_allclose(full[row], to_numpy(want), rtol=1e-10, atol=1e-12)
    without_spread = calib._replace(spread=None)
    with pytest.raises(ValueError, match="computes statistics from each call's tokens"):
        fc.favor_attention(a(q), a(k), a(v), features=fmap, causal=True, balance=without_spread)


def test_bad_query_mask_raises(backend: Backend, rng: np.random.Generator) -> None:
    q, k, v = _offset_inputs(rng)
    a = backend.asarray
    fmap = fc.PositiveFeatures(m=8, seed=0)
    with pytest.raises(ValueError, match=r"query_mask must have shape batch \+ \(Lq,\)"):
        fc.favor_attention(a(q), a(k), a(v), features=fmap, query_mask=a(np.ones((2, 50), bool)))
    with pytest.raises(TypeError, match="query_mask must be a boolean array"):
        fc.favor_attention(a(q), a(k), a(v), features=fmap, query_mask=a(np.ones((2, 40))))
