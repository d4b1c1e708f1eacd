"""PyTorch's operations of the engine: the eager ones (:mod:`._eager`) on tensors, and
the backward pass wired into autograd.

Registered for PyTorch when the core first meets tensors. PyTorch's own intra-op threads
use every core, so work items run in order in the calling thread. While autograd records
(any input requires grad) a call of a positive map runs as one ``torch.autograd.Function``:
its forward is the engine's (in place, into buffers: autograd sees none of it), its
backward the engine's written-out backward (:func:`favorcore.steps.backward`), from the
inputs, the output and the states the causal pieces started from; a bidirectional call
also keeps its blocks' features when they fit a budget (:func:`kept_features`), so that
its backward does not recompute them. Other maps are differentiated by autograd through
the standard operations.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Iterator
from typing import Any

import array_api_compat.torch as xp_torch
import torch
from torch.autograd.function import once_differentiable

from favorcore import register_steps
from favorcore._compat import is_eager
from favorcore.features import Exponent
from favorcore.steps import Call, Steps, backward, forward

from ._eager import EagerSteps, Lib

__all__ = ["TorchSteps", "kept_features", "no_autocast"]


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Autocast disabled on ``device``'s type (the engine computes in float32 or wider);
    nothing on the meta device, which has no autocast (and no values to compute)."""
    if device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def _sq_norms(y: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(torch.linalg.vector_norm(y, dim=1).square_())


def _key_sums(kf: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(V^T kf)^T`` and the column sums as a vector-matrix product."""
    ones = torch.ones(kf.shape[0], dtype=kf.dtype, device=kf.device)
    return torch.cat([(v.T @ kf).T, (ones @ kf)[:, None]], dim=1)


@functools.lru_cache(maxsize=8)
def _future(c: int, group: int, device: torch.device) -> torch.Tensor:
    """``(c G, c)`` boolean: True where the key comes after the query row's position."""
    pos = torch.arange(c * group, device=device) // group
    return torch.arange(c, device=device)[None, :] > pos[:, None]


TORCH = Lib(
    xp=xp_torch,
    native=torch,
    sq_norms=_sq_norms,
    fill_where=lambda a, cond, value: a.masked_fill_(cond, value),
    clamp_min=lambda e, floor: e.clamp_(min=floor),
    zero_future=lambda scores, group: (
        scores.tril_()
        if group == 1
        else scores.masked_fill_(_future(scores.shape[-1], group, scores.device), 0.0)
    ),
    key_sums=_key_sums,
    add_product=lambda o, a, b, tmp: o.baddbmm_(a, b),
    bmm=lambda a, b, out: torch.bmm(a, b, out=out),
    affine=lambda x, w, b, out: (
        torch.addmm(b, x, w, out=out) if out is not None else torch.addmm(b, x, w)
    ),
    on_host=lambda a: a.device.type == "cpu",
    bound_queries=False,
)


class TorchSteps(EagerSteps):
    """The eager operations for tensors; bidirectional blocks ``wide`` times as long as
    causal ones (each operation costs PyTorch some microseconds, and causal blocks hold
    their chunks' prefixes). Calls that autograd records run with bidirectional blocks
    half as long (:attr:`training`): the backward's buffers are a block's, so a step
    peaks lower for the same time (figures: the architecture page)."""

    #: bytes of features a bidirectional call recorded by autograd keeps for its backward
    #: (which then does not recompute them) unless :func:`kept_features` says otherwise;
    #: calls whose features take more recompute them
    feature_budget: int = 128 << 20

    def __init__(self, *, block: int = 4096, chunk: int = 64, wide: int = 4) -> None:
        super().__init__(TORCH, block=block, chunk=chunk)
        self.wide = wide
        self.training = self if wide <= 2 else TorchSteps(block=block, chunk=chunk, wide=2)

    def block_size(self, length: int, causal: bool) -> int:
        """:attr:`block` rows for causal attention, ``wide`` times as many bidirectional."""
        return self.block if causal else self.wide * self.block

    def run(self, call: Call) -> tuple[Any, Any, Any]:
        """The call; with autograd recording, through :class:`_Attention` (positive maps)
        or autograd of the standard operations (other maps). Under ``torch.compile`` the
        call runs as it is, outside the graph (decorating the method instead would import
        ``torch._dynamo`` with this module: 70 MiB and a second of every process's time)."""
        if torch.compiler.is_compiling():
            return _uncompiled()(self, call)  # type: ignore[no-any-return]
        return self._run(call)

    def _run(self, call: Call) -> tuple[Any, Any, Any]:
        inputs = [t for t in (call.x, call.y, call.v, call.kv0) if t is not None]
        if not is_eager(call.x):  # meta or fake tensors: the standard operations read no value
            standard = Steps(block=self.block_size(call.x.shape[-2], call.causal), chunk=self.chunk)
            return standard.run(call.with_arrays(steps=standard))
        # the engine computes in float32 or wider (its dtype): autocast would change that
        with no_autocast(call.x.device):
            if not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs)):
                return super().run(call)
            if not isinstance(call.form, Exponent):
                block = self.block_size(call.x.shape[-2], call.causal)
                standard = Steps(block=block, chunk=self.chunk)
                return standard.run(call.with_arrays(steps=standard))
            # the query and key features of every row, if they fit the budget
            size = call.x.shape[0] * (call.x.shape[1] + call.y.shape[1]) * call.m
            budget = getattr(_BUDGET, "bytes", self.feature_budget)
            fits = not call.causal and size * call.x.element_size() <= budget
            call = call.with_arrays(steps=self.training, keep_features=fits)
            out, kv, small = _Attention.apply(call, call.x, call.y, call.v, call.kv0)  # type: ignore[no-untyped-call]
        return out, kv, small


_BUDGET = threading.local()  # kept_features' budget in this thread, if any


@contextlib.contextmanager
def kept_features(budget_mib: float) -> Iterator[None]:
    """Within the block, in this thread: a bidirectional call recorded by autograd keeps
    its features for the backward if they take at most ``budget_mib`` MiB (0: always
    recompute them). The default is 128 MiB per call; a model keeps that much per
    attention layer until its backward."""
    if (isinstance(budget_mib, bool) or not isinstance(budget_mib, int | float)
            or not math.isfinite(budget_mib) or budget_mib < 0):  # fmt: skip
        raise ValueError(f"budget_mib must be a finite number >= 0 (MiB), got {budget_mib!r}")
    before = getattr(_BUDGET, "bytes", None)
    _BUDGET.bytes = int(budget_mib * (1 << 20))
    try:
        yield
    finally:
        if before is None:
            del _BUDGET.bytes
        else:
            _BUDGET.bytes = before


@functools.cache
def _uncompiled() -> Any:
    """:meth:`TorchSteps._run`, which ``torch.compile`` calls without tracing it."""
    return torch.compiler.disable(TorchSteps._run)  # type: ignore[no-untyped-call]


class _Attention(torch.autograd.Function):
    """FAVOR attention with the engine's own backward pass."""

    @staticmethod
    def forward(
        ctx: Any, call: Call, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor,
        kv0: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        call = call.with_arrays(x=x, y=y, v=v, kv0=kv0)
        out, kv, small, states = forward(call)
        ctx.call, ctx.states, ctx.has_state = call, states, kv0 is not None
        ctx.save_for_backward(x, y, v, out, kv, *([] if kv0 is None else [kv0]))
        ctx.mark_non_differentiable(small)
        ctx.set_materialize_grads(False)
        return out, kv, small

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, g_out: torch.Tensor | None, g_kv: torch.Tensor | None, _: Any
    ) -> tuple[None, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        x, y, v, out, kv, *rest = ctx.saved_tensors
        call = ctx.call.with_arrays(x=x, y=y, v=v, kv0=rest[0] if rest else None)
        if g_out is None:
            g_out = torch.zeros_like(out)
        dx, dy, dv, dkv0 = backward(call, out, kv, ctx.states, g_out, g_kv)
        return None, dx, dy, dv, dkv0


register_steps("array_api_compat.torch", TorchSteps())
