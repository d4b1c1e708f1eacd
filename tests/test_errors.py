"""Every bad input raises a clear exception naming the argument and what was expected."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import Backend

import favorcore as fc

lazy_xp_modules = [fc]  # see conftest.py: jax.jit on JAX, no compute on Dask

FMAP = fc.PositiveFeatures(m=8, seed=0)


def _inputs(backend: Backend, rng: np.random.Generator):
    a = backend.asarray
    return (
        a(rng.standard_normal((2, 6, 4))),
        a(rng.standard_normal((2, 6, 4))),
        a(rng.standard_normal((2, 6, 3))),
    )


CASES = [
    (
        "projection shape",
        lambda q, k, v, a, xp: fc.favor_attention(
            q, k, v, features=FMAP, projection=a(np.ones((8, 3)))
        ),
        ValueError,
        r"projection must have shape \(8, 4\)",
    ),
    # (description, call(q, k, v, a, xp) -> None, exception, message)
    (
        "rank-1 query",
        lambda q, k, v, a, xp: fc.favor_attention(q[0, 0, ...], k, v, features=FMAP),
        ValueError,
        r"q must have shape \(\.\.\., L, dim\)",
    ),
    (
        "d mismatch",
        lambda q, k, v, a, xp: fc.favor_attention(q, k[..., :3], v, features=FMAP),
        ValueError,
        "q and k need the same last dimension",
    ),
    (
        "length mismatch",
        lambda q, k, v, a, xp: fc.favor_attention(q, k, v[:, :5, :], features=FMAP),
        ValueError,
        "k and v need the same length",
    ),
    (
        "integer dtype",
        lambda q, k, v, a, xp: fc.favor_attention(xp.astype(q, xp.int64), k, v, features=FMAP),
        TypeError,
        "q must have a real floating dtype",
    ),
    (
        "mixed dtypes",
        lambda q, k, v, a, xp: fc.favor_attention(q, xp.astype(k, xp.float32), v, features=FMAP),
        TypeError,
        "q, k and v must share one dtype",
    ),
    (
        "batch mismatch",
        lambda q, k, v, a, xp: fc.favor_attention(
            q, xp.concat([k, k, k]), xp.concat([v, v, v]), features=FMAP
        ),
        ValueError,
        "batch dimensions of q",
    ),
    (
        "mask dtype",
        lambda q, k, v, a, xp: fc.favor_attention(
            q, k, v, features=FMAP, key_mask=a(np.ones((2, 6)))
        ),
        TypeError,
        "key_mask must be a boolean array",
    ),
    (
        "mask length",
        lambda q, k, v, a, xp: fc.favor_attention(
            q, k, v, features=FMAP, key_mask=a(np.ones((2, 5), bool))
        ),
        ValueError,
        r"key_mask must have shape batch \+ \(Lk,\) = \(2, 6\)",
    ),
    (
        "mask batch",
        lambda q, k, v, a, xp: fc.favor_attention(
            q, k, v, features=FMAP, key_mask=a(np.ones((3, 6), bool))
        ),
        ValueError,
        "key_mask must have shape batch",
    ),
    (
        "mask too many dims",
        lambda q, k, v, a, xp: fc.favor_attention(
            q, k, v, features=FMAP, key_mask=a(np.ones((4, 2, 6), bool))
        ),
        ValueError,
        "key_mask must have shape batch",
    ),
    (
        "mask of fewer dimensions",
        lambda q, k, v, a, xp: fc.favor_attention(
            q[None, ...],
            k[None, ...],
            v[None, ...],
            features=FMAP,
            key_mask=a(np.ones((1, 6), bool)),
        ),
        ValueError,
        r"add the missing axes, e.g. key_mask\[:, None, :\]",
    ),
    (
        "mask scalar",
        lambda q, k, v, a, xp: fc.favor_attention(
            q, k, v, features=FMAP, key_mask=a(np.array(True))
        ),
        ValueError,
        "key_mask must have shape batch",
    ),
    (
        "chunk 0",
        lambda q, k, v, a, xp: fc.favor_attention(
            q, k, v, features=FMAP, causal=True, chunk_size=0
        ),
        ValueError,
        "chunk_size must be a positive integer",
    ),
    (
        "chunk float",
        lambda q, k, v, a, xp: fc.favor_attention(
            q, k, v, features=FMAP, causal=True, chunk_size=2.0
        ),
        ValueError,
        "chunk_size must be a positive integer",
    ),
    (
        "causal Lq != Lk",
        lambda q, k, v, a, xp: fc.favor_attention(q[:, :3, :], k, v, features=FMAP, causal=True),
        ValueError,
        "causal attention needs q and k of the same length",
    ),
    (
        "scale <= 0",
        lambda q, k, v, a, xp: fc.favor_attention(q, k, v, features=FMAP, scale=0.0),
        ValueError,
        "scale must be a finite positive number",
    ),
    (
        "scale nan",
        lambda q, k, v, a, xp: fc.favor_attention(q, k, v, features=FMAP, scale=float("nan")),
        ValueError,
        "scale must be a finite positive number",
    ),
    (
        "features not a map",
        lambda q, k, v, a, xp: fc.favor_attention(q, k, v, features=256),
        TypeError,
        "features must be a FeatureMap",
    ),
    (
        "state of other m",
        lambda q, k, v, a, xp: fc.favor_attention(
            q, k, v, features=FMAP, causal=True, state=fc.AttentionState(a(np.zeros((2, 16, 4))))
        ),
        ValueError,
        r"state.kv has shape \(2, 16, 4\), but these inputs need batch \+ \(m, dv \+ 1\) = \(2, 8, 4\)",
    ),
    (
        "state of other batch",
        lambda q, k, v, a, xp: fc.favor_attention(
            q, k, v, features=FMAP, causal=True, state=fc.AttentionState(a(np.zeros((3, 8, 4))))
        ),
        ValueError,
        "state.kv has shape",
    ),
    (
        "state not an AttentionState",
        lambda q, k, v, a, xp: fc.favor_attention(
            q, k, v, features=FMAP, causal=True, state=a(np.zeros((2, 8, 4)))
        ),
        TypeError,
        "state must be an AttentionState",
    ),
    (
        "not an array",
        lambda q, k, v, a, xp: fc.favor_attention(q, [[1.0]], v, features=FMAP),
        TypeError,
        "k must be an array",
    ),
    (
        "linear: feature widths",
        lambda q, k, v, a, xp: fc.linear_attention(q, k[..., :3], v),
        ValueError,
        "qf and kf need the same last dimension",
    ),
    (
        "linear: causal Lq != Lk",
        lambda q, k, v, a, xp: fc.linear_attention(q[:, :2, :], k, v, causal=True),
        ValueError,
        "causal attention needs qf and kf of the same length",
    ),
    (
        "linear: mask",
        lambda q, k, v, a, xp: fc.linear_attention(q, k, v, key_mask=a(np.ones(7, bool))),
        ValueError,
        "key_mask must have shape batch",
    ),
    (
        "softmax: v length",
        lambda q, k, v, a, xp: fc.softmax_attention(q, k, v[:, :2, :]),
        ValueError,
        "k and v need the same length",
    ),
    (
        "softmax: scale",
        lambda q, k, v, a, xp: fc.softmax_attention(q, k, v, scale=-1.0),
        ValueError,
        "scale must be a finite positive number",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "match"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_raises(
    backend: Backend, rng: np.random.Generator, call, error: type, match: str
) -> None:
    q, k, v = _inputs(backend, rng)
    with pytest.raises(error, match=match):
        call(q, k, v, backend.asarray, backend.xp)


@pytest.mark.parametrize("function", ["favor", "linear", "softmax"])
def test_arrays_of_two_frameworks_raise(rng: np.random.Generator, function: str) -> None:
    strict = pytest.importorskip("array_api_strict")
    q, k, v = (rng.standard_normal((6, 4)) for _ in range(3))
    k_other = strict.asarray(k)
    names = "qf: numpy.ndarray, kf" if function == "linear" else "q: numpy.ndarray, k"
    call = {
        "favor": lambda: fc.favor_attention(q, k_other, v, features=FMAP),
        "linear": lambda: fc.linear_attention(np.abs(q), k_other, v),
        "softmax": lambda: fc.softmax_attention(q, k_other, v),
    }[function]
    with pytest.raises(
        TypeError, match=rf"more than one array framework in one call \({names}: array_api_strict"
    ):
        call()


def test_state_from_another_framework_raises(rng: np.random.Generator) -> None:
    strict = pytest.importorskip("array_api_strict")
    q = rng.standard_normal((6, 4))
    state = fc.AttentionState(strict.asarray(np.zeros((8, 5))))
    with pytest.raises(TypeError, match="arrays from more than one array framework"):
        fc.favor_attention(q, q, q, features=FMAP, causal=True, state=state)
