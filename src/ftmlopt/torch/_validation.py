"""The checks of :class:`ftmlopt.torch.FTML`: hyper-parameters, groups, flags, existing state, devices.

The numbers are checked by :mod:`ftmlopt.rule` (one function per hyper-parameter, torch's wording
``Invalid <what>: <value>``); this module adds what is torch's own: a tensor ``lr``, the flags and
their combinations, ``state_dtype`` as a ``torch.dtype``, the existing state of a parameter, the
devices of ``fused`` and ``capturable``. Every check raises before anything is mutated.

Example:
    >>> from ftmlopt.torch import _validation
    >>> _validation.check_hyperparameters({"lr": 0.01, "betas": (0.6, 0.999)})
    >>> _validation.check_hyperparameters({"lr": -1.0})
    Traceback (most recent call last):
        ...
    ValueError: Invalid learning rate: -1.0
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import _get_capturable_supported_devices

from ftmlopt import rule
from ftmlopt.torch import _dtypes, _lowbit

__all__ = [
    "FLAGS",
    "check_capturable_devices",
    "check_fused_param",
    "check_group_at_step",
    "check_hyperparameters",
    "check_lr",
    "check_state",
    "check_state_dtype",
    "check_values",
]

#: The boolean flags of a group (``foreach`` and ``fused`` may also be None).
FLAGS = ("decoupled_weight_decay", "compact", "multi_precision", "maximize", "capturable", "differentiable")


def check_lr(lr: Any) -> None:
    """torch's checks for a tensor lr, then :func:`ftmlopt.rule.check_lr` (finite, >= 0)."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not lr.is_floating_point():
            raise TypeError(f"Tensor lr must be floating point, got dtype {lr.dtype}")
        rule.check_lr(float(lr.detach().reshape(())))
    else:
        rule.check_lr(lr)


def check_values(group: Mapping[str, Any]) -> None:
    """The numeric hyper-parameters present in ``group``, with torch's wording ("Invalid <what>: <value>")."""
    if "lr" in group:
        check_lr(group["lr"])
    if "betas" in group:
        rule.check_betas(group["betas"])
    if "eps" in group:
        rule.check_eps(group["eps"])
    if "weight_decay" in group:
        rule.check_weight_decay(group["weight_decay"])
    if "clip_gradient" in group:
        rule.check_clip(group["clip_gradient"], "clip_gradient value")


def check_state_dtype(value: Any) -> None:
    """``None`` or a floating-point ``torch.dtype`` (:func:`ftmlopt.rule.check_state_dtype`, TypeError).

    The rule also knows dtypes by name (``"float32"``); torch creates the state with the value
    itself, so a torch dtype is needed here.
    """
    rule.check_state_dtype(value)
    if value is not None and not isinstance(value, torch.dtype):
        raise TypeError(f"Invalid state_dtype: {value!r} (a floating-point torch.dtype is needed, e.g. torch.float32)")


def check_hyperparameters(group: Mapping[str, Any]) -> None:
    """Validate the hyper-parameters present in ``group`` (a defaults dict or a param group)."""
    check_values(group)
    for flag in FLAGS:
        if flag in group:
            rule.check_bool(group[flag], flag)
    for flag in ("foreach", "fused"):
        if group.get(flag) is not None:
            rule.check_bool(group[flag], flag)
    if "state_dtype" in group:
        check_state_dtype(group["state_dtype"])
    fused, foreach = group.get("fused"), group.get("foreach")
    if fused and group.get("differentiable"):
        raise RuntimeError("`fused` does not support `differentiable`")
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if foreach and isinstance(group.get("lr"), Tensor) and not group.get("capturable"):
        raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
    _lowbit.check_options(group)


def check_group_at_step(group: Mapping[str, Any], index: int) -> None:
    """Re-check a group's numbers at step time (edited by hand or by a scheduler since construction).

    A handful of float comparisons per group; a tensor lr off the CPU is not read (no host sync).
    """
    lr = group["lr"]
    try:
        if isinstance(lr, Tensor) and (lr.device.type != "cpu" or lr.requires_grad):
            check_values({k: group[k] for k in ("betas", "eps", "weight_decay", "clip_gradient")})
        else:
            check_values(group)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{err} (param group {index}, checked at step time)") from None


def check_state(p: Tensor, state: Mapping[str, Any], group: Mapping[str, Any]) -> None:
    """The existing state fits the group's form and the param's current dtype (raises RuntimeError)."""
    low_bits = _lowbit.bits_for(p, group)
    if (low_bits < 32) != ("codes" in state):
        have = "low-bit (codes, scales)" if "codes" in state else "float ('v')"
        raise RuntimeError(
            f"this FTML state is {have} but its param group asks for state_bits={group['state_bits']} (a param of "
            f"{p.numel()} elements gets {'low-bit' if low_bits < 32 else 'float'} state): the group's state_bits "
            "changed after the state was created; convert it with opt.load_state_dict(state_dict) into an FTML "
            "built with the state_bits you want"
        )
    if low_bits < 32:
        if tuple(state["codes"].shape) != _lowbit.state_shapes(p, low_bits)[0]:
            raise RuntimeError(
                f"this FTML state holds codes of another width than state_bits={low_bits}: the group's state_bits "
                "changed after the state was created; convert it with opt.load_state_dict(state_dict)"
            )
        return
    if not group["compact"] and "d" not in state:
        raise RuntimeError(
            "this FTML state was created with compact=True (it has no 'd' and 'z'); keep compact=True for "
            "this param group, or convert it with opt.load_state_dict(state_dict) into an FTML(compact=False)"
        )
    v = state.get("v")
    expected = _dtypes.state_dtype(p, group)
    if isinstance(v, Tensor) and v.dtype != expected:
        raise RuntimeError(
            f"FTML state 'v' is {v.dtype} but this {p.dtype} parameter needs {expected} state: the parameter's "
            "dtype changed after its state was created (model.double(), model.half()?). Re-create the optimizer "
            "after the change, or cast the state with opt.load_state_dict(opt.state_dict())"
        )


def check_fused_param(p: Tensor) -> None:
    """A param the fused kernels can step: floating point (or complex), on the CPU or CUDA."""
    if p.device.type not in ("cpu", "cuda") or not (p.is_floating_point() or p.is_complex()):
        raise RuntimeError(
            "`fused=True` requires all the params to be floating point (or complex) Tensors on cpu or cuda, "
            f"got {p.dtype} on {p.device.type}"
        )


def check_capturable_devices(params: list[Tensor], state_steps: list[Tensor]) -> None:
    """Under ``capturable=True`` every param and its step live on one device torch can capture."""
    if torch.compiler.is_compiling():  # the compiler does these checks itself
        return
    supported = _get_capturable_supported_devices()
    for p, step in zip(params, state_steps):
        if not (p.device.type == step.device.type and p.device.type in supported):
            raise AssertionError(
                f"If capturable=True, params and state_steps must be on supported devices: {supported}."
            )
