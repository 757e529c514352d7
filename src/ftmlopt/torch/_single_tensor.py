r"""The readable for-loop FTML step, one param at a time: the ground truth for the fast paths.

Each step is :func:`ftmlopt.rule.compact_step` (the compact form, state ``v``) or
:func:`ftmlopt.rule.mxnet_step` (MXNet's three-state form, state ``d, v, z``) on torch tensors, out
of place (so autograd can run through it, ``differentiable=True``), whose results are then written
into the param and its state. Per element, with :math:`g' = \mathrm{clamp}(\pm g + \lambda w_{t-1}, -c, c)`:

.. math::

    v_t &= \beta_2 v_{t-1} + (1-\beta_2)\, g'^2, \qquad
    \hat\sigma_t = \sqrt{v_t/(1-\beta_2^t)} + \epsilon \\
    \text{compact:}\quad w_t &= w_{t-1} - \frac{\eta_t(1-\beta_1)}{1-\beta_1^t}\,\frac{g'}{\hat\sigma_t} \\
    \text{MXNet:}\quad d_t &= \frac{1-\beta_1^t}{\eta_t}\hat\sigma_t,\quad
    z_t = \beta_1 z_{t-1} + (1-\beta_1)\, g' - (d_t - \beta_1 d_{t-1})\, w_{t-1},\quad w_t = -z_t/d_t

Example:
    >>> import torch
    >>> from ftmlopt.torch._single_tensor import _single_tensor_ftml
    >>> w, g, v, step = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.0]), torch.zeros(2), torch.tensor(0.0)
    >>> _single_tensor_ftml([w], [g], [], [v], [], [step], grad_scale=None, found_inf=None, lr=0.1, beta1=0.6,
    ...                     beta2=0.999, eps=1e-8, weight_decay=0.0, clip_gradient=None, decoupled_weight_decay=False,
    ...                     compact=True, maximize=False, has_complex=False, capturable=False, differentiable=False)
    >>> w, step
    (tensor([ 0.9000, -2.0000]), tensor(1.))
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import _get_value

from ftmlopt import rule
from ftmlopt.torch import _dtypes
from ftmlopt.torch._constants import lr_for_math, step_constants
from ftmlopt.torch._validation import check_capturable_devices

__all__ = ["_single_tensor_ftml"]


def _single_tensor_ftml(
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
    """One FTML step, one param at a time, in place (``compact=True``: ``ds`` and ``zs`` are empty).

    Each param is computed in :func:`ftmlopt.rule.compute_dtype` of its dtype and its state's
    (float64 when either is float64; float32 for float16/bfloat16 params; else the param's dtype)
    and the results are rounded once to the stored dtypes. The per-step constants are Python floats
    (float64) from the CPU step count; tensors under ``capturable``, ``differentiable`` and
    ``torch.compile``.

    lr = 0 (:mod:`ftmlopt.rule`): ``w`` stays, ``v`` takes the gradient and ``step`` is counted in both
    forms; the MXNet form keeps ``d`` and ``z`` (a tensor lr is masked with ``torch.where``).
    """
    if grad_scale is not None or found_inf is not None:
        raise AssertionError("grad_scale and found_inf are only supported by fused=True")
    if capturable:
        check_capturable_devices(params, state_steps)
    tensor_math = capturable or differentiable or torch.compiler.is_compiling()
    lr = lr_for_math(lr, tensor_math)
    masked = not compact and isinstance(lr, Tensor)  # the MXNet form at a tensor lr that may be 0
    hyper = dict(
        beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, clip_gradient=clip_gradient,
        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize, compact=compact,
    )
    cache: dict[float, rule.Constants] = {}
    for i, param in enumerate(params):
        step_t = state_steps[i]
        step_t += 1
        t: float | Tensor = step_t
        if tensor_math:
            c = step_constants(lr, t, **hyper)  # type: ignore[arg-type]
        else:
            t = _get_value(t)
            c = cache.get(t) or cache.setdefault(t, step_constants(lr, t, **hyper))  # type: ignore[arg-type]

        tensors = [param, grads[i], vs[i]] + ([] if compact else [ds[i], zs[i]])
        if torch.is_complex(param):  # every real coordinate is its own FTML problem
            tensors = [torch.view_as_real(x) for x in tensors]
        compute = _dtypes.compute_dtype(tensors[0].dtype, tensors[2].dtype)
        inputs = [x.to(compute) for x in tensors]
        if differentiable:  # the writes below would modify tensors autograd has saved
            inputs = [x.clone() for x in inputs]
        if compact:
            w, g, v = inputs
            results: list[Tensor] = list(rule.compact_step(w, g, v, c, sqrt=torch.sqrt, clip=torch.clamp))
            targets = [tensors[0], tensors[2]]
        else:
            w, g, v, d, z = inputs
            results = list(rule.mxnet_step(w, g, d, v, z, c, sqrt=torch.sqrt, clip=torch.clamp,
                                           where=torch.where if masked else None))
            targets = [tensors[0], tensors[3], tensors[2], tensors[4]]  # w, d, v, z
        for dst, src in zip(targets, results):
            dst.copy_(src)
