r"""``FTML`` as a ``torch.optim.Optimizer``, laid out like ``torch/optim/adam.py``.

The file has the usual four parts: the :class:`FTML` class (validation, defaults, lazy state in
``_init_group``, ``step``), the readable for-loop :func:`_single_tensor_ftml` (the ground truth, the
only path that supports ``differentiable=True``), the horizontally fused :func:`_multi_tensor_ftml`
(``torch._foreach_*`` ops per device and dtype), and the dispatching functional :func:`ftml`, which
also reaches the fused kernels in :mod:`ftmlopt.torch._fused`.

The rule is :mod:`ftmlopt.rule`, written once: the for-loop calls :func:`ftmlopt.rule.compact_step`
(the default, the paper's Theorem 1 form, state ``v``) or :func:`ftmlopt.rule.mxnet_step` (MXNet's
three-state form, ``compact=False``, state ``d, v, z``) on torch tensors, out of place, and writes
the results into the parameter and its state; the foreach path runs the same ops in the same order.
Per element, with :math:`g' = \mathrm{clamp}(\pm g + \lambda w_{t-1}, -c, c)`:

.. math::

    v_t &= \beta_2 v_{t-1} + (1-\beta_2)\, g'^2, \qquad
    \hat\sigma_t = \sqrt{v_t/(1-\beta_2^t)} + \epsilon \\
    \text{compact:}\quad w_t &= w_{t-1} - \frac{\eta_t(1-\beta_1)}{1-\beta_1^t}\,\frac{g'}{\hat\sigma_t} \\
    \text{MXNet:}\quad d_t &= \frac{1-\beta_1^t}{\eta_t}\hat\sigma_t,\quad
    z_t = \beta_1 z_{t-1} + (1-\beta_1)\, g' - (d_t - \beta_1 d_{t-1})\, w_{t-1},\quad w_t = -z_t/d_t
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim.optimizer import (
    Optimizer,
    _default_to_fused_or_foreach,
    _disable_dynamo_if_unsupported,
    _get_capturable_supported_devices,
    _get_scalar_dtype,
    _get_value,
    _use_grad_for_differentiable,
    _view_as_real,
)

from ftmlopt import lowbit, rule
from ftmlopt.torch import _lowbit

__all__ = ["FTML", "ftml"]

#: dtypes that are computed in float32 (``rule.compute_dtype``) and that ``multi_precision=True``
#: gives a float32 master copy and float32 state.
_LOW_PRECISION = (torch.float16, torch.bfloat16)

#: Group flags, with the values given to groups pickled before a flag existed. ``compact`` is False
#: there: a group written before the flag existed was stepped in the three-state form (its state
#: has ``d`` and ``z``). ``load_state_dict`` converts such state to the live optimizer's form.
_FLAG_DEFAULTS: dict[str, Any] = {
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

_FLAGS = ("decoupled_weight_decay", "compact", "multi_precision", "maximize", "capturable", "differentiable")


# ----------------------------------------------------------------------------- validation
def _check_lr(lr: Any) -> None:
    """torch's checks for a tensor lr, then :func:`ftmlopt.rule.check_lr` (finite, >= 0)."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not lr.is_floating_point():
            raise TypeError(f"Tensor lr must be floating point, got dtype {lr.dtype}")
        rule.check_lr(float(lr.detach().reshape(())))
    else:
        rule.check_lr(lr)


def _check_values(group: Mapping[str, Any]) -> None:
    """The numeric hyper-parameters present in ``group``, with torch's wording ("Invalid <what>: <value>")."""
    if "lr" in group:
        _check_lr(group["lr"])
    if "betas" in group:
        rule.check_betas(group["betas"])
    if "eps" in group:
        rule.check_eps(group["eps"])
    if "weight_decay" in group:
        rule.check_weight_decay(group["weight_decay"])
    if "clip_gradient" in group:
        rule.check_clip(group["clip_gradient"], "clip_gradient value")


def _check_hyperparameters(group: Mapping[str, Any]) -> None:
    """Validate the hyper-parameters present in ``group`` (a defaults dict or a param group)."""
    _check_values(group)
    for flag in _FLAGS:
        if flag in group:
            rule.check_bool(group[flag], flag)
    for flag in ("foreach", "fused"):
        if group.get(flag) is not None:
            rule.check_bool(group[flag], flag)
    if "state_dtype" in group:
        _check_state_dtype(group["state_dtype"])
    fused, foreach = group.get("fused"), group.get("foreach")
    if fused and group.get("differentiable"):
        raise RuntimeError("`fused` does not support `differentiable`")
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if foreach and isinstance(group.get("lr"), Tensor) and not group.get("capturable"):
        raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
    _lowbit.check_options(group)


def _check_group_at_step(group: Mapping[str, Any], index: int) -> None:
    """Re-check a group's numbers at step time (edited by hand or by a scheduler since construction).

    A handful of float comparisons per group; a tensor lr off the CPU is not read (no host sync).
    """
    lr = group["lr"]
    try:
        if isinstance(lr, Tensor) and (lr.device.type != "cpu" or lr.requires_grad):
            _check_values({k: group[k] for k in ("betas", "eps", "weight_decay", "clip_gradient")})
        else:
            _check_values(group)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{err} (param group {index}, checked at step time)") from None


def _state_dtype(p: Tensor, group: Mapping[str, Any]) -> torch.dtype:
    """The dtype of ``v`` (``d``, ``z``): :func:`ftmlopt.rule.state_dtype` (float32 for half params unless
    the group's ``state_dtype`` says otherwise; always float32 under ``multi_precision``); complex
    params keep their own dtype."""
    dtype = p.dtype
    if dtype.is_complex:
        return dtype
    if group.get("multi_precision") and dtype in _LOW_PRECISION:
        return torch.float32
    requested = group.get("state_dtype")
    return _STATE_DTYPES.get((dtype, requested)) or _torch_dtype(rule.state_dtype(dtype, requested))


def _torch_dtype(name: str) -> torch.dtype:
    return cast(torch.dtype, getattr(torch, name))


# rule's dtype policy, tabulated for torch's floating dtypes (plain dict lookups also trace cleanly
# under torch.compile, where a functools cache would warn).
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_COMPUTE_DTYPES = {dt: _torch_dtype(rule.compute_dtype(dt)) for dt in _FLOATS}
_STATE_DTYPES = {(dt, req): _torch_dtype(rule.state_dtype(dt, req)) for dt in _FLOATS for req in (None, *_FLOATS)}


def _check_state_dtype(value: Any) -> None:
    if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise TypeError(f"state_dtype must be None or a floating-point torch.dtype, got {value!r}")


# ----------------------------------------------------------------------------- the class
class FTML(Optimizer):
    r"""FTML, Follow the Moving Leader (Zheng & Kwok, ICML 2017), as a ``torch.optim`` optimizer.

    .. math::

        g' &= \mathrm{clamp}(\pm g_t + \lambda w_{t-1}, -c, c) \\
        v_t &= \beta_2 v_{t-1} + (1-\beta_2)\, g'^2 \\
        w_t &= w_{t-1} - \frac{\eta_t (1-\beta_1)}{1-\beta_1^t}\,
               \frac{g'}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}

    A drop-in replacement for ``torch.optim.Adam``: param groups, LR schedulers (``lr = 0`` is
    "no step"), ``state_dict``, closures, hooks, ``GradScaler`` (fused path), ``torch.compile``
    and CUDA graphs (``capturable``). The state is ``step`` and ``v``: half of Adam's.

    **Two forms of one rule.** The default (``compact=True``) is the paper's Theorem 1 form above.
    ``compact=False`` is MXNet 1.9's ``ftml_update``, which keeps three buffers,

    .. math::

        d_t = \tfrac{1-\beta_1^t}{\eta_t}\big(\sqrt{v_t/(1-\beta_2^t)}+\epsilon\big),\quad
        z_t = \beta_1 z_{t-1} + (1-\beta_1) g' - (d_t - \beta_1 d_{t-1}) w_{t-1},\quad
        w_t = -z_t/d_t,

    and gives the same weights in exact arithmetic (to 1e-10 in float64) *while only the optimizer
    writes the weights*. Where they differ (measured, float32, ``docs/torch.md``):

    * an edit to the weights between steps (``reset_parameters()``, zeroing a layer, a clamp, a
      weight-only restore) persists in the compact form; the MXNet form remembers the old iterate
      in ``z`` and pulls the weight back (a 32x32 linear layer zeroed after 30 steps at lr 1e-3
      jumps back to weights of up to 0.11 on the next step; the compact step moves it by 2e-3);
    * a jump of the learning rate by orders of magnitude: ``d`` scales with ``1/lr`` and the MXNet
      step subtracts nearly equal terms (20 steps at lr 1e-10, then lr 1e-2: a step of 17 where the
      recurrence gives 9e-3); the compact form has no such cancellation;
    * memory: ``v`` (4 bytes per float32 element) against ``d, v, z`` (12 bytes); Adam keeps 8.

    Choose ``compact=False`` to reproduce MXNet's numbers and state (``d, v, z`` checkpoints) or to
    keep the pull-back behaviour deliberately.

    **AdamW users.** ``weight_decay`` is coupled L2 (MXNet's; added to the gradient) unless
    ``decoupled_weight_decay=True``, which is AdamW's decay :math:`w \leftarrow (1-\eta\lambda) w`.
    Replacing ``AdamW(..., weight_decay=0.1)`` means ``FTML(..., weight_decay=0.1,
    decoupled_weight_decay=True)``.

    Args:
        params: an iterable of tensors, of ``(name, tensor)`` pairs, or of param-group dicts.
        lr: learning rate :math:`\eta \ge 0` (a float, or a 1-element tensor). The default 0.0025 is
            the paper's (and MXNet 2.0's); MXNet 1.9's ``FTML`` defaults to 0.01. ``lr = 0`` is "no
            step": the weights stay; both forms still fold the gradient into ``v`` and count the
            step (as Adam does); the MXNet form keeps ``d`` and ``z`` (see :mod:`ftmlopt.rule`).
        betas: :math:`(\beta_1, \beta_2)`, each in ``[0, 1)``; the paper's (0.6, 0.999).
        eps: :math:`\epsilon \ge 0`, added *outside* the square root.
        weight_decay: :math:`\lambda \ge 0`. By default MXNet 1.9's coupled L2 decay, added to the
            gradient before clipping.
        clip_gradient: ``None`` (off) or :math:`c > 0`: clamp :math:`g'` element-wise to ``[-c, c]``
            after the weight decay is added (MXNet's rule).
        decoupled_weight_decay: AdamW's decay, :math:`w \leftarrow (1-\eta\lambda) w` before the
            step (the MXNet form scales ``z`` too, which keeps :math:`w = -z/d`).
        compact: True (default): the Theorem 1 form, state ``step`` and ``v``. False: MXNet's
            three-state form, state ``step``, ``d``, ``v``, ``z``.
        multi_precision: give float16/bfloat16 parameters a float32 master copy (state key
            ``"master"``); the parameter is rewritten from the master each step. (Without it, half
            parameters are still *computed* in float32 and rounded once per step.)
        state_dtype: the dtype of ``v`` (``d``, ``z``). ``None`` (default): float32 for
            float16/bfloat16 params (in bfloat16, ``0.999 * v`` rounds back to ``v`` and ``v``
            never decays), the param's dtype otherwise (:func:`ftmlopt.rule.state_dtype`). Give
            ``torch.bfloat16`` to halve that memory at that cost. Ignored under ``multi_precision``
            (float32) and for complex params.
        state_bits: 32 (default): float ``v``. 8 or 4: ``v`` quantized per block of 128 elements
            (about 1.03 / 0.53 bytes per element: :mod:`ftmlopt.lowbit`), for params of at least
            4096 elements (smaller ones keep float ``v``); state ``codes``, ``scales``, ``seed``
            instead of ``v``. Needs ``compact=True``; not with ``capturable`` or ``differentiable``.
            Per param group too. ``load_state_dict`` converts a checkpoint of another width.
        maximize: maximize the objective (the gradient is negated first).
        foreach: use the ``torch._foreach_*`` implementation (default: on CUDA).
        fused: use the fused kernels of :mod:`ftmlopt.torch._fused` (Numba on CPU, Triton on CUDA;
            default: on CPU when the kernel is available). Supports ``GradScaler``'s fused protocol.
        capturable: keep ``step`` on the device and compute the bias corrections as tensors, so
            the step can be captured in a CUDA graph.
        differentiable: let autograd run through the step (for-loop implementation only).

    Every hyper-parameter is checked at construction, in ``add_param_group`` and again at each
    step (values edited in ``param_groups`` by hand), before anything is changed.

    State per parameter: ``step`` (a 0-dim float32 tensor, on the CPU unless capturable or fused),
    ``v`` (``compact=False``: ``d``, ``v``, ``z``) in ``state_dtype``, plus ``master`` under
    ``multi_precision``.

    Example:
        >>> import torch
        >>> from ftmlopt.torch import FTML
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = FTML(model.parameters(), lr=0.01)
        >>> x, y = torch.randn(64, 4), torch.randn(64, 1)
        >>> first = torch.nn.functional.mse_loss(model(x), y).item()
        >>> for _ in range(50):
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     opt.step()
        >>> loss.item() < first
        True
        >>> sorted(opt.state[model.weight])
        ['step', 'v']
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]],
        lr: float | Tensor = 2.5e-3,
        betas: tuple[float, float] = (0.6, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        clip_gradient: float | None = None,
        decoupled_weight_decay: bool = False,
        compact: bool = True,
        multi_precision: bool = False,
        state_dtype: torch.dtype | None = None,
        state_bits: int = 32,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        defaults: dict[str, Any] = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "clip_gradient": clip_gradient,
            "decoupled_weight_decay": decoupled_weight_decay,
            "compact": compact,
            "multi_precision": multi_precision,
            "state_dtype": state_dtype,
            "state_bits": state_bits,
            "maximize": maximize,
            "foreach": foreach,
            "fused": fused,
            "capturable": capturable,
            "differentiable": differentiable,
        }
        # Everything is checked before the base class sees a parameter: no state exists on error.
        _check_hyperparameters(defaults)
        defaults["betas"] = (float(betas[0]), float(betas[1]))
        if isinstance(lr, Tensor) and lr.dim() != 0:
            defaults["lr"] = lr.reshape(())
        super().__init__(params, defaults)
        if fused:
            # GradScaler hands this optimizer the scale and the inf flag instead of unscaling.
            self._step_supports_amp_scaling = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its own hyper-parameters are validated first, as the defaults are."""
        if isinstance(param_group, dict):
            _check_hyperparameters(param_group)
            merged = {**self.defaults, **param_group}
            _check_hyperparameters({k: merged[k] for k in ("fused", "foreach", "differentiable", "lr", "capturable",
                                                           "compact", "state_bits")})
        super().add_param_group(param_group)

    def _param_index(self, p: Tensor) -> int:
        """``p``'s position among all params of this optimizer (the seed of its low-bit rounding)."""
        index = 0
        for group in self.param_groups:
            for q in group["params"]:
                if q is p:
                    return index
                index += 1
        raise KeyError("parameter not in this optimizer")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in _FLAG_DEFAULTS.items():
                group.setdefault(key, value)
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if len(p_state) != 0 and not torch.is_tensor(p_state["step"]):
                    on_device = group["capturable"] or group["fused"]
                    p_state["step"] = torch.tensor(
                        float(p_state["step"]),
                        dtype=_get_scalar_dtype(is_fused=group["fused"]),
                        device=p.device if on_device else "cpu",
                    )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()``, converting its state to this optimizer's form where it differs.

        The checkpoint's hyper-parameters replace the live ones, as in ``torch.optim``, except
        ``compact``: the form is the one this optimizer was built with. A group saved in the other
        form (or saved before the ``compact`` flag existed, which means the MXNet form) is converted
        exactly, with a warning:

        * MXNet form -> compact: ``d`` and ``z`` are dropped. ``v`` and ``step`` are the same in both
          forms, and so is every later step while only the optimizer writes the weights.
        * compact -> MXNet form: ``d = (1 - b1^t)/lr * (sqrt(v/(1 - b2^t)) + eps)`` with the
          checkpoint's lr, and ``z = -d w`` with the current weights. The next MXNet step depends on
          the old ``d`` and ``z`` only through ``z + d w`` (0 here), so it continues the compact
          trajectory exactly (in exact arithmetic) whatever lr the checkpoint holds.

        Float32 master copies and states of ``multi_precision`` float16/bfloat16 params stay float32
        (``torch.optim.Optimizer.load_state_dict`` would cast them to the param's dtype).
        """
        _check_state_dict(self, state_dict)
        saved_groups = list(state_dict["param_groups"])
        saved_state = dict(state_dict["state"])
        to_mxnet: list[tuple[dict[str, Any], Any]] = []  # (live group, saved param ids) to rebuild d, z for
        converted = []
        for i, (live, saved) in enumerate(zip(self.param_groups, saved_groups)):
            saved_compact = bool(saved.get("compact", False))
            if saved_compact != live["compact"]:
                converted.append(f"group {i}: {_form_name(saved_compact)} -> {_form_name(live['compact'])}")
                if live["compact"]:
                    for pid in saved["params"]:
                        if pid in saved_state:
                            saved_state[pid] = {k: v for k, v in saved_state[pid].items() if k not in ("d", "z")}
                else:
                    to_mxnet.append((live, saved["params"]))
            saved_groups[i] = {**saved, "compact": live["compact"], "state_bits": live["state_bits"]}
        # low-bit <-> float state (and 8 <-> 4 bits): the live optimizer's state_bits decide, as its form does
        low_saved: dict[int, dict[str, Any]] = {}
        bit_notes: list[str] = []
        for i, (live, saved) in enumerate(zip(self.param_groups, saved_groups)):
            original = state_dict["param_groups"][i]
            for p, pid in zip(live["params"], saved["params"]):
                entry = saved_state.get(pid)
                if not entry:
                    continue
                entry, note = _lowbit.convert_entry(dict(entry), p, original, live, seed=self._param_index(p),
                                                    state_dtype=_state_dtype(p, saved))
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
                stacklevel=2,
            )
        if converted:
            warnings.warn(
                "FTML.load_state_dict: the checkpoint's state is converted to this optimizer's form ("
                + "; ".join(converted) + "). Build FTML(compact=...) to match the checkpoint to keep its form.",
                UserWarning,
                stacklevel=2,
            )
        state_dict = {**state_dict, "param_groups": saved_groups, "state": saved_state}

        # torch's loader casts floating state to the param's dtype; where this optimizer keeps state in
        # another dtype (float32 for half params), the saved tensors are cast to that dtype instead.
        saved_tensors: dict[int, dict[str, Tensor]] = {}
        for group, saved_group in zip(self.param_groups, saved_groups):
            for p, pid in zip(group["params"], saved_group["params"]):
                entry = saved_state.get(pid)
                if entry and p.dtype in _LOW_PRECISION:
                    saved_tensors[id(p)] = {k: v for k, v in entry.items() if k != "step" and torch.is_tensor(v)}
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # the loaded groups: the checkpoint's flags decide
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                wanted = _state_dtype(p, group)
                for key, value in saved_tensors.get(id(p), {}).items():
                    dtype = torch.float32 if key == "master" else wanted
                    if dtype != p.dtype:
                        state[key] = value.to(device=p.device, dtype=dtype, copy=True)
                if id(p) in low_saved:  # codes and scales exactly as saved (the base loader casts them)
                    _lowbit.restore_saved(state, low_saved[id(p)], p.device)
                if group["multi_precision"] and p.dtype in _LOW_PRECISION:
                    if "master" not in state:  # a checkpoint written without multi_precision
                        state["master"] = p.detach().to(torch.float32, copy=True)
                else:  # masters are only kept where they are used
                    state.pop("master", None)
        for group, _ in to_mxnet:
            for p in group["params"]:
                state = self.state.get(p)
                if state:
                    _mxnet_state_from_compact(p, state, group)

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        ds: list[Tensor],
        vs: list[Tensor],
        zs: list[Tensor],
        state_steps: list[Tensor],
        masters: list[tuple[Tensor, Tensor]],
        quantized: tuple[list[Tensor], list[Tensor], list[dict[str, Any]]] | None = None,
    ) -> bool:
        """Gather the tensors of the params with a gradient, creating their state on first sight.

        Under ``multi_precision`` a float16/bfloat16 param contributes its float32 master and a
        float32 copy of its gradient, and ``(param, master)`` is appended to ``masters`` so that
        ``step`` can write the result back. Params with low-bit state (``state_bits`` < 32, large
        enough) go to ``quantized`` (params, grads, states) instead of the float-state lists.
        Returns whether any param is complex.
        """
        if group["foreach"] and torch.is_tensor(group["lr"]) and not group["capturable"]:
            raise RuntimeError("lr as a Tensor is not supported for capturable=False and foreach=True")
        has_complex = False
        compact = group["compact"]
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("FTML does not support sparse gradients")
            has_complex |= torch.is_complex(p)
            use_master = group["multi_precision"] and p.dtype in _LOW_PRECISION
            state = self.state[p]
            if len(state) == 0:
                if group["fused"]:
                    _check_fused_param(p)
                # Like torch's Adam, ``step`` stays on the CPU (cheap .item()) unless it must be
                # read on the device (capturable, fused).
                on_device = group["capturable"] or group["fused"]
                state["step"] = torch.zeros(
                    (), dtype=_get_scalar_dtype(is_fused=group["fused"]), device=p.device if on_device else "cpu"
                )
                like = p
                if use_master:
                    master = p.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)
                    like = state["master"] = master
                bits = _lowbit.bits_for(p, group)
                if bits < 32:
                    _lowbit.init_state(state, p, bits, seed=self._param_index(p))
                else:
                    dtype = _state_dtype(p, group)
                    for key in ("v",) if compact else ("d", "v", "z"):
                        state[key] = torch.zeros_like(like, dtype=dtype, memory_format=torch.preserve_format)
            if group["differentiable"] and state["step"].requires_grad:
                raise RuntimeError("`requires_grad` is not supported for `step` in differentiable mode")

            low = quantized is not None and "codes" in state
            to_params, to_grads = (quantized[0], quantized[1]) if low and quantized is not None else (params, grads)
            if use_master:
                master = state["master"]
                to_params.append(master)
                to_grads.append(p.grad.to(torch.float32))
                masters.append((p, master))
            else:
                to_params.append(p)
                to_grads.append(p.grad)
            if low and quantized is not None:
                quantized[2].append(state)
                continue
            if not compact:
                ds.append(state["d"])
                zs.append(state["z"])
            vs.append(state["v"])
            state_steps.append(state["step"])
        return has_complex

    @_use_grad_for_differentiable
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step.

        Every group's hyper-parameters, every gradient and every existing state are checked first,
        so that an error leaves all params and state as they were.

        Args:
            closure: a callable that re-evaluates the model and returns the loss (run once, with
                gradients enabled); optional.

        Returns:
            The closure's loss, or None.
        """
        _graph_capture_health_check(self)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        if not torch.compiler.is_compiling():
            for i, group in enumerate(self.param_groups):
                _check_group_at_step(group, i)
                # the common case (the state has the param's dtype, default flags) costs one comparison
                plain = (group.get("state_dtype") is None and not group["multi_precision"] and group["compact"]
                         and group["state_bits"] == 32)
                for p in group["params"]:
                    grad = p.grad
                    if grad is None:
                        continue
                    if grad.is_sparse:
                        raise RuntimeError("FTML does not support sparse gradients")
                    if not (p.is_floating_point() or p.is_complex()):
                        raise TypeError(f"FTML needs floating-point or complex parameters, got one of dtype {p.dtype}")
                    if group["state_bits"] < 32:
                        _lowbit.check_param(p, group)
                    state = self.state.get(p)
                    if state and not (plain and "v" in state and state["v"].dtype == p.dtype):
                        _check_state(p, state, group)
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            ds: list[Tensor] = []
            vs: list[Tensor] = []
            zs: list[Tensor] = []
            state_steps: list[Tensor] = []
            masters: list[tuple[Tensor, Tensor]] = []
            quantized: tuple[list[Tensor], list[Tensor], list[dict[str, Any]]] = ([], [], [])
            has_complex = self._init_group(group, params, grads, ds, vs, zs, state_steps, masters, quantized)
            beta1, beta2 = group["betas"]
            ftml(
                params,
                grads,
                ds,
                vs,
                zs,
                state_steps,
                foreach=group["foreach"],
                fused=group["fused"],
                capturable=group["capturable"],
                differentiable=group["differentiable"],
                grad_scale=getattr(self, "grad_scale", None),
                found_inf=getattr(self, "found_inf", None),
                has_complex=has_complex,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                clip_gradient=group["clip_gradient"],
                decoupled_weight_decay=group["decoupled_weight_decay"],
                compact=group["compact"],
                maximize=group["maximize"],
            )
            _lowbit.step_quantized(*quantized, group, grad_scale=getattr(self, "grad_scale", None),
                                   found_inf=getattr(self, "found_inf", None), fused=group["fused"],
                                   foreach=group["foreach"])
            for p, master in masters:
                p.detach().copy_(master)
        return loss


def _form_name(compact: bool) -> str:
    return "compact" if compact else "MXNet three-state"


def _check_state(p: Tensor, state: Mapping[str, Any], group: Mapping[str, Any]) -> None:
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
        if state["codes"].numel() != lowbit.n_code_bytes(_lowbit.real_numel(p), low_bits):
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
    expected = _state_dtype(p, group)
    if isinstance(v, Tensor) and v.dtype != expected:
        raise RuntimeError(
            f"FTML state 'v' is {v.dtype} but this {p.dtype} parameter needs {expected} state: the parameter's "
            "dtype changed after its state was created (model.double(), model.half()?). Re-create the optimizer "
            "after the change, or cast the state with opt.load_state_dict(opt.state_dict())"
        )


def _mxnet_state_from_compact(p: Tensor, state: dict[str, Any], group: Mapping[str, Any]) -> None:
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


def _check_state_dict(opt: FTML, state_dict: Any) -> None:
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
        _check_hyperparameters({k: v for k, v in saved.items() if k not in ("params", "param_names", "lr")})
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
            allowed = expected | ({"master"} if mp and p.dtype in _LOW_PRECISION else set())
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


def _graph_capture_health_check(opt: Optimizer) -> None:
    # Renamed in torch 2.13 (the old name remains as a deprecated alias there).
    check = getattr(opt, "_accelerator_graph_capture_health_check", None)
    if check is None:  # pragma: no cover - torch < 2.13
        check = opt._cuda_graph_capture_health_check
    check()


def _check_fused_param(p: Tensor) -> None:
    if p.device.type not in ("cpu", "cuda") or not (p.is_floating_point() or p.is_complex()):
        raise RuntimeError(
            "`fused=True` requires all the params to be floating point (or complex) Tensors on cpu or cuda, "
            f"got {p.dtype} on {p.device.type}"
        )


# ----------------------------------------------------------------------------- the math
def _lr_for_math(lr: float | Tensor, tensor_math: bool) -> float | Tensor:
    """A CPU tensor lr is read for free (keeping the float64 scalar math) unless the step stays in tensors."""
    if isinstance(lr, Tensor) and not tensor_math and lr.device.type == "cpu" and not lr.requires_grad:
        return float(lr.item())
    return lr


def _constants(
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


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """:func:`ftmlopt.rule.compute_dtype` as a torch dtype (float32 for float16/bfloat16)."""
    return _COMPUTE_DTYPES.get(dtype) or _torch_dtype(rule.compute_dtype(dtype))


def _check_capturable_devices(params: list[Tensor], state_steps: list[Tensor]) -> None:
    # Under torch.compile the compiler does these checks itself.
    if torch.compiler.is_compiling():
        return
    supported = _get_capturable_supported_devices()
    for p, step in zip(params, state_steps):
        if not (p.device.type == step.device.type and p.device.type in supported):
            raise AssertionError(
                f"If capturable=True, params and state_steps must be on supported devices: {supported}."
            )


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
    """The readable for-loop FTML step, one param at a time (the ground truth for the fast paths).

    Each step is :func:`ftmlopt.rule.compact_step` or :func:`ftmlopt.rule.mxnet_step` on torch
    tensors (out of place, so autograd can run through it), whose results are then written into the
    param and its state. float16/bfloat16 tensors are computed in float32 (:func:`ftmlopt.rule.compute_dtype`)
    and rounded once on the way out. The per-step constants are Python floats (float64) from the CPU
    step count; tensors under ``capturable``, ``differentiable`` and ``torch.compile``.

    lr = 0 (:mod:`ftmlopt.rule`): ``w`` stays, ``v`` takes the gradient and ``step`` advances in both
    forms; the MXNet form keeps ``d`` and ``z`` (a tensor lr is masked with ``torch.where``).
    """
    if grad_scale is not None or found_inf is not None:
        raise AssertionError("grad_scale and found_inf are only supported by fused=True")
    if capturable:
        _check_capturable_devices(params, state_steps)
    tensor_math = capturable or differentiable or torch.compiler.is_compiling()
    lr = _lr_for_math(lr, tensor_math)
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
            c = _constants(lr, t, **hyper)  # type: ignore[arg-type]
        else:
            t = _get_value(t)
            c = cache.get(t) or cache.setdefault(t, _constants(lr, t, **hyper))  # type: ignore[arg-type]

        tensors = [param, grads[i], vs[i]] + ([] if compact else [ds[i], zs[i]])
        if torch.is_complex(param):  # every real coordinate is its own FTML problem
            tensors = [torch.view_as_real(x) for x in tensors]
        compute = _compute_dtype(tensors[0].dtype)
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


def _multi_tensor_ftml(
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
    """The same step as :func:`_single_tensor_ftml` with ``torch._foreach_*`` ops per (device, dtype).

    Op for op the arithmetic of :func:`ftmlopt.rule.compact_step` / :func:`ftmlopt.rule.mxnet_step`
    in the same order, so on the CPU both paths round identically (tested bit for bit).
    """
    if not params:
        return
    if grad_scale is not None or found_inf is not None:
        raise AssertionError("grad_scale and found_inf are only supported by fused=True")
    if differentiable:
        raise AssertionError("_foreach ops don't support autograd")
    if isinstance(lr, Tensor) and not capturable:
        raise RuntimeError("lr as a Tensor is not supported for capturable=False and foreach=True")
    if capturable:
        _check_capturable_devices(params, state_steps)
    tensor_math = capturable or torch.compiler.is_compiling()
    masked = not compact and isinstance(lr, Tensor)
    hyper = dict(
        beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, clip_gradient=clip_gradient,
        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize, compact=compact,
    )

    params, grads, ds, vs, zs = _local_shards(params, grads, ds, vs, zs)
    lists: list[list[Tensor]] = [params, grads, vs, state_steps] + ([] if compact else [ds, zs])
    grouped = Optimizer._group_tensors_by_device_and_dtype(lists)  # type: ignore[arg-type]
    for group_lists, _ in grouped.values():
        dev_params, dev_grads, dev_vs, dev_steps = (list(cast(list[Tensor], x)) for x in group_lists[:4])
        dev_ds, dev_zs = (list(cast(list[Tensor], x)) for x in group_lists[4:]) if not compact else ([], [])
        if has_complex:
            _view_as_real(dev_params, dev_grads, dev_vs, *((dev_ds, dev_zs) if not compact else ()))

        # Steps on the CPU would make foreach loop over t.add(1), wrapping 1 each time.
        if not torch.compiler.is_compiling() and dev_steps[0].is_cpu:
            torch._foreach_add_(dev_steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
        else:
            torch._foreach_add_(dev_steps, 1)
        ts: list[Any] = dev_steps if tensor_math else [_get_value(s) for s in dev_steps]
        cache: dict[Any, rule.Constants] = {}
        consts = []
        for t in ts:
            key = id(t) if tensor_math else t
            c = cache.get(key) or cache.setdefault(key, _constants(lr, t, **hyper))  # type: ignore[arg-type]
            consts.append(c)

        stored = [dev_params, dev_vs, dev_ds, dev_zs]
        compute = _compute_dtype(dev_params[0].dtype)
        if compute != dev_params[0].dtype:  # computed in float32, as in the for-loop
            work = [[t.to(compute) for t in lst] for lst in stored]
            dev_grads = [g.to(compute) for g in dev_grads]
        else:
            work = stored
        # at a tensor lr of 0 the MXNet form keeps w, d and z (v takes the gradient): masked below
        old = [[t.clone() for t in lst] if k != 1 else [] for k, lst in enumerate(work)] if masked else None
        _foreach_step(work[0], dev_grads, work[1], work[2], work[3], consts)
        if old is not None:
            frozen = cast(Tensor, lr).eq(0)
            for lst, before in zip(work, old):
                if lst and before:
                    torch._foreach_copy_(lst, [torch.where(frozen, b, a) for a, b in zip(lst, before)])
        if work is not stored:
            for dst, src in zip(stored, work):
                if dst:
                    torch._foreach_copy_(dst, src)


def _foreach_step(
    params: list[Tensor], grads: list[Tensor], vs: list[Tensor], ds: list[Tensor], zs: list[Tensor],
    consts: list[rule.Constants],
) -> None:
    """The rule's step over lists of real tensors of one device and dtype, in place (``ds == zs == []``: compact).

    ``consts[i]`` are tensor ``i``'s constants; the hyper-parameters proper (betas, eps, wd, clip,
    lr) are the same for all of them, only the bias corrections depend on each tensor's step.
    """
    c = consts[0]
    compact = not ds
    # rule.compact_step / rule.mxnet_step: decoupled decay first
    if c.decay is not None:
        torch._foreach_mul_(params, c.decay)
        if not compact:
            torch._foreach_mul_(zs, c.decay)
    # rule.gradient: g' = clip(sign * g + w * wd)
    owned = False  # whether grads is our intermediate (then it may be modified in place)
    if c.sign < 0:
        grads, owned = list(torch._foreach_neg(grads)), True
    if c.wd is not None:
        wd_w = torch._foreach_mul(params, c.wd)
        if owned:
            torch._foreach_add_(grads, wd_w)
        else:
            grads, owned = list(torch._foreach_add(grads, wd_w)), True
        del wd_w
    if c.clip is not None:
        if owned:
            torch._foreach_clamp_min_(grads, -c.clip)
        else:
            grads = list(torch._foreach_clamp_min(grads, -c.clip))
        torch._foreach_clamp_max_(grads, c.clip)
    # rule.second_moment: v = v * beta2 + (g' * g') * (1 - beta2)
    torch._foreach_mul_(vs, c.beta2)
    sq = torch._foreach_mul(grads, grads)
    torch._foreach_mul_(sq, c.one_minus_beta2)
    torch._foreach_add_(vs, sq)
    del sq
    if not isinstance(c.lr, Tensor) and c.lr == 0:
        return  # lr 0 (rule.py): the weights stay; the MXNet form keeps d and z
    # denom = sqrt(v / bias2) + eps
    denom = list(torch._foreach_div(vs, [x.bias2 for x in consts]))
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, c.eps)
    if compact:
        # w = w - (g' * step_size) / denom
        update = torch._foreach_mul(grads, [x.step_size for x in consts])
        torch._foreach_div_(update, denom)
        torch._foreach_sub_(params, update)
        return
    # d_t = denom * d_scale;  z = z * beta1 + g' * (1 - beta1) - (d_t - d * beta1) * w;  w = -z / d_t
    d_t = denom
    torch._foreach_mul_(d_t, [x.d_scale for x in consts])
    torch._foreach_mul_(zs, c.beta1)
    torch._foreach_add_(zs, torch._foreach_mul(grads, c.one_minus_beta1))
    del grads
    torch._foreach_mul_(ds, c.beta1)
    diff = torch._foreach_sub(d_t, ds)
    torch._foreach_mul_(diff, params)
    torch._foreach_sub_(zs, diff)
    del diff
    torch._foreach_copy_(ds, d_t)
    torch._foreach_copy_(params, zs)
    torch._foreach_neg_(params)
    torch._foreach_div_(params, d_t)


def _local_shards(*lists: list[Tensor]) -> list[list[Tensor]]:
    """Replace DTensors (FSDP2 parameters, their gradients and state) by their local shards.

    ``to_local()`` returns views, so in-place updates land in the DTensors. FTML is element-wise,
    so stepping each rank's shard is exact; this also avoids foreach ops that have no DTensor
    sharding rule (``_foreach_copy_``) and hands the fused kernel real tensors, not wrappers.
    """
    if "torch.distributed.tensor" not in sys.modules:  # no DTensor can exist
        return list(lists)
    from torch.distributed.tensor import DTensor

    return [[t.to_local() if isinstance(t, DTensor) else t for t in lst] for lst in lists]


def _fused_ftml(params: list[Tensor], grads: list[Tensor], ds: list[Tensor], vs: list[Tensor],
                zs: list[Tensor], state_steps: list[Tensor], **kwargs: Any) -> None:
    """Forward to :func:`ftmlopt.torch._fused._fused_ftml` (looked up at call time).

    The kernels' MXNet form divides by lr; at lr 0 that form only folds the gradient into ``v`` and
    counts the step (:mod:`ftmlopt.rule`), which the foreach path does instead. A tensor lr on an
    accelerator is read for this (one host sync, MXNet form only).
    """
    from ftmlopt.torch import _fused

    lr = kwargs["lr"]
    if not kwargs["compact"] and float(lr) == 0.0:
        grad_scale, found_inf = kwargs.pop("grad_scale"), kwargs.pop("found_inf")
        if found_inf is not None and bool(found_inf):
            return  # GradScaler skips this step
        if grad_scale is not None:
            grads = list(torch._foreach_div(grads, grad_scale))
        kwargs["lr"] = 0.0
        _multi_tensor_ftml(params, grads, ds, vs, zs, state_steps, grad_scale=None, found_inf=None, **kwargs)
        return
    params, grads, ds, vs, zs = _local_shards(params, grads, ds, vs, zs)
    _fused._fused_ftml(params, grads, ds, vs, zs, state_steps, **kwargs)


def _fused_is_default(params: list[Tensor], differentiable: bool) -> bool:
    """Fused is the default on the CPU when the kernel says it can step these params.

    The CPU kernel changes no process-wide thread setting, runs on ``torch.get_num_threads()``
    threads and compiles in milliseconds (no cache), and its step is one registered op that
    ``torch.compile`` keeps opaque, so it is the default in eager and compiled code alike.
    CUDA keeps torch's choice (foreach) unless ``fused=True``.
    """
    if differentiable or not params or torch.jit.is_scripting():
        return False
    if not all(type(p) in (Tensor, torch.nn.Parameter) and p.device.type == "cpu" for p in params):
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
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 0.0,
    clip_gradient: float | None = None,
    decoupled_weight_decay: bool = False,
    compact: bool = False,
    maximize: bool = False,
) -> None:
    r"""Functional FTML: one step over lists of tensors, in place (see :class:`FTML` for the math).

    ``state_steps`` are 0-dim float tensors holding the number of steps taken so far; each is
    incremented here (MXNet form at lr 0: not incremented). ``compact=False`` (the default of this
    low-level function, whose caller hands it the state lists) is MXNet's three-state form; with
    ``compact=True`` (the default of :class:`FTML`), ``ds`` and ``zs`` are empty lists.

    Implementation choice: ``fused`` / ``foreach`` when given; otherwise fused on the CPU when the
    fused kernel is available, foreach on CUDA, and the for-loop elsewhere (and whenever
    ``differentiable``).

    Example:
        >>> import torch
        >>> from ftmlopt.torch.functional import ftml
        >>> w, g = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.0])
        >>> d, v, z, step = torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.tensor(0.0)
        >>> ftml([w], [g], [d], [v], [z], [step], foreach=False, lr=0.1, beta1=0.6, beta2=0.999, eps=1e-8)
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
        func: Callable[..., None] = _fused_ftml
    elif foreach:
        func = _multi_tensor_ftml
    else:
        func = _single_tensor_ftml
    func(
        params,
        grads,
        ds,
        vs,
        zs,
        state_steps,
        grad_scale=grad_scale,
        found_inf=found_inf,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        clip_gradient=clip_gradient,
        decoupled_weight_decay=decoupled_weight_decay,
        compact=compact,
        maximize=maximize,
        has_complex=has_complex,
        capturable=capturable,
        differentiable=differentiable,
    )
