"""Random projection matrices for random-feature maps.

Every matrix is drawn on the host with ``numpy.random.default_rng(seed)`` in float64 and
only then converted to the caller's namespace, dtype and device, so the same seed gives
the same matrix on every backend.

Kinds
-----
``"iid"``
    Rows are independent standard Gaussian vectors.
``"orthogonal"``
    Stacked ``d x d`` blocks of a Haar-distributed orthogonal matrix (QR of a Gaussian
    matrix with the sign fix ``Q * sign(diag(R))``), truncated to the requested rows.
``"hadamard"``
    Structured orthogonal blocks ``H D1 H D2 H D3`` (normalised Walsh-Hadamard ``H``,
    Rademacher diagonals ``Di``; SORF). ``d`` must be a power of two.
``"givens"``
    Blocks that are products of ``d * ceil(ln d)`` Givens rotations, each in a plane
    ``(i, j)`` with ``i != j`` drawn without replacement, with a uniform angle; every block
    has fresh draws.
``"simplex"``
    Simplex random features (arXiv 2301.13856): the ``d`` unit rows of a block point to
    the vertices of a regular simplex (pairwise cosine ``-1/(d-1)``), rotated by a
    Haar-random orthogonal matrix; each row is still marginally uniform in direction.

Within a block the rows are exactly orthogonal for all kinds but ``"iid"`` and
``"simplex"`` (whose rows have the simplex's negative cosines). Row norms are
then either ``"chi"`` (independent chi(d) lengths, so that each row is marginally
Gaussian, which keeps the softmax-kernel estimators unbiased for ``"iid"`` and
``"orthogonal"``) or ``"fixed"`` (every row has length ``sqrt(d)``).
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any, Literal, get_args

import numpy as np

from ._compat import Array, from_host

ProjectionKind = Literal["iid", "orthogonal", "hadamard", "givens", "simplex"]
NormKind = Literal["chi", "fixed"]
Seed = int | np.random.SeedSequence | None

PROJECTION_KINDS: tuple[str, ...] = get_args(ProjectionKind)
NORM_KINDS: tuple[str, ...] = get_args(NormKind)

__all__ = ["NORM_KINDS", "PROJECTION_KINDS", "draw_projection"]


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _orthogonal_block(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    # Sign fix: without it QR's sign convention makes Q non-Haar (biased).
    signs = np.sign(np.diag(r))
    signs[signs == 0] = 1.0
    block: np.ndarray = (q * signs).T
    return block


def hadamard_matrix(d: int) -> np.ndarray:
    """The normalised ``d x d`` Walsh-Hadamard matrix (``d`` a power of two)."""
    h: np.ndarray = np.ones((1, 1))
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    return h / math.sqrt(d)


def _hadamard_block(rng: np.random.Generator, d: int) -> np.ndarray:
    h = hadamard_matrix(d)
    block = np.eye(d)
    for _ in range(3):
        block = h @ (rng.choice([-1.0, 1.0], size=d)[:, None] * block)
    return block


def _givens_block(rng: np.random.Generator, d: int) -> np.ndarray:
    if d == 1:
        return np.array([[rng.choice([-1.0, 1.0])]])
    block = np.eye(d)
    for _ in range(d * math.ceil(math.log(d))):
        i, j = rng.choice(d, size=2, replace=False)
        theta = rng.uniform(0.0, 2.0 * math.pi)
        c, s = math.cos(theta), math.sin(theta)
        row_i, row_j = block[i].copy(), block[j]
        block[i] = c * row_i - s * row_j
        block[j] = s * row_i + c * row_j
    return block


def simplex_directions(d: int) -> np.ndarray:
    """The ``d`` unit rows of a regular simplex centred at 0 (pairwise cosine ``-1/(d-1)``)."""
    if d == 1:
        return np.ones((1, 1))
    s = np.eye(d) - 1.0 / d
    unit: np.ndarray = s / np.linalg.norm(s, axis=1, keepdims=True)
    return unit


def _simplex_block(rng: np.random.Generator, d: int) -> np.ndarray:
    if d == 1:
        return np.array([[rng.choice([-1.0, 1.0])]])
    block: np.ndarray = simplex_directions(d) @ _orthogonal_block(rng, d)
    return block


_BLOCKS = {
    "orthogonal": _orthogonal_block,
    "hadamard": _hadamard_block,
    "givens": _givens_block,
    "simplex": _simplex_block,
}


def draw_projection(
    rows: int,
    d: int,
    *,
    kind: ProjectionKind = "orthogonal",
    norms: NormKind = "chi",
    seed: Seed = None,
    xp: ModuleType | None = None,
    dtype: Any = None,
    device: Any = None,
) -> Array:
    """Draw a ``(rows, d)`` random projection on the host in float64 (in ``xp`` if given).

    Parameters
    ----------
    rows : int
        Number of rows (random directions), any positive number, more or fewer than ``d``.
    d : int
        Input dimension.
    kind : {"iid", "orthogonal", "hadamard", "givens", "simplex"}
        How rows are coupled; see the module docstring.
    norms : {"chi", "fixed"}
        Row lengths: independent chi(d) draws, or all ``sqrt(d)``.
    seed : int, numpy.random.SeedSequence or None
        Seed of ``numpy.random.default_rng``; ``None`` draws fresh entropy.
    xp : namespace, optional
        Array API namespace of the result; by default a NumPy array.
    dtype, device : optional
        Floating dtype (default float64) and device of the result in ``xp``.

    Returns
    -------
    array
        ``(rows, d)``: a float64 NumPy array, or an array of ``xp``. The same seed gives
        the same values in every namespace, up to the rounding of ``dtype``.

    Raises
    ------
    ValueError
        If ``rows`` or ``d`` is not a positive integer, ``kind`` or ``norms`` is unknown,
        or ``kind="hadamard"`` and ``d`` is not a power of two.

    Examples
    --------
    >>> w = draw_projection(8, 4, kind="orthogonal", seed=0)
    >>> w.shape
    (8, 4)
    >>> import numpy as np
    >>> g = w[:4] @ w[:4].T  # one block: orthogonal rows
    >>> bool(np.allclose(g - np.diag(np.diag(g)), 0))
    True
    >>> import array_api_strict
    >>> draw_projection(4, 2, seed=1, xp=array_api_strict, dtype=array_api_strict.float32).dtype
    array_api_strict.float32
    """
    rows = _check_positive_int("rows", rows)
    d = _check_positive_int("d", d)
    if kind not in PROJECTION_KINDS:
        raise ValueError(f"kind must be one of {PROJECTION_KINDS}, got {kind!r}")
    if norms not in NORM_KINDS:
        raise ValueError(f"norms must be one of {NORM_KINDS}, got {norms!r}")
    if kind == "hadamard" and d & (d - 1):
        raise ValueError(
            f"kind='hadamard' needs d to be a power of two, got d={d}; "
            "use kind='orthogonal' or 'givens' for other d"
        )
    host = _draw(np.random.default_rng(seed), rows, d, kind, norms)
    if xp is None:
        return host
    return from_host(xp, host, dtype=xp.float64 if dtype is None else dtype, device=device)


def _draw(rng: np.random.Generator, rows: int, d: int, kind: str, norms: str) -> np.ndarray:
    if kind == "iid":
        w = rng.standard_normal((rows, d))
        if norms == "fixed":
            w *= math.sqrt(d) / np.linalg.norm(w, axis=1, keepdims=True)
        return w
    n_blocks = -(-rows // d)
    w = np.concatenate([_BLOCKS[kind](rng, d) for _ in range(n_blocks)])[:rows]
    # Blocks have unit rows; give them their lengths.
    lengths = (
        np.sqrt(rng.chisquare(d, size=rows)) if norms == "chi" else np.full(rows, math.sqrt(d))
    )
    result: np.ndarray = w * lengths[:, None]
    return result
