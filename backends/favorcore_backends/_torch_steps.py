"""PyTorch's operations of the engine: the eager ones (:mod:`._eager`) on tensors.

Registered for PyTorch when the core first meets tensors. PyTorch's own intra-op threads
use every core, so work items run in order in the calling thread. While autograd records
(any input requires grad) the engine runs the standard operations instead
(:meth:`TorchSteps.fits`): in-place steps on reused buffers would overwrite tensors it
saved for the backward pass.
"""

from __future__ import annotations

from typing import Any

import array_api_compat.torch as xp_torch
import torch

from favorcore import register_steps

from ._eager import EagerSteps, Lib

__all__ = ["TorchSteps"]


def _sq_norms(y: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(torch.linalg.vector_norm(y, dim=1).square_())


def _key_sums(kf: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(V^T kf)^T`` and the column sums as a vector-matrix product."""
    ones = torch.ones(kf.shape[0], dtype=kf.dtype, device=kf.device)
    return torch.cat([(v.T @ kf).T, (ones @ kf)[:, None]], dim=1)


TORCH = Lib(
    xp=xp_torch,
    native=torch,
    sq_norms=_sq_norms,
    fill_where=lambda a, cond, value: a.masked_fill_(cond, value),
    clamp_min=lambda e, floor: e.clamp_(min=floor),
    zero_future=lambda scores: scores.tril_(),
    key_sums=_key_sums,
    add_product=lambda o, a, b, tmp: o.baddbmm_(a, b),
    on_host=lambda a: a.device.type == "cpu",
)


class TorchSteps(EagerSteps):
    """The eager operations for tensors; bidirectional blocks 4x as long as causal ones
    (each operation costs PyTorch some microseconds, and causal blocks hold their chunks'
    prefixes)."""

    def __init__(self, *, block: int = 4096, chunk: int = 64) -> None:
        super().__init__(TORCH, block=block, chunk=chunk)

    def block_size(self, length: int, causal: bool) -> int:
        """:attr:`block` rows for causal attention, 4x as many bidirectional."""
        return self.block if causal else 4 * self.block

    def fits(self, *arrays: Any) -> bool:
        """False while autograd records any input."""
        return not (torch.is_grad_enabled() and any(t.requires_grad for t in arrays))


register_steps("array_api_compat.torch", TorchSteps())
