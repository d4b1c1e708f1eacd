"""PyTorch adapter: a drop-in ``nn.MultiheadAttention`` and model conversion.

The math is the core's (:func:`favorcore.favor_attention` runs on tensors as they are;
its PyTorch operations are :mod:`favorcore_backends._torch_steps`); this module adds what
only PyTorch has:

* :class:`FavorAttention`, a drop-in for :class:`torch.nn.MultiheadAttention` wherever
  linear attention can honour the call (no attention weights, no arbitrary masks);
* :func:`favorize`, which swaps the softmax attention of an existing model for FAVOR
  attention, keeping its weights (the papers' backward compatibility);

A call on tensors that require grad runs the engine's own backward pass (its
``torch.autograd.Function`` is in :mod:`favorcore_backends._torch_steps`): it keeps the
inputs, the output and one ``m x (dv + 1)`` state per causal block; a bidirectional call
also keeps its features when they take at most 128 MiB (:func:`kept_features` sets that
budget), which spares its backward recomputing them.

Hugging Face ``transformers`` models take FAVOR attention through
:mod:`favorcore_backends.transformers`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn

import favorcore
from favorcore import Balance, FeatureMap, OptimalPositiveFeatures

from . import _torch_steps  # noqa: F401  (registers PyTorch's operations)
from ._heads import pooled_statistics, to_heads
from ._torch_steps import kept_features, no_autocast

__all__ = ["FavorAttention", "favorize", "kept_features", "segment_ids_from_cu_seqlens"]


def _favor(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """:func:`favorcore.favor_attention` without ``return_state`` (typed for tensors)."""
    out = favorcore.favor_attention(q, k, v, **kwargs)
    assert isinstance(out, torch.Tensor)
    return out


def _is_causal_mask(mask: torch.Tensor, length: int) -> bool:
    """True when ``mask`` is the (bool or additive float) causal mask of ``length``."""
    if mask.shape[-2:] != (length, length):
        return False
    upper = torch.ones(length, length, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        return bool(
            torch.equal(mask.expand(*mask.shape[:-2], length, length), upper.expand_as(mask))
        )
    blocked = torch.isneginf(mask)
    return bool(torch.equal(blocked, upper.expand_as(mask)) and (mask[~blocked] == 0).all())


class FavorAttention(nn.Module):
    """FAVOR attention as a drop-in for :class:`torch.nn.MultiheadAttention`.

    Takes the constructor arguments of ``nn.MultiheadAttention`` that linear attention can
    honour and the same ``forward`` signature, returning ``(output, None)``. Causal
    attention is asked for with ``is_causal=True`` or the causal ``attn_mask``; padding with
    ``key_padding_mask`` (True = padding, or an additive float mask of 0/-inf). Anything
    linear attention cannot honour raises ``ValueError`` saying why: attention weights
    (``need_weights=True``), any other ``attn_mask``, attention dropout, ``add_bias_kv``,
    ``add_zero_attn``.

    The projection of the feature map is a buffer (``projection``): it moves with
    ``.to()``, is saved in ``state_dict``, and is redrawn by :meth:`redraw`, every
    ``redraw_interval`` training calls unless :meth:`freeze` was called. The q/k/v weights
    are kept separate (``q_proj_weight``, ...; ``_qkv_same_embed_dim`` is False, which
    keeps PyTorch's fused fast paths, which compute exact softmax attention, from
    bypassing this module); a packed ``in_proj_weight`` from an ``nn.MultiheadAttention``
    state dict loads too. The core runs with autocast disabled: it accumulates in float32
    for half-precision inputs and returns their dtype.

    Parameters
    ----------
    embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first, device, dtype
        As in ``nn.MultiheadAttention`` (``dropout`` must be 0; ``add_bias_kv`` and
        ``add_zero_attn`` must be False).
    features : FeatureMap, optional
        The feature map. By default FAVOR++ (``OptimalPositiveFeatures(m=256)``, a fresh
        seed) with the exact balance in bidirectional calls; causal calls take the
        balance and ``A`` from :attr:`statistics` (see :meth:`calibrate`) and without
        them use ``A = 0`` (antithetic FAVOR+), since they cannot take statistics from
        their own future tokens.
    redraw_interval : int, optional
        Redraw the projection every this many forward calls in training mode.
    scale : float, optional
        Logit scale (default ``1/sqrt(head_dim)``).
    chunk_size : int, optional
        Chunk length of causal attention.

    Examples
    --------
    >>> import torch
    >>> attn = FavorAttention(64, 4, batch_first=True)
    >>> x = torch.randn(2, 100, 64)
    >>> out, weights = attn(x, x, x, is_causal=True)
    >>> out.shape, weights
    (torch.Size([2, 100, 64]), None)
    """

    _qkv_same_embed_dim = False  # separate weights: see the class docstring
    projection: torch.Tensor | None
    calls: torch.Tensor
    draws: torch.Tensor

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: Any = None,
        dtype: Any = None,
        *,
        features: FeatureMap | None = None,
        redraw_interval: int | None = None,
        scale: float | None = None,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(
                f"embed_dim must be a positive multiple of num_heads, got embed_dim={embed_dim}, "
                f"num_heads={num_heads}"
            )
        if dropout != 0.0:
            raise ValueError(
                f"dropout={dropout}: attention-weight dropout has no counterpart in linear "
                "attention (the L x L weights are never formed); use dropout=0.0"
            )
        if add_bias_kv or add_zero_attn:
            raise ValueError("add_bias_kv and add_zero_attn are not supported by FavorAttention")
        if redraw_interval is not None and (
            not isinstance(redraw_interval, int) or redraw_interval <= 0
        ):
            raise ValueError(
                f"redraw_interval must be a positive integer or None, got {redraw_interval!r}"
            )
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.batch_first = embed_dim, num_heads, batch_first
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self.head_dim = embed_dim // num_heads
        self.dropout = 0.0
        self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
        self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
        self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
        self.register_parameter("in_proj_weight", None)
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory)) if bias else None
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.features = OptimalPositiveFeatures(m=256) if features is None else features
        if not isinstance(self.features, FeatureMap):
            raise TypeError(f"features must be a FeatureMap, got {type(self.features).__name__}")
        #: fixed :class:`~favorcore.Balance` statistics (per head) for every call, or None
        self.statistics: Balance | None = None
        self.redraw_interval, self.scale, self.chunk_size = redraw_interval, scale, chunk_size
        self.frozen = False
        self.register_buffer("calls", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("draws", torch.zeros((), dtype=torch.long, device=device))
        matrix = self.features.feature_matrix(self.head_dim)
        self.register_buffer(
            "projection",
            None
            if matrix is None
            else torch.as_tensor(matrix, dtype=dtype or torch.get_default_dtype(), device=device),
        )
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            if self.out_proj.bias is not None:
                nn.init.constant_(self.out_proj.bias, 0.0)

    # -- projection management ----------------------------------------------------------

    def redraw(self) -> None:
        """Draw a new projection (deterministically from the map's seed and a counter)."""
        if self.projection is None:
            return
        self.draws += 1
        assert self.features.seed is not None  # FeatureMap draws one at construction
        seed = int(
            np.random.SeedSequence([self.features.seed, int(self.draws)]).generate_state(1)[0]
        )
        matrix = dataclasses.replace(self.features, seed=seed).feature_matrix(self.head_dim)
        with torch.no_grad():
            self.projection.copy_(torch.as_tensor(matrix, dtype=self.projection.dtype))

    def freeze(self, frozen: bool = True) -> FavorAttention:
        """Stop (or, with ``False``, resume) the periodic redraws; returns ``self``."""
        self.frozen = frozen
        return self

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        packed = state_dict.pop(prefix + "in_proj_weight", None)
        if packed is not None:  # an nn.MultiheadAttention state dict: split the packed weights
            e = self.embed_dim
            state_dict[prefix + "q_proj_weight"] = packed[:e]
            state_dict[prefix + "k_proj_weight"] = packed[e : 2 * e]
            state_dict[prefix + "v_proj_weight"] = packed[2 * e :]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- forward --------------------------------------------------------------------------

    def _causal(self, attn_mask: torch.Tensor | None, is_causal: bool, lq: int, lk: int) -> bool:
        if attn_mask is None:
            return is_causal
        if is_causal:
            return True  # as in PyTorch: is_causal is the promise that attn_mask is causal
        if lq == lk and _is_causal_mask(attn_mask, lq):
            return True
        raise ValueError(
            "attn_mask: FAVOR attention can honour only the causal mask (pass is_causal=True); "
            "an arbitrary mask would need the L x L attention weights, which linear attention "
            "never forms. Use key_padding_mask for padding."
        )

    @staticmethod
    def _key_mask(
        key_padding_mask: torch.Tensor | None, batch: int, length: int
    ) -> torch.Tensor | None:
        if key_padding_mask is None:
            return None
        if tuple(key_padding_mask.shape) not in ((batch, length), (length,)):
            raise ValueError(
                f"key_padding_mask must have shape (batch, S) = {(batch, length)}, got "
                f"{tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.dtype == torch.bool:
            keep = ~key_padding_mask
        elif key_padding_mask.is_floating_point():
            blocked = torch.isneginf(key_padding_mask)
            if not bool((key_padding_mask[~blocked] == 0).all()):
                raise ValueError(
                    "key_padding_mask: a float mask must hold only 0 (attend) and -inf "
                    "(padding); an additive bias cannot be honoured by linear attention"
                )
            keep = ~blocked
        else:
            raise TypeError(f"key_padding_mask must be bool or float, got {key_padding_mask.dtype}")
        return keep[..., None, :]  # (batch, 1 head, S)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        segment_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        """Attention of ``query`` over ``key``/``value``; returns ``(output, None)``.

        Shapes as in ``nn.MultiheadAttention``: ``(L, N, E)``, or ``(N, L, E)`` with
        ``batch_first``, or unbatched ``(L, E)``. ``segment_ids`` ``(N, L)`` (or ``(L,)``
        unbatched) packs documents one after another in each sequence
        (:func:`favorcore.favor_attention`; :func:`segment_ids_from_cu_seqlens` makes them
        from flash-attention's offsets).
        """
        if need_weights:
            raise ValueError(
                "need_weights=True: FAVOR attention never forms the L x L attention weights "
                "(that is what makes it linear); call with need_weights=False"
            )
        if query.is_nested or key.is_nested or value.is_nested:
            raise ValueError(
                "nested tensors are not supported; pass padded tensors and key_padding_mask"
            )
        self_attention = query is key  # padded queries are then the padded keys
        (query, key, value), key_padding_mask, unbatched = self._batch_first(
            (query, key, value), key_padding_mask
        )
        n, lq, lk = query.shape[0], query.shape[1], key.shape[1]
        causal = self._causal(attn_mask, is_causal, lq, lk)
        key_mask = self._key_mask(key_padding_mask, n, lk)
        counting = self.calls.device.type != "meta"  # a meta buffer holds no count
        if self.training and self.redraw_interval and not self.frozen and counting:
            if int(self.calls) % self.redraw_interval == 0 and int(self.calls) > 0:
                self.redraw()
            self.calls += 1
        q, k, v = self._heads(query, key, value)
        ids = None if segment_ids is None else (segment_ids[None] if unbatched else segment_ids)
        with no_autocast(q.device):
            kwargs: dict[str, Any] = {
                "features": self.features, "key_mask": key_mask, "scale": self.scale,
                "chunk_size": self.chunk_size, "projection": self.projection,
                # no device sync (nor graph break) per call: inputs come from the projections
                "check_finite": False,
            }  # fmt: skip
            stats = self.statistics
            if stats is not None:
                kwargs["balance"] = Balance(*(None if t is None else t.to(q) for t in stats))
            if causal and stats is None:
                kwargs["features"] = self.features.causal_form()
            if ids is not None:
                kwargs["segment_ids"] = ids[:, None, :]
            out = _favor(q, k, v, causal=causal,
                         query_mask=key_mask if self_attention and not causal else None, **kwargs)  # fmt: skip
        out = self.out_proj(out.transpose(1, 2).flatten(-2))
        if not self.batch_first or unbatched:
            out = out.transpose(0, 1)
        return (out[:, 0] if unbatched else out), None

    def _batch_first(
        self, tensors: tuple[torch.Tensor, ...], key_padding_mask: torch.Tensor | None
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None, bool]:
        """The inputs as ``(N, L, E)`` (and the mask as ``(N, S)``), and whether unbatched."""
        unbatched = tensors[0].dim() == 2
        if unbatched:
            tensors = tuple(t[:, None] for t in tensors)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask[None]
        elif tensors[0].dim() != 3:
            raise ValueError(
                f"query must have shape (L, N, E), (N, L, E) or (L, E), got {tuple(tensors[0].shape)}"
            )
        if not self.batch_first or unbatched:
            tensors = tuple(t.transpose(0, 1) for t in tensors)
        return tensors, key_padding_mask, unbatched

    def _heads(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """The projected queries, keys (and values) ``(N, H, L, head_dim)`` of ``(N, L, E)``
        inputs."""
        bias = [None] * 3 if self.in_proj_bias is None else list(self.in_proj_bias.chunk(3))
        weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        return [
            to_heads(x, w, b, self.num_heads)
            for x, w, b in zip(inputs, weights, bias, strict=False)
        ]

    def calibrate(
        self, query: torch.Tensor, key: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> Balance:
        """Fix :attr:`statistics` from a calibration batch; returns them.

        ``query`` and ``key`` are shaped as for :meth:`forward`. The balance, key shift
        and FAVOR++'s ``A`` of each head are computed from this batch's projected queries
        and keys, pooled over its real tokens, and used by every later call: what causal
        attention needs (its calls cannot use their own future tokens). Set
        :attr:`statistics` to None to go back to per-call statistics.
        """
        with torch.no_grad():
            self_attention = query is key
            (query, key), key_padding_mask, _ = self._batch_first((query, key), key_padding_mask)
            q, k = self._heads(query, key)
            km = self._key_mask(key_padding_mask, k.shape[0], k.shape[2])
            mask = None if km is None else km[:, 0, :]
            scale = self.head_dim**-0.5 if self.scale is None else self.scale
            queries = mask if self_attention else None  # (cross-attention: all real)
            self.statistics = pooled_statistics([(q, k, mask, queries, scale)])
        return self.statistics

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}, "
            f"features={self.features!r}, redraw_interval={self.redraw_interval}"
        )

    @classmethod
    def from_multihead(cls, mha: nn.MultiheadAttention, **kwargs: Any) -> FavorAttention:
        """A :class:`FavorAttention` with the weights, shapes and device of ``mha``.

        ``mha``'s attention dropout has no counterpart and is dropped (the module's
        other outputs are unchanged); ``kwargs`` go to the constructor (``features``, ...).
        """
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("add_bias_kv and add_zero_attn are not supported by FavorAttention")
        ref = mha.out_proj.weight
        new = cls(
            mha.embed_dim, mha.num_heads, bias=mha.in_proj_bias is not None, kdim=mha.kdim,
            vdim=mha.vdim, batch_first=mha.batch_first, device=ref.device, dtype=ref.dtype, **kwargs,
        )  # fmt: skip
        missing, unexpected = new.load_state_dict(mha.state_dict(), strict=False)
        assert not unexpected, unexpected
        assert set(missing) <= {"projection", "calls", "draws"}, missing
        new.train(mha.training)
        return new


def segment_ids_from_cu_seqlens(
    cu_seqlens: torch.Tensor, length: int | None = None
) -> torch.Tensor:
    """``(1, L)`` document ids of a packed sequence from flash-attention's offsets
    ``cu_seqlens`` (``[0, l_1, l_1 + l_2, ..., L]``): token ``t`` belongs to document ``i``
    where ``cu_seqlens[i] <= t < cu_seqlens[i + 1]``.

    >>> segment_ids_from_cu_seqlens(torch.tensor([0, 2, 5])).tolist()
    [[0, 0, 1, 1, 1]]
    """
    total = int(cu_seqlens[-1]) if length is None else length
    positions = torch.arange(total, device=cu_seqlens.device)
    return (torch.searchsorted(cu_seqlens[1:], positions, right=True))[None, :]


def favorize(model: nn.Module, **kwargs: Any) -> nn.Module:
    """Replace every ``nn.MultiheadAttention`` in ``model`` by :class:`FavorAttention`.

    Weights are kept (:meth:`FavorAttention.from_multihead`); ``nn.TransformerEncoder``
    modules get ``use_nested_tensor = False`` (their nested-tensor fast path would bypass
    the new attention). Works in place and returns ``model``. ``kwargs`` go to every new
    module (``features=``, ``redraw_interval=``, ...); each gets the same feature map.

    Examples
    --------
    >>> import torch
    >>> layer = torch.nn.TransformerEncoderLayer(32, 4, dropout=0.0, batch_first=True)
    >>> layer = favorize(layer, features=favorcore.PositiveFeatures(m=64, seed=0))
    >>> type(layer.self_attn).__name__
    'FavorAttention'
    """
    if isinstance(model, nn.MultiheadAttention):
        return FavorAttention.from_multihead(model, **kwargs)
    for name, child in list(model.named_children()):
        if isinstance(child, nn.MultiheadAttention):
            setattr(model, name, FavorAttention.from_multihead(child, **kwargs))
        else:
            favorize(child, **kwargs)
    if isinstance(model, nn.TransformerEncoder):
        model.use_nested_tensor = False
    return model
