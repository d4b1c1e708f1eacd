"""Projections: shapes, seeding across backends, orthogonality, row lengths, Haar sign fix."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import Backend, check_array

from favorcore import draw_projection

KINDS = ["iid", "orthogonal", "hadamard", "givens"]
Z = 5.0  # z-score bound of the statistical checks: two-sided p ~ 6e-7 per check


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [3, 8, 21])
def test_same_seed_same_matrix_on_every_backend(backend: Backend, kind: str, rows: int) -> None:
    xp = backend.xp
    host = draw_projection(rows, 8, kind=kind, seed=7)
    assert host.dtype == np.float64
    assert host.shape == (rows, 8)
    w64 = draw_projection(
        rows, 8, kind=kind, seed=7, xp=xp, dtype=xp.float64, device=backend.device
    )
    np.testing.assert_array_equal(
        check_array(backend, w64, shape=(rows, 8), dtype=xp.float64), host
    )
    w32 = draw_projection(
        rows, 8, kind=kind, seed=7, xp=xp, dtype=xp.float32, device=backend.device
    )
    np.testing.assert_array_equal(
        check_array(backend, w32, shape=(rows, 8), dtype=xp.float32), host.astype(np.float32)
    )
    assert not np.array_equal(host, draw_projection(rows, 8, kind=kind, seed=8))


@pytest.mark.parametrize("kind", ["orthogonal", "hadamard", "givens"])
@pytest.mark.parametrize("norms", ["chi", "fixed"])
@pytest.mark.parametrize("d", [1, 2, 8, 16])
def test_blocks_are_orthogonal(kind: str, norms: str, d: int) -> None:
    rows = 3 * d + 1  # more rows than d, and a partial last block
    w = draw_projection(rows, d, kind=kind, norms=norms, seed=1)
    lengths = np.linalg.norm(w, axis=1)
    for start in range(0, rows, d):
        block = w[start : start + d] / lengths[start : start + d, None]
        gram = block @ block.T
        np.testing.assert_allclose(gram, np.eye(len(block)), atol=20 * d * np.finfo(float).eps)
    if norms == "fixed":
        np.testing.assert_allclose(lengths, math.sqrt(d), rtol=1e-13)
    if d > 1:  # blocks are fresh draws, not copies of one block
        assert len({w[s : s + d].tobytes() for s in range(0, 3 * d, d)}) > 1


def test_fewer_rows_than_d_are_orthogonal() -> None:
    w = draw_projection(5, 16, kind="orthogonal", norms="fixed", seed=3)
    np.testing.assert_allclose(w @ w.T, 16 * np.eye(5), atol=1e-12)


@pytest.mark.parametrize("kind", ["iid", "orthogonal", "givens", "hadamard"])
def test_chi_norms_have_the_gaussian_squared_length(kind: str) -> None:
    # |w|^2 ~ chi^2(d): mean d, variance 2d; test the mean over n rows with a z-score.
    d, n = 8, 8 * 4000
    sq = (draw_projection(n, d, kind=kind, norms="chi", seed=11) ** 2).sum(1)
    z = (sq.mean() - d) / math.sqrt(2 * d / n)
    assert abs(z) < Z


@pytest.mark.parametrize("kind", ["iid", "orthogonal"])
def test_rows_are_marginally_standard_gaussian(kind: str) -> None:
    # Each coordinate of a Gaussian/Haar-chi row is N(0, 1): mean 0, variance 1, and the
    # sign-fixed QR makes the first coordinate of the first row of a block symmetric
    # (without the fix, LAPACK's Householder QR makes it one-signed: mean != 0).
    d, blocks = 4, 6000
    w = draw_projection(d * blocks, d, kind=kind, seed=5)
    first = w[::d, 0]
    assert abs(first.mean() / math.sqrt(1 / blocks)) < Z
    coords = w.ravel()
    assert abs(coords.mean() / math.sqrt(1 / coords.size)) < Z
    # var of a sample variance of N(0,1) values: 2/n (rows of one block are dependent,
    # so use blocks as the independent unit: n = blocks).
    assert abs((first**2).mean() - 1) / math.sqrt(2 / blocks) < Z


def test_givens_rotations_never_reuse_an_index() -> None:
    # The anchor's bug: i == j makes a "rotation" that is not orthogonal. With d = 2 every
    # rotation has to use both indices; a repeated index would break orthogonality here.
    for seed in range(50):
        w = draw_projection(2, 2, kind="givens", norms="fixed", seed=seed)
        np.testing.assert_allclose(w @ w.T, 2 * np.eye(2), atol=1e-13)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rows": 0, "d": 4}, "rows must be a positive integer"),
        ({"rows": 4, "d": -1}, "d must be a positive integer"),
        ({"rows": 2.5, "d": 4}, "rows must be a positive integer"),
        ({"rows": 4, "d": 4, "kind": "gauss"}, "kind must be one of"),
        ({"rows": 4, "d": 4, "norms": "unit"}, "norms must be one of"),
        ({"rows": 4, "d": 6, "kind": "hadamard"}, "power of two, got d=6"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        draw_projection(**kwargs)


@pytest.mark.parametrize("d", [2, 3, 8, 16])
@pytest.mark.parametrize("norms", ["chi", "fixed"])
def test_simplex_blocks_are_rotated_regular_simplices(d: int, norms: str) -> None:
    w = draw_projection(3 * d, d, kind="simplex", norms=norms, seed=2)
    for start in range(0, 3 * d, d):
        block = w[start : start + d]
        unit = block / np.linalg.norm(block, axis=1, keepdims=True)
        cos = unit @ unit.T
        want = np.full((d, d), -1.0 / (d - 1))
        np.fill_diagonal(want, 1.0)
        np.testing.assert_allclose(cos, want, atol=1e-12)
    assert not np.allclose(w[:d], w[d : 2 * d])  # each block has its own rotation


def test_simplex_rows_are_marginally_uniform() -> None:
    # as for the orthogonal kind: first coordinates symmetric, unit variance (chi lengths)
    d, blocks = 4, 6000
    w = draw_projection(d * blocks, d, kind="simplex", seed=9)
    first = w[::d, 0]
    assert abs(first.mean() / math.sqrt(1 / blocks)) < Z
    assert abs((first**2).mean() - 1) / math.sqrt(2 / blocks) < Z
