r"""Checkpoints of :class:`ftmlopt.torch.FTML`: checking a ``state_dict`` and converting it between forms.

``FTML.load_state_dict`` is ``prepare_load`` (check everything, convert each group's state to the
live optimizer's form, warn), torch's own loader, then ``finish_load`` (state dtypes, master copies,
the MXNet form's ``d`` and ``z``). The conversions are exact:

* MXNet form -> compact: ``d`` and ``z`` are dropped; ``v`` and ``step`` are the same in both forms.
* compact -> MXNet form: :math:`d = \frac{1-\beta_1^t}{\eta}\big(\sqrt{v/(1-\beta_2^t)}+\epsilon\big)`
  with the live group's :math:`\eta, \beta, \epsilon` (as they were before loading) and
  :math:`z = -d\,w` with the current weights. The next MXNet step depends on the old ``d`` and
  ``z`` only through ``z + d w`` (0 here), so it continues the compact trajectory.

Example:
    >>> import torch
    >>> from ftmlopt.torch import FTML
    >>> p = torch.nn.Parameter(torch.ones(2))
    >>> opt = FTML([p], compact=False)
    >>> p.grad = torch.ones(2)
    >>> opt.step()
    >>> compact = FTML([p])
    >>> import warnings
    >>> with warnings.catch_warnings(record=True):
    ...     compact.load_state_dict(opt.state_dict())
    >>> sorted(compact.state[p])
    ['step', 'v']
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from ftmlopt import rule
from ftmlopt.torch import _dtypes, _lowbit
from ftmlopt.torch._validation import check_hyperparameters

__all__ = ["FLAG_DEFAULTS", "LoadPlan", "check_state_dict", "finish_load", "mxnet_state_from_compact", "prepare_load"]

#: Group flags, with the values given to groups pickled before a flag existed. ``compact`` is False
#: there: a group written before the flag existed was stepped in the three-state form (its state
#: has ``d`` and ``z``). ``load_state_dict`` converts such state to the live optimizer's form.
FLAG_DEFAULTS: dict[str, Any] = {
    "clip_gradient": None,
    "decoupled_weight_decay": False,
    "compact": False,
    "multi_precision": False,
    "state_dtype": None,
    "state_bits": 32,
    "maximize": False,
    "foreach": None,
    "fused": None,
    "capturable": False,
    "differentiable": False,
}


class LoadPlan(NamedTuple):
    """What :func:`prepare_load` hands torch's loader, and what :func:`finish_load` still has to do."""

    #: the state dict, its groups' state converted to the live optimizer's forms
    state_dict: dict[str, Any]
    #: the live groups (as they were before loading) whose compact state needs ``d`` and ``z``
    to_mxnet: list[dict[str, Any]]
    #: ``id(param)`` -> the saved state tensors of a half param (torch's loader would cast them)
    saved_tensors: dict[int, dict[str, Tensor]]
    #: ``id(param)`` -> its low-bit state entry (codes and scales go back as saved: torch's loader casts them)
    low_saved: dict[int, dict[str, Any]]


def form_name(compact: bool) -> str:
    return "compact" if compact else "MXNet three-state"


def prepare_load(opt: Optimizer, state_dict: Any) -> LoadPlan:
    """Check ``state_dict`` (raises before anything is loaded) and convert its groups to ``opt``'s forms.

    The checkpoint's hyper-parameters replace the live ones, as in ``torch.optim``, except
    ``compact``: the form is the live optimizer's. A group saved in the other form (or before the
    ``compact`` flag existed, which means the MXNet form) is converted, with a ``UserWarning``.
    """
    check_state_dict(opt, state_dict)
    saved_groups = list(state_dict["param_groups"])
    saved_state = dict(state_dict["state"])
    to_mxnet: list[dict[str, Any]] = []
    converted = []
    for i, (live, saved) in enumerate(zip(opt.param_groups, saved_groups)):
        saved_compact = bool(saved.get("compact", False))
        if saved_compact != live["compact"]:
            converted.append(f"group {i}: {form_name(saved_compact)} -> {form_name(live['compact'])}")
            if live["compact"]:
                for pid in saved["params"]:
                    if pid in saved_state:
                        saved_state[pid] = {k: v for k, v in saved_state[pid].items() if k not in ("d", "z")}
            else:
                to_mxnet.append(live)
        saved_groups[i] = {**saved, "compact": live["compact"], "state_bits": live["state_bits"]}
    if converted:
        warnings.warn(
            "FTML.load_state_dict: the checkpoint's state is converted to this optimizer's form ("
            + "; ".join(converted) + "). Build FTML(compact=...) to match the checkpoint to keep its form.",
            UserWarning,
            stacklevel=3,  # the caller of FTML.load_state_dict
        )

    # low-bit <-> float state (and 8 <-> 4 bits): the live optimizer's state_bits decide, as its form does
    low_saved: dict[int, dict[str, Any]] = {}
    bit_notes: list[str] = []
    param_index = getattr(opt, "_param_index", None)
    for i, (live, saved) in enumerate(zip(opt.param_groups, saved_groups)):
        original = state_dict["param_groups"][i]
        for p, pid in zip(live["params"], saved["params"]):
            entry = saved_state.get(pid)
            if not entry:
                continue
            seed = param_index(p) if param_index is not None else 0
            entry, note = _lowbit.convert_entry(dict(entry), p, original, live, seed=seed,
                                                state_dtype=_dtypes.state_dtype(p, saved))
            saved_state[pid] = entry
            if note:
                bit_notes.append(f"param {pid}: {note}")
            if "codes" in entry:
                low_saved[id(p)] = entry
    if bit_notes:
        warnings.warn(
            "FTML.load_state_dict: the checkpoint's state is converted to this optimizer's state_bits ("
            + "; ".join(bit_notes[:4]) + ("; ..." if len(bit_notes) > 4 else "")
            + "). Low-bit state is decoded, float state quantized to the nearest code.",
            UserWarning,
            stacklevel=3,  # the caller of FTML.load_state_dict
        )

    # torch's loader casts floating state to the param's dtype; where this optimizer keeps state in
    # another dtype (float32 for half params), the saved tensors are cast to that dtype instead.
    saved_tensors: dict[int, dict[str, Tensor]] = {}
    for group, saved_group in zip(opt.param_groups, saved_groups):
        for p, pid in zip(group["params"], saved_group["params"]):
            entry = saved_state.get(pid)
            if entry and _dtypes.is_half(p.dtype):
                saved_tensors[id(p)] = {k: v for k, v in entry.items() if k != "step" and torch.is_tensor(v)}
    return LoadPlan({**state_dict, "param_groups": saved_groups, "state": saved_state}, to_mxnet, saved_tensors,
                    low_saved)


def finish_load(opt: Optimizer, plan: LoadPlan) -> None:
    """After torch's loader: state in this optimizer's dtypes, master copies, the MXNet form's ``d``, ``z``.

    Float32 master copies and states of ``multi_precision`` float16/bfloat16 params stay float32.
    """
    for group in opt.param_groups:  # the loaded groups: the checkpoint's flags decide
        for p in group["params"]:
            state = opt.state.get(p)
            if not state:
                continue
            wanted = _dtypes.state_dtype(p, group)
            for key, value in plan.saved_tensors.get(id(p), {}).items():
                dtype = torch.float32 if key == "master" else wanted
                if dtype != p.dtype:
                    state[key] = value.to(device=p.device, dtype=dtype, copy=True)
            if id(p) in plan.low_saved:  # codes and scales exactly as saved (the base loader casts them)
                _lowbit.restore_saved(state, plan.low_saved[id(p)], p.device)
            if group["multi_precision"] and _dtypes.is_half(p.dtype):
                if "master" not in state:  # a checkpoint written without multi_precision
                    state["master"] = p.detach().to(torch.float32, copy=True)
            else:  # masters are only kept where they are used
                state.pop("master", None)
    for group in plan.to_mxnet:
        for p in group["params"]:
            state = opt.state.get(p)
            if state:
                mxnet_state_from_compact(p, state, group)


def mxnet_state_from_compact(p: Tensor, state: dict[str, Any], group: Mapping[str, Any]) -> None:
    """Give a compact state ``d`` and ``z`` (in place): ``d`` from ``v``, ``step`` and lr; ``z = -d w``."""
    v = state["v"]
    t = float(state["step"])
    lr = float(group["lr"])
    if t < 1 or lr == 0.0:
        d = torch.zeros_like(v)  # z = -d w = 0: the next step is the compact step exactly
    else:
        beta1, beta2 = group["betas"]
        c = rule.constants(lr, t, beta1, beta2, group["eps"])
        real_v = torch.view_as_real(v) if v.is_complex() else v
        d_real = (torch.sqrt(real_v / c.bias2) + c.eps) * c.d_scale
        d = torch.view_as_complex(d_real) if v.is_complex() else d_real
    w = state.get("master", p.detach())
    if w.is_complex():
        z = torch.view_as_complex(-torch.view_as_real(d) * torch.view_as_real(w.to(d.dtype)))
    else:
        z = -d * w.to(d.dtype)
    state["d"], state["z"] = d, z


def check_state_dict(opt: Optimizer, state_dict: Any) -> None:
    """Raise ``ValueError`` (before anything is loaded) unless ``state_dict`` is an FTML state dict for
    ``opt``'s parameters: same groups and sizes, valid hyper-parameters, and per parameter exactly the
    state keys of the group's layout, with floating tensors of the parameter's shape and a finite
    integral ``step >= 0``."""
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError("state_dict must be a dict with 'state' and 'param_groups', as FTML.state_dict() returns")
    saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"state_dict has {len(saved_groups)} param groups, this optimizer has {len(opt.param_groups)}")
    for i, (live, saved) in enumerate(zip(opt.param_groups, saved_groups)):
        if len(saved.get("params", ())) != len(live["params"]):
            raise ValueError(f"param group {i} of state_dict has {len(saved.get('params', ()))} params, "
                             f"this optimizer's has {len(live['params'])}")
        lr = saved.get("lr", live["lr"])
        lr_value = float(lr) if isinstance(lr, Tensor) and lr.numel() == 1 else lr
        if isinstance(lr_value, bool) or not isinstance(lr_value, (int, float)) or not 0 <= lr_value < math.inf:
            raise ValueError(f"Invalid learning rate in param group {i} of state_dict: {lr!r}")
        check_hyperparameters({k: v for k, v in saved.items() if k not in ("params", "param_names", "lr")})
        compact, mp = saved.get("compact", False), saved.get("multi_precision", False)
        for pid, p in zip(saved["params"], live["params"]):
            entry = saved_state.get(pid)
            if entry is None:
                continue  # a parameter that has not been stepped yet
            low = isinstance(entry, Mapping) and "codes" in entry
            if low:
                if not compact:
                    raise ValueError(f"state of param {pid} (group {i}) is low-bit (codes, scales) in a group saved "
                                     "with compact=False: not an FTML state dict")
                _lowbit.check_saved_entry(entry, p, saved, f"param {pid} (group {i})")
            expected = {"step", *_lowbit.LOWBIT_KEYS} if low else {"step", "v"} | (set() if compact else {"d", "z"})
            allowed = expected | ({"master"} if mp and _dtypes.is_half(p.dtype) else set())
            if not isinstance(entry, Mapping) or not expected <= set(entry) <= allowed:
                got = sorted(entry) if isinstance(entry, Mapping) else type(entry).__name__
                raise ValueError(f"state of param {pid} (group {i}) has keys {got}, expected {sorted(expected)}: "
                                 "not an FTML state of this layout (another optimizer's, or compact/full mixed up?)")
            step = entry["step"]
            value = float(step) if isinstance(step, Tensor) and step.numel() == 1 else step
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value >= 0 and value == int(value)
            ):
                raise ValueError(
                    f"state 'step' of param {pid} (group {i}) must be an integral count >= 0, got {step!r}"
                )
            for key in set(entry) - {"step", *_lowbit.LOWBIT_KEYS}:
                t = entry[key]
                if not isinstance(t, Tensor) or not (t.is_floating_point() or t.is_complex()) or t.shape != p.shape:
                    desc = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                    raise ValueError(f"state {key!r} of param {pid} (group {i}) must be a floating tensor of shape "
                                     f"{tuple(p.shape)}, got {desc}")
