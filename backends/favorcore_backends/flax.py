"""Flax adapter: multi-head FAVOR self-attention as a ``flax.linen`` module."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import favorcore
from favorcore import Balance, FeatureMap, OptimalPositiveFeatures

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
    features : FeatureMap, optional
        The feature map (its settings; the matrix comes from the rng). By default FAVOR++
        (``OptimalPositiveFeatures(m=256)``), balanced in bidirectional calls; causal
        calls take the balance and ``A`` from ``balance=`` statistics (``calibrate=True``)
        and without them use ``A = 0``.
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
    features: FeatureMap | None = None
    causal: bool = False
    chunk_size: int | None = None
    dtype: Any = jnp.float32

    def _map(self, causal_plain: bool) -> FeatureMap:
        if self.features is not None:
            return self.features
        return OptimalPositiveFeatures(m=256, seed=0, a=0.0 if causal_plain else None)

    def _qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, int]:
        width = x.shape[-1] if self.qkv_features is None else self.qkv_features
        if width % self.num_heads:
            raise ValueError(
                f"qkv_features ({width}) must be a multiple of num_heads ({self.num_heads})"
            )
        head = width // self.num_heads
        q, k, v = (
            nn.DenseGeneral((self.num_heads, head), dtype=self.dtype, name=name)(x)
            for name in ("query", "key", "value")
        )
        q, k, v = (jnp.swapaxes(t, -2, -3) for t in (q, k, v))  # (..., heads, L, head)
        return q, k, v, head

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        key_mask: jax.Array | None = None,
        *,
        redraw: bool = False,
        balance: Balance | None = None,
        calibrate: bool = False,
    ) -> jax.Array | Balance:
        """Attention of ``x`` ``(..., L, E)`` over itself; ``key_mask`` True = attend.

        ``balance`` gives fixed statistics, in causal calls too. With ``calibrate=True``
        the call returns them instead: per-head :class:`~favorcore.Balance` statistics of
        this batch's queries and keys, pooled over its real tokens
        (``layer.apply(variables, x_calib, calibrate=True)``).
        """
        q, k, v, head = self._qkv(x)
        if calibrate:
            return _pooled(q, k, key_mask, x.shape[:-1], self.num_heads, head)
        fmap = self._map(self.causal and balance is None)
        proj = self.variable(
            "favor", "projection",
            lambda: feature_matrix(self.make_rng("params"), fmap, head, self.dtype),
        )  # fmt: skip
        if redraw:
            proj.value = feature_matrix(self.make_rng("projection"), fmap, head, self.dtype)
        mask = None if key_mask is None else key_mask[..., None, :]
        out: jax.Array = favorcore.favor_attention(  # type: ignore[assignment]
            q, k, v, features=fmap, causal=self.causal, key_mask=mask, query_mask=mask,
            chunk_size=self.chunk_size, projection=proj.value, balance=balance,
            check_finite=False,  # (padded rows may hold anything; no device sync per call)
        )  # fmt: skip
        out = jnp.swapaxes(out, -2, -3)
        width_out = x.shape[-1] if self.out_features is None else self.out_features
        result: jax.Array = nn.DenseGeneral(width_out, axis=(-2, -1), dtype=self.dtype, name="out")(
            out
        )
        return result


def _pooled(
    q: jax.Array, k: jax.Array, key_mask: jax.Array | None, tokens: tuple[int, ...], heads: int,
    head: int,
) -> Balance:  # fmt: skip
    """Balance statistics per head over every real token of the batch."""

    def flat(t: jax.Array) -> jax.Array:  # (..., H, L, d) -> (1, H, N L, d)
        t = jnp.reshape(t, (-1, heads, t.shape[-2], head))
        return jnp.reshape(jnp.swapaxes(t, 0, 1), (1, heads, -1, head))

    mask = None
    if key_mask is not None:
        mask = jnp.reshape(jnp.broadcast_to(key_mask, tokens), (1, 1, -1))
    return favorcore.balance_statistics(flat(q), flat(k), key_mask=mask, query_mask=mask)
