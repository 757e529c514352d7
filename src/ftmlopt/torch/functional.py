r"""The functional FTML step, ``ftml(params, grads, ds, vs, zs, state_steps, *, lr, beta1, ...)``.

It works on lists of tensors in place, like ``torch.optim._functional``, and picks one of three
implementations: the for-loop (:mod:`ftmlopt.torch._single_tensor`), foreach
(:mod:`ftmlopt.torch._multi_tensor`) or the fused kernels (:mod:`ftmlopt.torch._fused`).
:class:`ftmlopt.torch.FTML` calls it once per param group. Its defaults are the class's: the
compact form (``ds`` and ``zs`` are empty lists) and :mod:`ftmlopt.rule`'s hyper-parameters.

lr = 0 (:mod:`ftmlopt.rule`): the weights do not move, the gradient is folded into ``v`` and the
step is counted, in both forms (the MXNet form keeps ``d`` and ``z``).

Example:
    >>> import torch
    >>> from ftmlopt.torch.functional import ftml
    >>> w, g, v, step = torch.tensor([1.0]), torch.tensor([2.0]), torch.zeros(1), torch.tensor(0.0)
    >>> ftml([w], [g], [], [v], [], [step], lr=0.5, beta1=0.6, beta2=0.999, eps=0.0)
    >>> w, v, step
    (tensor([0.5000]), tensor([0.0040]), tensor(1.))

MXNet's three-state form takes ``ds`` and ``zs`` and ``compact=False``:

    >>> w, d, v, z, step = torch.tensor([1.0]), torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.tensor(0.0)
    >>> ftml([w], [g], [d], [v], [z], [step], lr=0.5, beta1=0.6, beta2=0.999, eps=0.0, compact=False)
    >>> w, step
    (tensor([0.5000]), tensor(1.))
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import _default_to_fused_or_foreach, _disable_dynamo_if_unsupported

from ftmlopt import rule
from ftmlopt.torch._constants import StepOptions, StepTensors
from ftmlopt.torch._multi_tensor import _multi_tensor_ftml, local_shards
from ftmlopt.torch._single_tensor import _single_tensor_ftml

__all__ = ["ftml"]


def _fused_with_lr0_fallback(lists: StepTensors, opts: StepOptions, *, grad_scale: Tensor | None = None,
                             found_inf: Tensor | None = None, **flags: Any) -> None:
    """The fused step (:func:`ftmlopt.torch._fused._fused_ftml`, looked up at call time), except an
    MXNet-form step at lr 0, which goes to the foreach path.

    The kernels' MXNet form divides by lr; at lr 0 that form only folds the gradient into ``v`` and
    counts the step (:mod:`ftmlopt.rule`), which the foreach path does instead. A tensor lr on an
    accelerator is read for this (one host sync, MXNet form only). DTensors are stepped through
    their local shards. ``flags``: ``has_complex``, ``capturable``, ``differentiable``.
    """
    from ftmlopt.torch import _fused

    if not opts.compact and float(opts.lr) == 0.0:
        if found_inf is not None and bool(found_inf):
            return  # GradScaler skips this step
        if grad_scale is not None:
            lists = lists._replace(grads=list(torch._foreach_div(lists.grads, grad_scale)))
        _multi_tensor_ftml(lists, opts._replace(lr=0.0), **flags)
        return
    params, grads, ds, vs, zs = local_shards(*lists[:5])
    _fused._fused_ftml(StepTensors(params, grads, ds, vs, zs, lists.state_steps), opts, grad_scale=grad_scale,
                       found_inf=found_inf, **flags)


_PLAIN = {Tensor, torch.nn.Parameter}
_IS_CPU = operator.attrgetter("is_cpu")


def _fused_is_default(params: list[Tensor], differentiable: bool) -> bool:
    """Fused is the default on the CPU when the kernel says it can step these params.

    The CPU kernel changes no process-wide thread setting, runs on ``torch.get_num_threads()``
    threads and compiles in milliseconds (no cache), and its step is one registered op that
    ``torch.compile`` keeps opaque, so it is the default in eager and compiled code alike.
    CUDA keeps torch's choice (foreach) unless ``fused=True``.
    """
    if differentiable or not params or torch.jit.is_scripting():
        return False
    if torch.compiler.is_compiling():  # dynamo traces plain loops, not map/attrgetter
        if not all(type(p) in (Tensor, torch.nn.Parameter) and p.device.type == "cpu" for p in params):
            return False
    elif not set(map(type, params)) <= _PLAIN or not all(map(_IS_CPU, params)):  # C loops: 2,000 tensors
        return False
    from ftmlopt.torch import _fused

    supported = getattr(_fused, "fused_supported", None)
    return bool(supported is not None and supported(params))


@_disable_dynamo_if_unsupported(single_tensor_fn=_single_tensor_ftml)
def ftml(
    params: list[Tensor],
    grads: list[Tensor],
    ds: list[Tensor],
    vs: list[Tensor],
    zs: list[Tensor],
    state_steps: list[Tensor],
    foreach: bool | None = None,
    fused: bool | None = None,
    capturable: bool = False,
    differentiable: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    has_complex: bool = False,
    *,
    lr: float | Tensor = rule.DEFAULT_LR,
    beta1: float = rule.DEFAULT_BETA1,
    beta2: float = rule.DEFAULT_BETA2,
    eps: float = rule.DEFAULT_EPS,
    weight_decay: float = 0.0,
    clip_gradient: float | None = None,
    decoupled_weight_decay: bool = False,
    compact: bool = True,
    maximize: bool = False,
) -> None:
    r"""Functional FTML: one step over lists of tensors, in place (see :class:`ftmlopt.torch.FTML` for the math).

    ``state_steps`` are 0-dim float tensors holding the number of steps taken so far; each is
    incremented here, also at lr 0 (the weights stay, ``v`` takes the gradient: :mod:`ftmlopt.rule`).
    ``compact=True`` (the default, as in :class:`ftmlopt.torch.FTML`) is the compact form, and ``ds``
    and ``zs`` are empty lists; ``compact=False`` is MXNet's three-state form.

    Implementation choice: ``fused`` / ``foreach`` when given; otherwise fused on the CPU when the
    fused kernel is available, foreach on CUDA, and the for-loop elsewhere (and whenever
    ``differentiable``).

    Example:
        >>> import torch
        >>> from ftmlopt.torch.functional import ftml
        >>> w, g = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.0])
        >>> v, step = torch.zeros(2), torch.tensor(0.0)
        >>> ftml([w], [g], [], [v], [], [step], foreach=False, lr=0.1)
        >>> w  # the first step moves each element with a gradient by about lr
        tensor([ 0.9000, -2.0000])
    """
    if fused is None and foreach is None:
        if _fused_is_default(params, differentiable):
            fused = True
        else:
            _, foreach = _default_to_fused_or_foreach(params, differentiable, use_fused=False)
            # A tensor lr needs capturable on the foreach path.
            if foreach and isinstance(lr, Tensor) and not capturable:
                foreach = False
    if not torch.compiler.is_compiling() and not all(isinstance(t, Tensor) for t in state_steps):
        raise RuntimeError("API has changed, `state_steps` argument must contain a list of singleton tensors")
    if clip_gradient is not None and not torch.compiler.is_compiling():
        rule.check_clip(clip_gradient, "clip_gradient value")

    if fused:
        func: Callable[..., None] = _fused_with_lr0_fallback
    elif foreach:
        func = _multi_tensor_ftml
    else:
        func = _single_tensor_ftml
    func(
        StepTensors(params, grads, ds, vs, zs, state_steps),
        StepOptions(lr, beta1, beta2, eps, weight_decay, clip_gradient, decoupled_weight_decay, compact, maximize),
        grad_scale=grad_scale, found_inf=found_inf, has_complex=has_complex, capturable=capturable,
        differentiable=differentiable,
    )
