"""JAX adapter: the engine's block settings, projections drawn from a ``jax.random`` key.

The core runs on JAX arrays as it is, under ``jit``, ``vmap`` and ``grad``; importing this
module (the core does it when it first meets JAX arrays) registers the engine's block
settings for JAX (:data:`STEPS`, the standard operations). What only JAX
has is functional randomness: :func:`draw_projection` draws a projection from a key, so a
redraw can happen inside traced code (a training step), and :func:`feature_matrix` turns
it into the matrix a feature map expects (pass it as ``favor_attention(projection=...)``).
:class:`favorcore_backends.flax.FavorSelfAttention` is a ``flax.linen`` module built on it.

The key-based draws follow the same distributions as the host draws of
:func:`favorcore.draw_projection` (not the same numbers: host draws are seeded NumPy).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from favorcore import FeatureMap, Steps, register_steps
from favorcore.features import Exponent
from favorcore.projection import (
    NORM_KINDS,
    PROJECTION_KINDS,
    hadamard_matrix,
    simplex_directions,
)
from favorcore.steps import Call, backward, forward

__all__ = ["STEPS", "JaxSteps", "draw_projection", "feature_matrix"]


class JaxSteps(Steps):
    """The standard operations with every batch row in one block (one copy of the block
    computation per block in the traced program), at most ``max_blocks`` blocks per
    sequence (the program and its compile time grow with their number). A bidirectional
    call of a positive map differentiates through the engine's own backward pass
    (``jax.custom_vjp``, faster than JAX's autodiff of the forward); causal calls through
    JAX's autodiff, which XLA schedules better there (faster and in less memory than the
    engine's backward) and which also gives forward-mode derivatives (figures: the
    architecture page), as do packed calls whose segment ids are traced."""

    def __init__(self) -> None:
        super().__init__(block=1024, chunk=128, vectorized=True, max_blocks=32)

    def run(self, call: Call) -> tuple[Any, Any, Any]:
        if not isinstance(call.form, Exponent) or call.causal or call.resets is not None:
            return super().run(call)
        form = call.form

        def rebuild(arrays: tuple[Any, ...]) -> Call:
            x, y, v, kv0, mask, query, query_bias, key, key_bias, transform, shift = arrays
            new = Exponent(query, query_bias, key, key_bias, form.half, transform, shift)
            return call.with_arrays(x=x, y=y, v=v, kv0=kv0, mask=mask, form=new)

        @jax.custom_vjp
        def attend(arrays: tuple[Any, ...]) -> tuple[Any, Any, Any]:
            out, kv, small, _ = forward(rebuild(arrays))
            return out, kv, small

        def attend_fwd(arrays: tuple[Any, ...]) -> tuple[tuple[Any, Any, Any], Any]:
            out, kv, small, sums = forward(rebuild(arrays))
            return (out, kv, small), (arrays, out, kv, sums)

        def attend_bwd(res: Any, cotangents: Any) -> tuple[tuple[Any, ...]]:
            arrays, out, kv, sums = res
            g_out, g_kv, _ = cotangents
            dx, dy, dv, dkv0 = backward(rebuild(arrays), out, kv, sums, g_out, g_kv)
            return ((dx, dy, dv, dkv0, *([None] * 7)),)

        attend.defvjp(attend_fwd, attend_bwd)
        fields = (form.query, form.query_bias, form.key, form.key_bias, form.transform, form.shift)
        return attend((call.x, call.y, call.v, call.kv0, call.mask, *fields))


STEPS = JaxSteps()
register_steps("jax.numpy", STEPS)


def _orthogonal_block(key: jax.Array, d: int, dtype: Any) -> jax.Array:
    q, r = jnp.linalg.qr(jax.random.normal(key, (d, d), dtype))
    signs = jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0).astype(dtype)
    return (q * signs).T


def _hadamard_block(key: jax.Array, d: int, dtype: Any) -> jax.Array:
    h = jnp.asarray(hadamard_matrix(d), dtype)
    block = jnp.eye(d, dtype=dtype)
    for sub in jax.random.split(key, 3):
        block = h @ (jax.random.rademacher(sub, (d,), dtype)[:, None] * block)
    return block


def _givens_block(key: jax.Array, d: int, dtype: Any) -> jax.Array:
    if d == 1:
        return jax.random.rademacher(key, (1, 1), dtype)
    count = d * math.ceil(math.log(d))
    k_pairs, k_angles = jax.random.split(key)
    # i != j: draw i, then j from the other d - 1 indices
    first = jax.random.randint(k_pairs, (count,), 0, d)
    offset = jax.random.randint(jax.random.fold_in(k_pairs, 1), (count,), 1, d)
    second = (first + offset) % d
    angles = jax.random.uniform(k_angles, (count,), dtype, 0.0, 2.0 * math.pi)

    def rotate(t: int, block: jax.Array) -> jax.Array:
        i, j, c, s = first[t], second[t], jnp.cos(angles[t]), jnp.sin(angles[t])
        row_i, row_j = block[i], block[j]
        return block.at[i].set(c * row_i - s * row_j).at[j].set(s * row_i + c * row_j)

    block: jax.Array = jax.lax.fori_loop(0, count, rotate, jnp.eye(d, dtype=dtype))
    return block


def _simplex_block(key: jax.Array, d: int, dtype: Any) -> jax.Array:
    if d == 1:
        return jax.random.rademacher(key, (1, 1), dtype)
    directions = jnp.asarray(simplex_directions(d), dtype)
    rotated: jax.Array = directions @ _orthogonal_block(key, d, dtype)
    return rotated


_BLOCKS = {
    "orthogonal": _orthogonal_block,
    "hadamard": _hadamard_block,
    "givens": _givens_block,
    "simplex": _simplex_block,
}


def draw_projection(
    key: jax.Array,
    rows: int,
    d: int,
    *,
    kind: str = "orthogonal",
    norms: str = "chi",
    dtype: Any = jnp.float32,
) -> jax.Array:
    """Draw a ``(rows, d)`` projection from ``key`` (usable inside ``jit``).

    Parameters
    ----------
    key : jax.Array
        A ``jax.random`` key.
    rows, d, kind, norms
        As in :func:`favorcore.draw_projection`.
    dtype : dtype
        Floating dtype of the result.

    Raises
    ------
    ValueError
        For non-positive sizes, an unknown kind or norm, or ``kind="hadamard"`` with ``d``
        not a power of two.

    Examples
    --------
    >>> w = draw_projection(jax.random.key(0), 8, 4)
    >>> bool(jnp.allclose((w[:4] / jnp.linalg.norm(w[:4], axis=1, keepdims=True))
    ...                   @ (w[:4] / jnp.linalg.norm(w[:4], axis=1, keepdims=True)).T,
    ...                   jnp.eye(4), atol=1e-5))
    True
    """
    for name, value in (("rows", rows), ("d", d)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if kind not in PROJECTION_KINDS:
        raise ValueError(f"kind must be one of {PROJECTION_KINDS}, got {kind!r}")
    if norms not in NORM_KINDS:
        raise ValueError(f"norms must be one of {NORM_KINDS}, got {norms!r}")
    if kind == "hadamard" and d & (d - 1):
        raise ValueError(f"kind='hadamard' needs d to be a power of two, got d={d}")
    k_dirs, k_norms = jax.random.split(key)
    if kind == "iid":
        w = jax.random.normal(k_dirs, (rows, d), dtype)
        if norms == "fixed":
            w = w * (math.sqrt(d) / jnp.linalg.norm(w, axis=1, keepdims=True))
        return w
    n_blocks = -(-rows // d)
    blocks = [_BLOCKS[kind](k, d, dtype) for k in jax.random.split(k_dirs, n_blocks)]
    w = jnp.concatenate(blocks)[:rows]
    if norms == "chi":
        lengths = jnp.linalg.norm(jax.random.normal(k_norms, (rows, d), dtype), axis=1)
    else:
        lengths = jnp.full((rows,), math.sqrt(d), dtype)
    scaled: jax.Array = w * lengths[:, None]
    return scaled


def feature_matrix(
    key: jax.Array, features: FeatureMap, d: int, dtype: Any = jnp.float32
) -> jax.Array:
    """The matrix ``features`` expects, drawn from ``key`` with the map's settings.

    Pass it to :func:`favorcore.favor_attention` as ``projection=``.
    """
    if features.rows is None:
        raise ValueError(f"{type(features).__name__} with m=None uses no projection")
    w = draw_projection(
        key, features.rows, d, kind=features.projection, norms=features.norms, dtype=dtype
    )
    stacked: jax.Array = features.stack_rows(w)
    return stacked
