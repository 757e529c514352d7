"""A step's constants for the for-loop and foreach paths: :func:`ftmlopt.rule.constants` with torch's lr.

The constants are Python floats (float64) computed from the CPU step count in the eager paths;
torch rounds each to the compute dtype where it meets a tensor (a Python scalar operand takes the
tensor's dtype). Under tensor math (``capturable``, ``differentiable``, ``torch.compile``) the
step count and a tensor lr stay tensors, so nothing is read back to the host.

Example:
    >>> from ftmlopt.torch._constants import step_constants
    >>> c = step_constants(0.1, 1.0, beta1=0.6, beta2=0.999, eps=1e-8, weight_decay=0.0, clip_gradient=None,
    ...                    decoupled_weight_decay=False, maximize=False, compact=True)
    >>> round(c.step_size, 12)  # lr (1 - beta1) / (1 - beta1**1) = lr
    0.1
"""

from __future__ import annotations

import torch
from torch import Tensor

from ftmlopt import rule

__all__ = ["lr_for_math", "step_constants"]


def lr_for_math(lr: float | Tensor, tensor_math: bool) -> float | Tensor:
    """A CPU tensor lr is read for free (keeping the float64 scalar math) unless the step stays in tensors."""
    if isinstance(lr, Tensor) and not tensor_math and lr.device.type == "cpu" and not lr.requires_grad:
        return float(lr.item())
    return lr


def step_constants(
    lr: float | Tensor, t: float | Tensor, *, beta1: float, beta2: float, eps: float, weight_decay: float,
    clip_gradient: float | None, decoupled_weight_decay: bool, maximize: bool, compact: bool,
) -> rule.Constants:
    """:func:`ftmlopt.rule.constants` for one step count (a Python float, or a tensor under tensor math).

    For a tensor lr in the MXNet form, ``d_scale`` divides by ``lr`` where it is nonzero and by 1 where
    it is 0: that step is masked out anyway (``where``), and this keeps inf/NaN out of both branches.
    """
    c = rule.constants(lr, t, beta1, beta2, eps, weight_decay=weight_decay, decoupled=decoupled_weight_decay,
                       clip=clip_gradient, maximize=maximize)
    if not compact and isinstance(lr, Tensor):
        c = c._replace(d_scale=c.bias1 / torch.where(lr == 0, torch.ones_like(lr), lr))
    return c
