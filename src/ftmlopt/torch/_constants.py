"""The private torch paths' argument bundles, and a step's constants: :func:`ftmlopt.rule.constants` with torch's lr.

:class:`StepTensors` (the six lists) and :class:`StepOptions` (the hyper-parameters) carry the
arguments of the public :func:`ftmlopt.torch.functional.ftml` to the for-loop, foreach and fused
paths, so that the list of names is written once.

The constants are Python floats (float64) computed from the CPU step count in the eager paths;
torch rounds each to the compute dtype where it meets a tensor (a Python scalar operand takes the
tensor's dtype). Under tensor math (``capturable``, ``differentiable``, ``torch.compile``) the
step count and a tensor lr stay tensors, so nothing is read back to the host.

Example:
    >>> from ftmlopt.torch._constants import StepOptions, step_constants
    >>> opts = StepOptions(lr=0.1, beta1=0.6, beta2=0.999, eps=1e-8, weight_decay=0.0, clip_gradient=None,
    ...                    decoupled_weight_decay=False, compact=True, maximize=False)
    >>> c = step_constants(opts, 1.0)
    >>> round(c.step_size, 12)  # lr (1 - beta1) / (1 - beta1**1) = lr
    0.1
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ftmlopt import rule

__all__ = ["StepOptions", "StepTensors", "lr_for_math", "step_constants"]


class StepTensors(NamedTuple):
    """One group's tensors, a list each (the compact form: ``ds`` and ``zs`` are empty)."""

    params: list[Tensor]
    grads: list[Tensor]
    ds: list[Tensor]
    vs: list[Tensor]
    zs: list[Tensor]
    state_steps: list[Tensor]


class StepOptions(NamedTuple):
    """The hyper-parameters of one step, as :func:`ftmlopt.torch.functional.ftml` takes them."""

    lr: float | Tensor
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    clip_gradient: float | None
    decoupled_weight_decay: bool
    compact: bool
    maximize: bool


def lr_for_math(lr: float | Tensor, tensor_math: bool) -> float | Tensor:
    """A CPU tensor lr is read for free (keeping the float64 scalar math) unless the step stays in tensors."""
    if isinstance(lr, Tensor) and not tensor_math and lr.device.type == "cpu" and not lr.requires_grad:
        return float(lr.item())
    return lr


def step_constants(opts: StepOptions, t: float | Tensor) -> rule.Constants:
    """:func:`ftmlopt.rule.constants` of ``opts`` for one step count (a Python float, or a tensor under tensor math).

    For a tensor ``opts.lr`` in the MXNet form, ``d_scale`` divides by ``lr`` where it is nonzero and by 1 where
    it is 0: that step is masked out anyway (``where``), and this keeps inf/NaN out of both branches.
    """
    lr = opts.lr
    c = rule.constants(lr, t, opts.beta1, opts.beta2, opts.eps, weight_decay=opts.weight_decay,
                       decoupled=opts.decoupled_weight_decay, clip=opts.clip_gradient, maximize=opts.maximize)
    if not opts.compact and isinstance(lr, Tensor):
        c = c._replace(d_scale=c.bias1 / torch.where(lr == 0, torch.ones_like(lr), lr))
    return c
