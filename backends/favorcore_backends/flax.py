"""Flax adapter: multi-head FAVOR self-attention as a ``flax.linen`` module."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import favorcore
from favorcore import FeatureMap, PositiveFeatures

from .jax import feature_matrix

__all__ = ["FavorSelfAttention"]


class FavorSelfAttention(nn.Module):
    """Multi-head FAVOR self-attention as a ``flax.linen`` module.

    The projection lives in the ``"favor"`` variable collection (initialised from the
    ``"params"`` rng); calling with ``redraw=True`` draws a new one from the
    ``"projection"`` rng, inside ``jit`` if need be (make the collection mutable).

    Attributes
    ----------
    num_heads : int
        Number of heads; ``qkv_features`` must be a multiple of it.
    qkv_features : int, optional
        Width of the q/k/v projections (default: the input width).
    out_features : int, optional
        Output width (default: the input width).
    features : FeatureMap
        The feature map (its settings; the matrix comes from the rng).
    causal : bool
        Causal attention.
    chunk_size : int, optional
        Chunk length of causal attention.
    dtype : dtype
        Parameter and computation dtype.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> layer = FavorSelfAttention(num_heads=4, causal=True)
    >>> x = jnp.ones((2, 16, 32))
    >>> variables = layer.init(jax.random.key(0), x)
    >>> layer.apply(variables, x).shape
    (2, 16, 32)
    """

    num_heads: int
    qkv_features: int | None = None
    out_features: int | None = None
    features: FeatureMap = PositiveFeatures(m=256, seed=0)
    causal: bool = False
    chunk_size: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, key_mask: jax.Array | None = None, *, redraw: bool = False
    ) -> jax.Array:
        """Attention of ``x`` ``(..., L, E)`` over itself; ``key_mask`` True = attend."""
        width = x.shape[-1] if self.qkv_features is None else self.qkv_features
        if width % self.num_heads:
            raise ValueError(
                f"qkv_features ({width}) must be a multiple of num_heads ({self.num_heads})"
            )
        head = width // self.num_heads
        dense = nn.DenseGeneral
        q, k, v = (
            dense((self.num_heads, head), dtype=self.dtype, name=name)(x)
            for name in ("query", "key", "value")
        )
        q, k, v = (jnp.swapaxes(t, -2, -3) for t in (q, k, v))  # (..., heads, L, head)
        proj = self.variable(
            "favor", "projection",
            lambda: feature_matrix(self.make_rng("params"), self.features, head, self.dtype),
        )  # fmt: skip
        if redraw:
            proj.value = feature_matrix(
                self.make_rng("projection"), self.features, head, self.dtype
            )
        mask = None if key_mask is None else key_mask[..., None, :]
        out: jax.Array = favorcore.favor_attention(  # type: ignore[assignment]
            q, k, v, features=self.features, causal=self.causal, key_mask=mask, query_mask=mask,
            chunk_size=self.chunk_size, projection=proj.value,
        )  # fmt: skip
        out = jnp.swapaxes(out, -2, -3)
        width_out = x.shape[-1] if self.out_features is None else self.out_features
        result: jax.Array = dense(width_out, axis=(-2, -1), dtype=self.dtype, name="out")(out)
        return result
