"""Packed sequences: documents one after another in a row, as segment_ids."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from helpers import Backend, to_numpy

import favorcore as fc

FMAP = fc.PositiveFeatures(m=16, seed=0)
CUTS = ([0, 20, 35, 61], [0, 61], [0, 1, 2, 40, 61])  # each batch row's documents


def _ids(cuts_per_row=CUTS, length=61) -> np.ndarray:
    ids = np.zeros((len(cuts_per_row), length), dtype=np.int64)
    for r, cuts in enumerate(cuts_per_row):
        for j, (a, b) in enumerate(itertools.pairwise(cuts)):
            ids[r, a:b] = 3 * j + 1  # increasing, not consecutive
    return ids


@pytest.fixture
def backend(backend: Backend) -> Backend:
    """The matrix's backends but JAX's, whose conformance runs every call under jax.jit:
    there the ids cannot be read (they become a scan's restarts, and the statistics must be
    given: test_traced_ids_*); eager JAX arrays are tested in test_jax_eager_arrays."""
    if backend.name == "jax":
        pytest.skip("traced ids are tested on their own below (test_traced_ids_*)")
    return backend


def _inputs(rng: np.random.Generator, heads: int = 2, length: int = 61):
    q, k = (rng.standard_normal((3, heads, length, 8)) / 2 for _ in range(2))
    return q, k, rng.standard_normal((3, heads, length, 5))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("features", ["favor+", "default"])
@pytest.mark.parametrize("masked", [False, True])
def test_packed_documents_equal_one_call_each(
    backend: Backend, rng: np.random.Generator, causal: bool, features: str, masked: bool
) -> None:
    # Each document attends to itself alone, with its own statistics (the default's
    # balance and A are each document's): packed, the result is the documents' own calls.
    a = backend.asarray
    q, k, v = _inputs(rng)
    mask = rng.random((3, 1, 61)) < 0.8 if masked else None
    fmap = FMAP if features == "favor+" else None
    got = to_numpy(fc.favor_attention(
        a(q), a(k), a(v), features=fmap, causal=causal, segment_ids=a(_ids()[:, None, :]),
        key_mask=None if mask is None else a(mask), chunk_size=4,
    ))  # fmt: skip
    for r, cuts in enumerate(CUTS):
        for lo, hi in itertools.pairwise(cuts):
            part = (slice(r, r + 1), slice(None), slice(lo, hi))
            m = None if mask is None else a(mask[r : r + 1, :, lo:hi])
            want = fc.favor_attention(a(q[part]), a(k[part]), a(v[part]), features=fmap,
                                      causal=causal, key_mask=m, chunk_size=4)  # fmt: skip
            # float64, the same blocks and sums but for the blocks' bounds: rounding only
            np.testing.assert_allclose(got[part], to_numpy(want), rtol=1e-10, atol=1e-12)


def test_a_short_document_beside_a_long_one_keeps_its_own_statistics(
    backend: Backend, rng: np.random.Generator
) -> None:
    # The statistics sample a side longer than 1024 rows; each document is sampled as its
    # own call samples it, whatever the lengths of the others (a short document beside one
    # of 1500 tokens reads all of its rows, the long one every second row).
    a = backend.asarray
    cuts = [0, 300, 1800, 1830]
    q, k = (rng.standard_normal((1, 1, cuts[-1], 4)) / 2 for _ in range(2))
    v = rng.standard_normal((1, 1, cuts[-1], 3))
    ids = np.repeat(np.arange(3), np.diff(cuts))[None, None, :]
    fmap = fc.OptimalPositiveFeatures(m=8, seed=0)
    got = to_numpy(fc.favor_attention(a(q), a(k), a(v), features=fmap, segment_ids=a(ids)))
    for lo, hi in itertools.pairwise(cuts):
        part = (slice(None), slice(None), slice(lo, hi))
        want = fc.favor_attention(a(q[part]), a(k[part]), a(v[part]), features=fmap)
        np.testing.assert_allclose(got[part], to_numpy(want), rtol=1e-10, atol=1e-12)


def test_a_state_continues_the_first_document_and_returns_the_last(
    backend: Backend, rng: np.random.Generator
) -> None:
    a = backend.asarray
    q, k, v = _inputs(rng)
    kv0 = rng.random((3, 2, 16, 6))
    ids = _ids()[:, None, :]
    out, state = fc.favor_attention(a(q), a(k), a(v), features=FMAP, causal=True,
                                    segment_ids=a(ids), state=fc.AttentionState(a(kv0)),
                                    return_state=True)  # fmt: skip
    for r, cuts in enumerate(CUTS):
        first, last = (cuts[0], cuts[1]), (cuts[-2], cuts[-1])

        def sl(t, lo, hi, r=r):
            return a(t[r : r + 1, :, lo:hi])

        want = fc.favor_attention(sl(q, *first), sl(k, *first), sl(v, *first), features=FMAP,
                                  causal=True, state=fc.AttentionState(a(kv0[r : r + 1])))  # fmt: skip
        np.testing.assert_allclose(to_numpy(out)[r : r + 1, :, first[0] : first[1]], to_numpy(want),
                                   rtol=1e-10, atol=1e-12)  # fmt: skip
        start = fc.AttentionState(a(kv0[r : r + 1])) if len(cuts) == 2 else None
        _, after = fc.favor_attention(sl(q, *last), sl(k, *last), sl(v, *last), features=FMAP,
                                      causal=True, state=start, return_state=True)  # fmt: skip
        np.testing.assert_allclose(to_numpy(state.kv)[r : r + 1], to_numpy(after.kv),
                                   rtol=1e-10, atol=1e-12)  # fmt: skip


def test_cross_attention_with_kv_segment_ids(backend: Backend, rng: np.random.Generator) -> None:
    # query document s attends to the key document with the same id; an id the keys
    # lack gives rows of 0
    a = backend.asarray
    q = rng.standard_normal((1, 30, 8)) / 2
    k, v = rng.standard_normal((1, 44, 8)) / 2, rng.standard_normal((1, 44, 3))
    q_ids = np.array([[1] * 10 + [2] * 12 + [7] * 8])
    k_ids = np.array([[1] * 20 + [2] * 24])
    # (no warning: the rows without keys have no valid key, as masked rows)
    got = to_numpy(fc.favor_attention(a(q), a(k), a(v), features=FMAP, segment_ids=a(q_ids),
                                      kv_segment_ids=a(k_ids)))  # fmt: skip
    for (qa, qb), (ka, kb) in (((0, 10), (0, 20)), ((10, 22), (20, 44))):
        want = fc.favor_attention(a(q[:, qa:qb]), a(k[:, ka:kb]), a(v[:, ka:kb]), features=FMAP)
        np.testing.assert_allclose(got[:, qa:qb], to_numpy(want), rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(got[:, 22:], 0.0)


def test_perturbing_one_document_leaves_the_others_bitwise_equal(rng: np.random.Generator) -> None:
    # outputs and gradients of the other documents do not change, not even by rounding
    torch = pytest.importorskip("torch")
    q, k, v = (torch.tensor(t, requires_grad=True) for t in _inputs(rng))
    ids = torch.tensor(_ids()[:, None, :])

    def run(k):
        out = fc.favor_attention(q, k, v, segment_ids=ids)  # the default: its own statistics
        grads = torch.autograd.grad((out * torch.arange(out.numel()).reshape(out.shape)).sum(),
                                    (q, k, v))  # fmt: skip
        return out.detach(), grads

    out, grads = run(k)
    k2 = k.detach().clone()
    k2[0, :, 20:35] += 3.0  # the second document of row 0
    k2.requires_grad_()
    out2, grads2 = run(k2)
    others = np.ones((3, 61), bool)
    others[0, 20:35] = False
    sel = torch.tensor(others)[:, None, :].expand(3, 2, 61)
    assert not torch.equal(out[~sel], out2[~sel])
    assert torch.equal(out[sel], out2[sel])
    for g, g2 in zip(grads, grads2, strict=True):
        assert torch.equal(g[sel], g2[sel])


def test_packed_vjp_equals_finite_differences(backend: Backend, rng: np.random.Generator) -> None:
    a = backend.asarray
    q, k, v = _inputs(rng, heads=1, length=30)
    ids = _ids(([0, 11, 30], [0, 30], [0, 3, 30]), 30)[:, None, :]
    g = rng.standard_normal(v.shape)
    # (no statistics from the tokens: finite differences would see through them)
    kw = {"features": fc.OptimalPositiveFeatures(m=16, seed=1, a=-0.1), "segment_ids": a(ids),
          "chunk_size": 4, "balance": False}  # fmt: skip
    for causal in (False, True):
        dq, dk, dv, _ = fc.favor_attention_vjp(a(q), a(k), a(v), a(g), causal=causal, **kw)
        e = [rng.standard_normal(t.shape) for t in (q, k, v)]
        h = 1e-5

        def f(s, e=e, causal=causal):
            out = fc.favor_attention(a(q + s * e[0]), a(k + s * e[1]), a(v + s * e[2]),
                                     causal=causal, **kw)  # fmt: skip
            return float((to_numpy(out) * g).sum())

        fd = (f(h) - f(-h)) / (2 * h)
        got = sum(float((to_numpy(d) * t).sum()) for d, t in zip((dq, dk, dv), e, strict=True))
        assert got == pytest.approx(fd, rel=1e-6, abs=1e-9)


def test_bad_segment_ids_raise(rng: np.random.Generator) -> None:
    q, k, v = _inputs(rng)
    ids = _ids()[:, None, :]
    with pytest.raises(ValueError, match="segment_ids must not decrease"):
        fc.favor_attention(q, k, v, segment_ids=ids[..., ::-1].copy())
    with pytest.raises(TypeError, match="segment_ids must be an integer array"):
        fc.favor_attention(q, k, v, segment_ids=ids.astype(float))
    with pytest.raises(ValueError, match=r"segment_ids must have shape batch \+ \(L,\)"):
        fc.favor_attention(q, k, v, segment_ids=ids[:, 0])
    with pytest.raises(ValueError, match="a bidirectional state holds the sums of one sequence"):
        fc.favor_attention(q, k, v, features=FMAP, segment_ids=ids, return_state=True)
    with pytest.raises(ValueError, match="pass kv_segment_ids"):
        fc.favor_attention(q, k[..., :30, :], v[..., :30, :], segment_ids=ids)


def test_jax_eager_arrays(rng: np.random.Generator) -> None:
    jnp = pytest.importorskip("jax.numpy")
    q, k, v = _inputs(rng)
    ids = _ids()[:, None, :]
    for causal in (False, True):
        got = fc.favor_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal=causal,
                                 segment_ids=jnp.asarray(ids))  # fmt: skip
        want = fc.favor_attention(q, k, v, causal=causal, segment_ids=ids)
        # float32 (JAX's default) against float64: the gamma_n bound of 61 keys, 256 features
        u = float(np.finfo(np.float32).eps)
        np.testing.assert_allclose(
            np.asarray(got), want, rtol=0, atol=2 * (61 + 256) * u * 4 * np.abs(v).max()
        )


FIXED_A = fc.OptimalPositiveFeatures(m=16, seed=1, a=-0.1)
TRACED = {  # (causal, features, balance): every map whose statistics are not the tokens'
    "causal": (True, FMAP, None),
    "causal, default": (True, None, None),
    "bidirectional": (False, FMAP, False),
    "bidirectional, FAVOR++ a fixed": (False, FIXED_A, False),
}


@pytest.mark.parametrize("case", list(TRACED))
@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_traced_ids_under_jit_equal_the_eager_call(
    rng: np.random.Generator, case: str, gqa: bool, masked: bool
) -> None:
    # Under jax.jit the boundaries are not known when the program is built: the chunked scan
    # restarts where a document starts (inside a chunk, on its bound, in the last, shorter
    # piece: 61 = 8 * 7 + 5); bidirectional, a second scan from the end adds the keys after
    # each row. The result, the state carried into the first document and the last
    # document's state are those of the eager ids' groups (float64 NumPy), up to rounding
    # of the same sums. (Causal calls compute no statistics from their tokens, so the
    # default map takes traced ids too.)
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    causal, fmap, balance = TRACED[case]
    q, k, v = _inputs(rng, heads=4)
    if gqa:  # 4 query heads, 2 key heads
        k, v = k[:, :2], v[:, :2]
    m = (fmap or fc.DEFAULT_FEATURES).num_features(8)
    kv0 = rng.random((3, 2 if gqa else 4, m, 6)) if causal else None
    mask = rng.random((3, 1, 61)) < 0.8 if masked else None
    ids = _ids()[:, None, :]
    kw = {"features": fmap, "causal": causal, "chunk_size": 7, "enable_gqa": gqa,
          "balance": balance, "return_state": causal}  # fmt: skip

    def call(q, k, v, ids, kv0, mask):
        state = None if kv0 is None else fc.AttentionState(kv0)
        return fc.favor_attention(q, k, v, segment_ids=ids, key_mask=mask, state=state, **kw)

    got = jax.jit(call)(*(None if t is None else jnp.asarray(t) for t in (q, k, v, ids, kv0, mask)))
    want = call(q, k, v, ids, kv0, mask)
    for g, w in zip(got if causal else [got], want if causal else [want], strict=True):
        g, w = (t.kv if isinstance(t, fc.AttentionState) else t for t in (g, w))
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-10, atol=1e-12)


def test_traced_ids_are_runs_and_their_gradients_are_the_eager_ones(
    rng: np.random.Generator,
) -> None:
    # A document is a run of equal ids, whatever the numbers (an id may come back later:
    # another document); jax.grad through the traced scan equals jax.grad of the eager
    # ids' groups.
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    q, k, v = (jnp.asarray(t) for t in _inputs(rng, heads=1, length=30))
    runs = np.array([[5] * 9 + [2] * 4 + [5] * 17, [1] * 30, [0, 3] + [1] * 28])[:, None, :]
    numbered = np.cumsum(np.diff(runs, axis=-1, prepend=runs[..., :1]) != 0, axis=-1)
    weights = jnp.asarray(rng.standard_normal(v.shape))

    for causal in (True, False):

        def loss(q, k, v, ids, causal=causal):
            out = fc.favor_attention(q, k, v, features=FMAP, causal=causal, segment_ids=ids,
                                     chunk_size=4, balance=False)  # fmt: skip
            return (out * weights).sum(), out

        traced = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
        grads, out = traced(q, k, v, jnp.asarray(runs))
        want_grads, want = jax.grad(
            lambda q, k, v, loss=loss: loss(q, k, v, numbered), argnums=(0, 1, 2), has_aux=True
        )(q, k, v)  # eager ids (closed over): the groups' path, JAX's autodiff
        np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-10, atol=1e-12)
        for g, w in zip(grads, want_grads, strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-9, atol=1e-12)


def test_traced_ids_refused_where_they_cannot_work(rng: np.random.Generator) -> None:
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    q = jnp.asarray(_inputs(rng)[0])
    ids = jnp.asarray(_ids()[:, None, :])

    def run(**kw):
        return jax.jit(lambda q, i: fc.favor_attention(q, q, q, segment_ids=i, **kw))(q, ids)

    with pytest.raises(ValueError, match="each document's statistics"):
        run(features=FMAP)  # bidirectional: the balance of each call's tokens
    with pytest.raises(ValueError, match="a bidirectional state holds the sums of one sequence"):
        run(features=FMAP, balance=False, return_state=True)
    with pytest.raises(ValueError, match="the keys' documents must be the queries'"):
        jax.jit(lambda q, i: fc.favor_attention(q, q, q, features=FMAP, balance=False,
                                                segment_ids=i, kv_segment_ids=i))(q, ids)  # fmt: skip
    with pytest.raises(ValueError, match="give the heads axis size 1"):
        jax.jit(lambda q, i: fc.favor_attention(q, q[:, :1], q[:, :1], features=FMAP,
                                                causal=True, segment_ids=i, enable_gqa=True))(
            q, jnp.broadcast_to(ids, (3, 2, 61))
        )  # fmt: skip
    with pytest.raises(ValueError, match="differentiate favor_attention with jax"):
        jax.jit(lambda q, i: fc.favor_attention_vjp(q, q, q, q, features=FMAP, causal=True,
                                                    segment_ids=i))(q, ids)  # fmt: skip
    with pytest.raises(TypeError, match="segment_ids must be an integer array"):
        jax.jit(lambda q, i: fc.favor_attention(q, q, q, features=FMAP, causal=True,
                                                segment_ids=i))(q, ids * 1.0)  # fmt: skip
