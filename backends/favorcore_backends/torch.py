"""PyTorch adapter: a drop-in ``nn.MultiheadAttention``, model conversion, HF registration.

The math is the core's (:func:`favorcore.favor_attention` runs on tensors as they are);
this module adds what only PyTorch has:

* :class:`FavorAttention`, a drop-in for :class:`torch.nn.MultiheadAttention` wherever
  linear attention can honour the call (no attention weights, no arbitrary masks);
* :func:`favorize`, which swaps the softmax attention of an existing model for FAVOR
  attention, keeping its weights (the papers' backward compatibility);
* :func:`register_transformers`, which registers FAVOR attention (and its mask function)
  with Hugging Face ``transformers``;
* memory-bounded backward passes of causal attention: the sequence is cut into segments
  that are recomputed one at a time during backward (``torch.utils.checkpoint``),
  carrying the core's causal state between them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import favorcore
from favorcore import (
    AttentionState,
    Balance,
    BalanceKind,
    FeatureMap,
    OptimalPositiveFeatures,
    register_step,
)
from favorcore._tiled import TiledOps

from .numpy import _floor

__all__ = [
    "DEFAULT_SEGMENT",
    "FavorAttention",
    "causal_favor_attention",
    "favorize",
    "register_transformers",
    "transformers_statistics",
]

#: Tokens per recomputed segment in the backward pass of causal attention.
DEFAULT_SEGMENT = 2048


def _exp_(e: torch.Tensor, lower: float) -> torch.Tensor:
    """``e.exp_()``, with the features below the smallest normal number set to 0 on the
    CPU (:func:`favorcore_backends.numpy._exp`: denormals cost x86 10-100x; ``lower``, a
    lower bound of ``e``, spares reading ``e`` for its min in the usual case)."""
    if e.device.type != "cpu" or not e.numel():
        return e.exp_()
    floor = _floor(str(e.dtype).removeprefix("torch."))
    if lower >= floor or float(e.amin()) >= floor:
        return e.exp_()
    # the clamped ones give exp(floor), about the smallest normal number: those (and any
    # feature up to twice that) become 0 in the same pass
    tiny = float(torch.finfo(e.dtype).smallest_normal)
    return F.threshold(e.clamp_(min=floor).exp_(), 2 * tiny, 0.0, inplace=True)


class TorchOps(TiledOps):
    """Tiled-engine steps for PyTorch: products into reused buffers, in-place ``exp_``.

    PyTorch's own intra-op threads use every core, so work items run in order. With
    autograd recording (any input that requires grad), the engine runs the standard
    steps instead (:meth:`fits`).
    """

    #: rows per causal block; bidirectional blocks are 4x as long (measured at L = 16384,
    #: ms, bidirectional / causal: 4096 rows 138 / 187, 8192 130 / 187, 16384 125 / 206:
    #: each operation costs PyTorch ~20 us, and causal blocks hold their chunks' prefixes)
    block = 4096
    #: causal chunk length, measured at L = 16384 (causal / bidirectional time, 2 cores):
    #: 32 -> 1.52x, 64 -> 1.29x, 128 -> 1.30x, 256 -> 1.58x
    chunk = 64

    def block_size(self, length: int, causal: bool) -> int:
        """:attr:`block` rows for causal attention, 4x as many bidirectional."""
        return self.block if causal else 4 * self.block

    def fits(self, *inputs: torch.Tensor) -> bool:
        """False while autograd records any input: the steps' in-place operations on
        reused buffers would overwrite tensors it saved (the engine then runs the
        standard steps for the whole call)."""
        return not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs))

    def prepare_keys(self, xp: Any, wk: torch.Tensor) -> Any:
        """``(wk, R, low)``: the largest column norm of its first ``d`` rows and the
        smallest entry of its last, for the lower bound of the exponents (CPU only)."""
        if wk.device.type != "cpu" or not wk.numel():
            return wk, math.inf, 0.0
        d = wk.shape[0] - 2
        return wk, float(wk[:d].square().sum(0).max().sqrt()), float(wk[d + 1].min())

    def key_block(self, xp: Any, y: torch.Tensor, v: torch.Tensor, keep: Any, wk: Any,
                  c: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        wk, radius, low = wk
        rows, d = y.shape
        aug = self.buffer(xp, "k_in", rows, d + 2, y)
        aug[:, :d] = y
        sq = torch.linalg.vector_norm(y, dim=1).square_()  # (3x faster than (y * y).sum)
        lower = -math.inf
        if math.isfinite(radius) and rows:  # every exponent is >= low - |y| R - c |y|^2
            big = float(sq.max())
            lower = low - math.sqrt(big) * radius - c * big
        aug[:, d] = sq.mul_(-c)
        aug[:, d + 1] = 1.0
        kf = _exp_(torch.mm(aug, wk, out=self.buffer(xp, "k", rows, wk.shape[1], y)), lower)
        if keep is not None:  # garbage (even NaN) in masked rows is overwritten
            drop = ~keep[:, 0]
            kf[drop] = 0.0
            v = self.buffer(xp, "v", rows, v.shape[1], v).copy_(v)
            v[drop] = 0.0
        return kf, v

    def transform(self, xp: Any, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.addmm(t[-1], y, t[:-1])

    def query_block(self, xp: Any, x: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
        """``exp(e - max_row(e))``, ``e = x wq[:d] + wq[d]``, in place in this thread's buffer.

        The exact row max on the CPU too: unlike NumPy's, PyTorch's row max and subtraction
        cost about as much as the NumPy fast path's upper-bound shift (its norms and
        augmented input), which only applies to rows of small norm (measured at
        L = 16384: 1.00x the time at the bench's scale, 0.96x with unit-variance inputs).
        No flush of denormal features here (unlike the keys'): the row norms its bound
        needs cost 3 % of a call, and queries produce denormals only at norms about six
        times unit variance (where they make a call about 2x slower).
        """
        rows, d = x.shape
        e = torch.addmm(wq[d], x, wq[:d], out=self.buffer(xp, "q", rows, wq.shape[1], x))
        if rows:
            e.sub_(e.amax(1, keepdim=True))
        return e.exp_()

    def causal(self, xp: Any, qf: torch.Tensor, kf: torch.Tensor, vb: torch.Tensor,
               kv0: torch.Tensor | None, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """As the NumPy adapter's: the chunks' products in place into this thread's buffers
        (``baddbmm_`` adds the intra-chunk term into the output), the prefix sums by in-place
        adds."""
        rows, m = qf.shape
        e = vb.shape[1] + 1
        v1 = self.buffer(xp, "v1", rows, e, vb)
        v1[:, :-1] = vb
        v1[:, -1] = 1.0
        o = self.buffer(xp, "o", rows, e, qf)
        kv = torch.zeros(m, e, dtype=qf.dtype, device=qf.device) if kv0 is None else kv0
        split = rows - rows % chunk
        for lo, hi, c in ((0, split, chunk), (split, rows, rows - split)):
            if hi > lo:
                n = (hi - lo) // c
                qc, kc = qf[lo:hi].view(n, c, m), kf[lo:hi].view(n, c, m)
                vc = v1[lo:hi].view(n, c, e)
                pre = self.buffer(xp, "prefix", (n + 1) * m, e, qf).view(n + 1, m, e)
                torch.bmm(kc.transpose(1, 2), vc, out=pre[1:])
                pre[0] = kv
                steps = pre.unbind(0)  # (one call for the views, not 2 n indexings)
                for i in range(n):
                    steps[i + 1].add_(steps[i])
                scores = self.buffer(xp, "scores", n * c, c, qf).view(n, c, c)
                torch.bmm(qc, kc.transpose(1, 2), out=scores)
                scores.tril_()  # the future out (8x faster than masked_fill_ with a mask)
                oc = o[lo:hi].view(n, c, e)
                torch.bmm(qc, pre[:n], out=oc)
                oc.baddbmm_(scores, vc)
                kv = pre[n].clone()
        return o, kv

    def output(self, xp: Any, shape: tuple[int, ...], *inputs: torch.Tensor) -> Any:
        """An uninitialised tensor that :meth:`normalise` fills."""
        return torch.empty(shape, dtype=inputs[0].dtype, device=inputs[0].device)

    def key_sums(self, xp: Any, kf: torch.Tensor, vb: torch.Tensor) -> torch.Tensor:
        """``(V^T kf)^T`` and the column sums as a vector-matrix product (at 16384 rows,
        2 threads: 2.3 ms, against 3.1 ms for ``kf^T V`` and a matrix-vector product)."""
        ones = torch.ones(kf.shape[0], dtype=kf.dtype, device=kf.device)
        return torch.cat([(vb.T @ kf).T, (ones @ kf)[:, None]], dim=1)

    def answer(self, xp: Any, qf: torch.Tensor, kv: torch.Tensor,
               out: Any) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """As the NumPy adapter's: ``qf kv[:, :dv]`` into ``out``, scaled in place."""
        dv = kv.shape[1] - 1
        torch.mm(qf, kv[:, :dv], out=out)
        den = torch.mv(qf, kv[:, dv])
        # as favorcore._linear.normalise: 0 where the normaliser is tiny, NaN stays NaN
        small = den <= torch.finfo(den.dtype).smallest_normal
        out.mul_(den.reciprocal_().masked_fill_(small, 0.0)[:, None])
        return out, small[:, None]

    def normalise(self, xp: Any, o: torch.Tensor, dv: int, out: Any, kv: Any = None) -> Any:
        """``o[:, :dv] / o[:, dv:]`` into ``out``, as :meth:`answer` scales: by the
        normaliser's reciprocal, 0 for rows with a normaliser <= the smallest normal number
        (a 4096-row causal block: 0.31 against 0.38 ms for a division and a masked fill of
        ``out``)."""
        den = o[:, dv]
        small = den <= torch.finfo(den.dtype).smallest_normal
        return torch.mul(o[:, :dv], den.reciprocal().masked_fill_(small, 0.0)[:, None], out=out)


register_step("array_api_compat.torch", "tiled", TorchOps())


def causal_favor_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    features: FeatureMap,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    chunk_size: int | None = None,
    projection: torch.Tensor | None = None,
    segment: int | None = DEFAULT_SEGMENT,
    check_finite: bool = True,
    balance: Balance | None = None,
) -> torch.Tensor:
    """Causal FAVOR attention whose backward pass keeps O(segment * m) activations.

    Splits the sequence into segments of ``segment`` tokens and runs the core on each
    under ``torch.utils.checkpoint``, carrying the :class:`~favorcore.AttentionState`: the
    forward stores only the inputs and one ``m x (dv + 1)`` state per segment, and the
    backward recomputes one segment's features at a time. Without gradients (or with
    ``segment=None``, or a sequence no longer than one segment) it is one core call. The
    result equals :func:`favorcore.favor_attention` with ``causal=True`` to rounding.
    ``balance`` takes fixed statistics (e.g. of a calibration batch) as in the core.
    """
    kwargs: dict[str, Any] = {
        "features": features, "causal": True, "scale": scale, "chunk_size": chunk_size,
        "projection": projection, "check_finite": check_finite, "balance": balance,
    }  # fmt: skip
    length = q.shape[-2]
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k, v) if isinstance(t, torch.Tensor)
    )
    if segment is None or not needs_grad or length <= segment:
        return _favor(q, k, v, key_mask=key_mask, **kwargs)

    def run(qs: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, ms: torch.Tensor | None,
            kv: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        state = None if kv is None else AttentionState(kv)
        out, new = favorcore.favor_attention(
            qs, ks, vs, key_mask=ms, state=state, return_state=True, **kwargs
        )
        return out, new.kv

    # split (not slicing): the backward of split concatenates the pieces' gradients once,
    # where slicing would allocate a full-length gradient for every piece
    pieces = zip(
        torch.split(q, segment, dim=-2), torch.split(k, segment, dim=-2),
        torch.split(v, segment, dim=-2),
        [None] * -(-length // segment) if key_mask is None else torch.split(key_mask, segment, dim=-1),
        strict=True,
    )  # fmt: skip
    outs, kv = [], None
    for qs, ks, vs, ms in pieces:
        out, kv = checkpoint(run, qs, ks, vs, ms, kv, use_reentrant=False)
        outs.append(out)
    return torch.cat(outs, dim=-2)


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
    segment : int or None
        Tokens per recomputed segment of the causal backward pass (see
        :func:`causal_favor_attention`); None stores every activation.

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
        segment: int | None = DEFAULT_SEGMENT,
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
        # causal calls without statistics: the default map with A = 0 (same projection)
        self._plain = (
            OptimalPositiveFeatures(m=256, a=0.0, seed=self.features.seed)
            if features is None
            else self.features
        )
        #: fixed :class:`~favorcore.Balance` statistics (per head) for every call, or None
        self.statistics: Balance | None = None
        self.redraw_interval, self.scale, self.chunk_size, self.segment = (
            redraw_interval, scale, chunk_size, segment,
        )  # fmt: skip
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
    ) -> tuple[torch.Tensor, None]:
        """Attention of ``query`` over ``key``/``value``; returns ``(output, None)``.

        Shapes as in ``nn.MultiheadAttention``: ``(L, N, E)``, or ``(N, L, E)`` with
        ``batch_first``, or unbatched ``(L, E)``.
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
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query[:, None], key[:, None], value[:, None]
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask[None]
        elif query.dim() != 3:
            raise ValueError(
                f"query must have shape (L, N, E), (N, L, E) or (L, E), got {tuple(query.shape)}"
            )
        if not self.batch_first or unbatched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, lq, lk = query.shape[0], query.shape[1], key.shape[1]
        causal = self._causal(attn_mask, is_causal, lq, lk)
        key_mask = self._key_mask(key_padding_mask, n, lk)
        if self.training and self.redraw_interval and not self.frozen:
            if int(self.calls) % self.redraw_interval == 0 and int(self.calls) > 0:
                self.redraw()
            self.calls += 1

        b = (None, None, None) if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        q = F.linear(query, self.q_proj_weight, b[0])
        k = F.linear(key, self.k_proj_weight, b[1])
        v = F.linear(value, self.v_proj_weight, b[2])
        q, k, v = (
            t.reshape(*t.shape[:-1], self.num_heads, self.head_dim).transpose(1, 2)
            for t in (q, k, v)
        )
        with torch.autocast(device_type=q.device.type, enabled=False):
            kwargs: dict[str, Any] = {
                "features": self.features, "key_mask": key_mask, "scale": self.scale,
                "chunk_size": self.chunk_size, "projection": self.projection,
                # no device sync (nor graph break) per call: inputs come from the projections
                "check_finite": False,
            }  # fmt: skip
            stats = self.statistics
            if stats is not None:
                kwargs["balance"] = Balance(*(None if t is None else t.to(q) for t in stats))
            if causal:
                if stats is None:
                    kwargs["features"] = self._plain
                out = causal_favor_attention(q, k, v, segment=self.segment, **kwargs)
            else:
                out = _favor(q, k, v, query_mask=key_mask if self_attention else None, **kwargs)
        out = self.out_proj(out.transpose(1, 2).flatten(-2))
        if not self.batch_first or unbatched:
            out = out.transpose(0, 1)
        return (out[:, 0] if unbatched else out), None

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
            unbatched = query.dim() == 2
            if unbatched:
                query, key = query[:, None], key[:, None]
                if key_padding_mask is not None:
                    key_padding_mask = key_padding_mask[None]
            if not self.batch_first or unbatched:
                query, key = query.transpose(0, 1), key.transpose(0, 1)
            b = (None, None, None) if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
            q = F.linear(query, self.q_proj_weight, b[0])
            k = F.linear(key, self.k_proj_weight, b[1])
            q, k = (
                t.reshape(*t.shape[:-1], self.num_heads, self.head_dim).transpose(1, 2)
                for t in (q, k)
            )
            km = self._key_mask(key_padding_mask, k.shape[0], k.shape[2])
            mask = None if km is None else km[:, 0, :]
            scale = self.head_dim**-0.5 if self.scale is None else self.scale
            if self_attention or mask is None:
                self.statistics = _pooled_statistics([(q, k, mask, scale)])
            else:  # cross-attention: queries are all real
                self.statistics = _pooled_statistics([(q, k, mask, scale)], queries_masked=False)
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


def register_transformers(
    name: str = "favor",
    *,
    features: FeatureMap | None = None,
    chunk_size: int | None = None,
    balance: bool | BalanceKind | None = None,
    statistics: Mapping[int, Balance] | None = None,
) -> str:
    """Register FAVOR attention with Hugging Face ``transformers`` under ``name``.

    Registers an attention function with ``AttentionInterface`` and a mask function with
    ``AttentionMaskInterface`` (without it, ``transformers`` would hand over no usable
    padding mask and padding would be silently ignored). The mask function gives the
    attention function the key-padding mask and whether attention is causal; any other
    mask (sliding windows, arbitrary patterns) raises. Load a model with
    ``attn_implementation=name``, or call ``model.set_attn_implementation(name)``.

    Parameters
    ----------
    name : str
        The implementation's name.
    features : FeatureMap, optional
        The map; every layer (``module.layer_idx``) gets its own independent draw of it.
        By default FAVOR++ with ``m = 256`` (the estimator the evidence in the docs
        chose); causal layers without ``statistics`` then use ``A = 0`` (antithetic
        FAVOR+), since they cannot take ``A`` from their own tokens.
    chunk_size : int, optional
        Chunk length of causal attention.
    balance : bool, {"matrix", "scalar"}, optional
        The exact balance and key shift (:mod:`favorcore.balance`) in bidirectional
        layers, from each call's real tokens (default: the matrix balance for the
        positive maps).
    statistics : mapping of int to Balance, optional
        Fixed statistics per layer index (:func:`transformers_statistics` of a
        calibration batch): used by every layer they cover, causal ones included, where
        they also fix FAVOR++'s ``A``.

    Returns
    -------
    str
        ``name``.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    fmap: FeatureMap = OptimalPositiveFeatures(m=256) if features is None else features
    plain = OptimalPositiveFeatures(m=256, a=0.0, seed=fmap.seed) if features is None else fmap
    maps: dict[tuple[int, bool], FeatureMap] = {}
    given = dict(statistics or {})

    def layer_map(layer: int, causal_plain: bool) -> FeatureMap:
        if (layer, causal_plain) not in maps:
            base = plain if causal_plain else fmap
            seed = int(np.random.SeedSequence([fmap.seed or 0, layer]).generate_state(1)[0])
            maps[layer, causal_plain] = dataclasses.replace(base, seed=seed)
        return maps[layer, causal_plain]

    AttentionMaskInterface.register(name, _hf_mask)

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                  **kwargs: Any) -> tuple[torch.Tensor, None]:  # fmt: skip
        key, value = _repeat_kv(query, key, value)
        causal, key_mask = _hf_call_mask(name, module, attention_mask)
        layer = int(getattr(module, "layer_idx", 0) or 0)
        stats = given.get(layer)
        with torch.autocast(device_type=query.device.type, enabled=False):
            km = None if key_mask is None else key_mask[:, None, :]
            if causal and query.shape[2] == key.shape[2]:
                out = causal_favor_attention(query, key, value, features=layer_map(layer, stats is None),
                                             key_mask=km, scale=scaling, chunk_size=chunk_size,
                                             check_finite=False, balance=stats)  # fmt: skip
            elif causal:
                raise ValueError(
                    "causal attention with a key/value cache is not supported by this registration"
                )
            else:
                qm = km if query.shape[2] == key.shape[2] else None  # self-attention
                out = _favor(query, key, value, features=layer_map(layer, False), key_mask=km,
                             query_mask=qm, scale=scaling, check_finite=False,
                             balance=balance if stats is None else stats)  # fmt: skip
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(name, attention)
    return name


def transformers_statistics(model: Any, batches: Iterable[Mapping[str, Any]]) -> dict[int, Balance]:
    """Per-layer :class:`~favorcore.Balance` statistics of a ``transformers`` model.

    Runs ``model`` on each batch of keyword inputs (``input_ids``, ``attention_mask``,
    ...) with exact attention, records every layer's queries and keys, and pools them
    per head over all real tokens of all batches. The result, passed to
    :func:`register_transformers` as ``statistics``, fixes the balance, the key shift and
    FAVOR++'s ``A`` of each layer: what causal layers need, since they cannot take
    statistics from their own (future) tokens.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    name = "favorcore_statistics"
    seen: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]]] = {}

    def record(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
               **kwargs: Any) -> tuple[torch.Tensor, None]:  # fmt: skip
        key, value = _repeat_kv(query, key, value)
        causal, key_mask = _hf_call_mask(name, module, attention_mask)
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        layer = int(getattr(module, "layer_idx", 0) or 0)
        seen.setdefault(layer, []).append((query.detach(), key.detach(), key_mask, scale))
        km = None if key_mask is None else key_mask[:, None, :]
        out = favorcore.softmax_attention(query, key, value, causal=causal, key_mask=km,
                                          scale=scale, check_finite=False)  # fmt: skip
        return out.transpose(1, 2).contiguous(), None

    AttentionMaskInterface.register(name, _hf_mask)
    AttentionInterface.register(name, record)
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
    finally:
        model.set_attn_implementation(before)
    return {layer: _pooled_statistics(calls) for layer, calls in seen.items()}


def _pooled_statistics(
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]],
    *,
    queries_masked: bool = True,
) -> Balance:
    """One Balance per head, shape ``(1, heads, ...)``, over the real tokens of all calls.

    Each call is ``(q, k, key_mask, scale)`` with ``q`` ``(B, H, Lq, d)``, ``k``
    ``(B, H, Lk, d)`` and ``key_mask`` ``(B, Lk)`` or None; in self-attention
    (``queries_masked``, ``Lq == Lk``) the key mask marks the real queries too.
    """

    def flat(t: torch.Tensor) -> torch.Tensor:  # (B, H, L, d) -> (1, H, B L, d)
        return t.transpose(0, 1).reshape(1, t.shape[1], -1, t.shape[-1])

    def ones(n: int, like: torch.Tensor) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bool, device=like.device)

    q = torch.cat([flat(c[0].double()) for c in calls], dim=2)
    k = torch.cat([flat(c[1].double()) for c in calls], dim=2)
    key_mask = torch.cat(
        [ones(c[1].shape[0] * c[1].shape[2], c[1]) if c[2] is None else c[2].reshape(-1)
         for c in calls]
    )[None, None, :]  # fmt: skip
    query_mask = torch.cat(
        [c[2].reshape(-1) if queries_masked and c[2] is not None and c[0].shape[2] == c[1].shape[2]
         else ones(c[0].shape[0] * c[0].shape[2], c[0]) for c in calls]
    )[None, None, :]  # fmt: skip
    stats = favorcore.balance_statistics(
        q, k, key_mask=key_mask, query_mask=query_mask, scale=calls[0][3]
    )
    dtype = calls[0][0].dtype
    return Balance(*(None if t is None else t.to(dtype) for t in stats))


def _repeat_kv(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query attention: repeat the key/value heads to the query heads."""
    if query.shape[1] != key.shape[1]:
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    return key, value


def _hf_call_mask(
    name: str, module: nn.Module, attention_mask: Any
) -> tuple[bool, torch.Tensor | None]:
    """``(causal, key_mask)`` from what the registered mask function handed over."""
    if isinstance(attention_mask, _HFMask):
        return attention_mask.causal, attention_mask.key_mask
    if attention_mask is not None:
        raise ValueError(
            f"attention_mask: the {name!r} attention needs its own mask function; "
            f"call register_transformers({name!r}) before the model runs"
        )
    return bool(getattr(module, "is_causal", False)), None


@dataclasses.dataclass(frozen=True)
class _HFMask:
    """What the registered mask function hands to the registered attention function."""

    causal: bool
    key_mask: torch.Tensor | None  # (batch, kv_length) bool, True = attend


def _hf_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    **kwargs: Any,
) -> _HFMask:
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

    if local_size is not None:
        raise ValueError("sliding-window attention cannot be honoured by FAVOR attention")
    if mask_function is causal_mask_function:
        causal = True
    elif mask_function is bidirectional_mask_function or mask_function is None:
        causal = False
    else:  # or/and compositions, packed sequences, block overlays
        raise ValueError(
            "attention mask: FAVOR attention honours causal or full attention plus padding; "
            f"this model asked for another pattern ({getattr(mask_function, '__name__', mask_function)})"
        )
    key_mask = None
    if attention_mask is not None:
        key_mask = attention_mask[:, kv_offset : kv_offset + kv_length].to(torch.bool)
    return _HFMask(causal, key_mask)
