"""Fused FTML step for ``ftmlopt.torch.FTML(fused=True)`` (owned by the kernels work, issue 4).

Placeholder until the CPU (Numba) and CUDA (Triton) kernels land: it raises a clear error.
The signature below is the contract between the optimizer class and the kernels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor


def _fused_ftml(
    params: list[Tensor],
    grads: list[Tensor],
    ds: list[Tensor],
    vs: list[Tensor],
    zs: list[Tensor],
    state_steps: list[Tensor],
    *,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    clip_gradient: float | None,
    decoupled_weight_decay: bool,
    compact: bool,
    maximize: bool,
    has_complex: bool,
    capturable: bool,
    differentiable: bool,
) -> None:
    raise RuntimeError("ftmlopt.torch.FTML(fused=True) needs the fused kernels, which are not built yet")
