r"""``FTML`` as a ``torch.optim.Optimizer``, laid out like ``torch/optim/adam.py``.

The file has the usual four parts: the :class:`FTML` class (validation, defaults, lazy state in
``_init_group``, ``step``), the readable for-loop :func:`_single_tensor_ftml` (the ground truth, the
only path that supports ``differentiable=True``), the horizontally fused :func:`_multi_tensor_ftml`
(``torch._foreach_*`` ops per device and dtype), and the dispatching functional :func:`ftml`, which
also reaches the fused kernels in :mod:`ftmlopt.torch._fused`.

The rule, per element, with torch's conventions (``maximize`` first, then L2 weight decay, then the
element-wise clip, MXNet 1.9's order):

.. math::

    g' &= \mathrm{clamp}\big(\pm g + \lambda w_{t-1},\ -c,\ c\big) \\
    v_t &= \beta_2 v_{t-1} + (1-\beta_2)\, g'^2 \\
    d_t &= \frac{1-\beta_1^t}{\eta_t}\Big(\sqrt{v_t/(1-\beta_2^t)} + \epsilon\Big) \\
    z_t &= \beta_1 z_{t-1} + (1-\beta_1)\, g' - (d_t - \beta_1 d_{t-1})\, w_{t-1} \\
    w_t &= -z_t / d_t

With ``decoupled_weight_decay=True`` the decay is not added to the gradient; instead ``w`` and ``z``
are both multiplied by ``1 - lr*wd`` before the step, which keeps ``w = -z/d`` true. With
``compact=True`` only ``v`` is kept and the paper's Theorem 1 form is used:
:math:`w_t = w_{t-1} - \eta_t\frac{1-\beta_1}{1-\beta_1^t}\, g'/(\sqrt{v_t/(1-\beta_2^t)}+\epsilon)`.
"""

from __future__ import annotations

import math
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

from ftmlopt.core.validation import check_beta, check_bool, check_epsilon, check_finite, check_lr, check_nonnegative

__all__ = ["FTML", "ftml"]

#: dtypes that ``multi_precision=True`` gives a float32 master copy and float32 state.
_LOW_PRECISION = (torch.float16, torch.bfloat16)

#: Group flags, with the values given to checkpoints written before a flag existed.
_FLAG_DEFAULTS: dict[str, Any] = {
    "clip_gradient": None,
    "decoupled_weight_decay": False,
    "compact": False,
    "multi_precision": False,
    "maximize": False,
    "foreach": None,
    "fused": None,
    "capturable": False,
    "differentiable": False,
}


# ----------------------------------------------------------------------------- validation
def _check_lr(lr: Any) -> None:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got {lr.numel()} elements")
        if not lr.is_floating_point():
            raise TypeError(f"Tensor lr must be floating point, got dtype {lr.dtype}")
        check_lr(float(lr.detach().reshape(())), "lr")
    else:
        check_lr(lr, "lr")


def _check_betas(betas: Any) -> None:
    if isinstance(betas, (str, bytes)) or not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2) of floats, got {betas!r}")
    for i, beta in enumerate(betas):
        check_beta(beta, f"beta parameter at index {i}")


def _check_clip(clip: Any) -> None:
    if clip is None:
        return
    value = check_finite(clip, "clip_gradient")
    if value <= 0.0:
        raise ValueError(f"Invalid clip_gradient: must be None (off) or > 0, got {clip!r}")


def _check_hyperparameters(group: Mapping[str, Any]) -> None:
    """Validate the hyper-parameters present in ``group`` (a defaults dict or a param group)."""
    if "lr" in group:
        _check_lr(group["lr"])
    if "betas" in group:
        _check_betas(group["betas"])
    if "eps" in group:
        check_epsilon(group["eps"], "epsilon value")
    if "weight_decay" in group:
        check_nonnegative(group["weight_decay"], "weight_decay value")
    if "clip_gradient" in group:
        _check_clip(group["clip_gradient"])
    for flag in ("decoupled_weight_decay", "compact", "multi_precision", "maximize", "capturable", "differentiable"):
        if flag in group:
            check_bool(group[flag], flag)
    for flag in ("foreach", "fused"):
        if group.get(flag) is not None:
            check_bool(group[flag], flag)
    fused, foreach = group.get("fused"), group.get("foreach")
    if fused and group.get("differentiable"):
        raise RuntimeError("`fused` does not support `differentiable`")
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if foreach and isinstance(group.get("lr"), Tensor) and not group.get("capturable"):
        raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")


# ----------------------------------------------------------------------------- the class
class FTML(Optimizer):
    r"""FTML, Follow the Moving Leader (Zheng & Kwok, ICML 2017), as a ``torch.optim`` optimizer.

    .. math::

        g' &= \mathrm{clamp}(\pm g_t + \lambda w_{t-1}, -c, c) \\
        v_t &= \beta_2 v_{t-1} + (1-\beta_2)\, g'^2 \\
        d_t &= \tfrac{1-\beta_1^t}{\eta}\big(\sqrt{v_t/(1-\beta_2^t)} + \epsilon\big) \\
        z_t &= \beta_1 z_{t-1} + (1-\beta_1)\, g' - (d_t - \beta_1 d_{t-1})\, w_{t-1} \\
        w_t &= -z_t / d_t

    A drop-in replacement for ``torch.optim.Adam``: param groups, LR schedulers, ``state_dict``,
    closures, hooks, ``GradScaler`` (fused path), ``torch.compile`` and CUDA graphs (``capturable``).

    Args:
        params: an iterable of tensors, of ``(name, tensor)`` pairs, or of param-group dicts.
        lr: learning rate :math:`\eta > 0` (a float, or a 1-element tensor). The default 0.0025 is
            the paper's (and MXNet 2.0's); MXNet 1.9's ``FTML`` defaults to 0.01. FTML divides by lr;
            a group that a scheduler has brought to lr = 0 is skipped (the lr -> 0 limit leaves the
            weights where they are), a negative lr at step time is an error.
        betas: :math:`(\beta_1, \beta_2)`, each in ``[0, 1)``; the paper's (0.6, 0.999).
        eps: :math:`\epsilon \ge 0`, added *outside* the square root.
        weight_decay: :math:`\lambda \ge 0`. By default MXNet 1.9's coupled L2 decay, added to the
            gradient before clipping.
        clip_gradient: ``None`` (off) or :math:`c > 0`: clamp :math:`g'` element-wise to ``[-c, c]``
            after the weight decay is added (MXNet's rule).
        decoupled_weight_decay: apply the decay to the weight, AdamW style:
            :math:`w \leftarrow (1-\eta\lambda) w` and :math:`z \leftarrow (1-\eta\lambda) z` before
            the step (scaling ``z`` too keeps :math:`w = -z/d`).
        compact: keep only ``v`` (a third of the state) and step with the paper's Theorem 1 form
            :math:`w_t = w_{t-1} - \eta\frac{1-\beta_1}{1-\beta_1^t} g'/(\sqrt{v_t/(1-\beta_2^t)}+\epsilon)`.
            Identical in exact arithmetic while only the optimizer changes the weights; edits made to
            the weights outside the optimizer persist, where the three-state form pulls the weight
            back towards the iterate that ``z`` remembers.
        multi_precision: give float16/bfloat16 parameters a float32 master copy (state key
            ``"master"``) and float32 state; the parameter is rewritten from the master each step.
        maximize: maximize the objective (the gradient is negated first).
        foreach: use the ``torch._foreach_*`` implementation (default: on CUDA).
        fused: use the fused kernels of :mod:`ftmlopt.torch._fused` (Numba on CPU, Triton on CUDA;
            default: on CPU when the kernel is available). Supports ``GradScaler``'s fused protocol.
        capturable: keep ``step`` on the device and compute the bias corrections as tensors, so
            the step can be captured in a CUDA graph.
        differentiable: let autograd run through the step (for-loop implementation only).

    State per parameter: ``step`` (a 0-dim float32 tensor, on the CPU unless capturable or fused),
    ``d``, ``v``, ``z`` (``compact``: ``step`` and ``v``), plus ``master`` under ``multi_precision``.

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
        compact: bool = False,
        multi_precision: bool = False,
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
            _check_hyperparameters({k: merged[k] for k in ("fused", "foreach", "differentiable", "lr", "capturable")})
        super().add_param_group(param_group)

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
        """Load a ``state_dict()``; float32 master copies and states of low-precision params stay float32.

        ``torch.optim.Optimizer.load_state_dict`` casts every floating state tensor to its parameter's
        dtype, which would round the float32 state of ``multi_precision`` float16/bfloat16 params. Their
        tensors are therefore taken from ``state_dict`` as they are (moved to the param's device,
        float32) after the base class has loaded everything else.
        """
        _check_state_dict(self, state_dict)
        saved_groups = state_dict.get("param_groups", [])
        saved_state = state_dict.get("state", {})
        keep: list[tuple[Tensor, dict[str, Tensor]]] = []
        for group, saved_group in zip(self.param_groups, saved_groups):
            # The loaded group's flags replace the live ones, so the checkpoint's multi_precision decides.
            multi_precision = saved_group.get("multi_precision", False)
            for p, pid in zip(group["params"], saved_group.get("params", [])):
                wants_master = multi_precision and p.dtype in _LOW_PRECISION
                entry = saved_state.get(pid)
                if wants_master and entry:
                    keep.append((p, {k: v for k, v in entry.items() if k != "step" and torch.is_tensor(v)}))
        super().load_state_dict(state_dict)
        for p, tensors in keep:
            state = self.state[p]
            for key, value in tensors.items():
                state[key] = value.to(device=p.device, dtype=torch.float32, copy=True)
            if "master" not in state:  # a checkpoint written without multi_precision
                state["master"] = p.detach().to(torch.float32, copy=True)
        for group in self.param_groups:  # masters are only kept where they are used
            if not group["multi_precision"]:
                for p in group["params"]:
                    self.state.get(p, {}).pop("master", None)

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
    ) -> bool:
        """Gather the tensors of the params with a gradient, creating their state on first sight.

        Under ``multi_precision`` a float16/bfloat16 param contributes its float32 master and a
        float32 copy of its gradient, and ``(param, master)`` is appended to ``masters`` so that
        ``step`` can write the result back. Returns whether any param is complex.
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
                keys = ("v",) if compact else ("d", "v", "z")
                for key in keys:
                    state[key] = torch.zeros_like(like, memory_format=torch.preserve_format)
            elif not compact and "d" not in state:
                raise RuntimeError(
                    "this FTML state was created with compact=True (it has no 'd' and 'z'); "
                    "keep compact=True for this param group or start from a fresh optimizer"
                )
            if group["differentiable"] and state["step"].requires_grad:
                raise RuntimeError("`requires_grad` is not supported for `step` in differentiable mode")

            if use_master:
                master = state["master"]
                params.append(master)
                grads.append(p.grad.to(torch.float32))
                masters.append((p, master))
            else:
                params.append(p)
                grads.append(p.grad)
            if not compact:
                ds.append(state["d"])
                zs.append(state["z"])
            vs.append(state["v"])
            state_steps.append(state["step"])
        return has_complex

    @_use_grad_for_differentiable
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimization step.

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

        # Checked for every group before any is stepped, so that an error leaves everything as it was.
        active = [_lr_is_positive(group, i) for i, group in enumerate(self.param_groups)]
        if not torch.compiler.is_compiling():
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    if p.grad.is_sparse:
                        raise RuntimeError("FTML does not support sparse gradients")
                    if not (p.is_floating_point() or p.is_complex()):
                        raise TypeError(f"FTML needs floating-point or complex parameters, got one of dtype {p.dtype}")
        for group, is_active in zip(self.param_groups, active):
            if not is_active:
                # Nothing moves, but missing state is created (zeros and step 0, the same as no state):
                # torch.distributed.checkpoint's get_state_dict relies on it for a fresh optimizer.
                self._init_group(group, [], [], [], [], [], [], [])
                continue
            params: list[Tensor] = []
            grads: list[Tensor] = []
            ds: list[Tensor] = []
            vs: list[Tensor] = []
            zs: list[Tensor] = []
            state_steps: list[Tensor] = []
            masters: list[tuple[Tensor, Tensor]] = []
            has_complex = self._init_group(group, params, grads, ds, vs, zs, state_steps, masters)
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
            for p, master in masters:
                p.detach().copy_(master)
        return loss


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
                             f"this optimizer's has {len(live['params'])}")  # fmt: skip
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
            expected = {"step", "v"} | (set() if compact else {"d", "z"})
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
            for key in set(entry) - {"step"}:
                t = entry[key]
                if not isinstance(t, Tensor) or not (t.is_floating_point() or t.is_complex()) or t.shape != p.shape:
                    desc = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                    raise ValueError(f"state {key!r} of param {pid} (group {i}) must be a floating tensor of shape "
                                     f"{tuple(p.shape)}, got {desc}")


def _lr_is_positive(group: dict[str, Any], index: int) -> bool:
    """Whether the group steps: ``lr > 0`` steps, ``lr == 0`` is skipped, ``lr < 0`` is an error.

    FTML divides by lr (``d_t = (1-beta1^t)/lr * ...``). As lr -> 0 the step leaves the weight where it
    is, so a group at lr = 0 (the first step of a warmup schedule, the end of a cosine one) is left
    untouched, state included. A tensor lr on an accelerator is not read back (no host sync).
    """
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.device.type != "cpu" or torch.compiler.is_compiling() or lr.requires_grad:
            return True
        lr = lr.item()
    if not lr >= 0.0:  # also catches NaN
        raise ValueError(f"Invalid learning rate: lr must be >= 0 at step time, got {lr!r} in param group {index}")
    return lr > 0.0


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
def _step_scalars(
    step_t: Tensor, *, lr: float | Tensor, beta1: float, beta2: float, tensor_math: bool
) -> tuple[float | Tensor, float | Tensor, float | Tensor]:
    r"""``(d_scale, bias2, neg_step_size)`` for one param at the (already incremented) ``step_t``.

    ``d_scale = (1-\beta_1^t)/\eta``, ``bias2 = 1-\beta_2^t`` and
    ``neg_step_size = -\eta(1-\beta_1)/(1-\beta_1^t)`` (compact form). Python floats in float64
    from ``step_t.item()``; tensors when ``tensor_math`` (capturable, differentiable) or compiling,
    so that nothing syncs with the host.
    """
    step = step_t if tensor_math else _get_value(step_t)
    if not tensor_math and isinstance(lr, Tensor) and lr.device.type == "cpu":
        lr = _get_value(lr)  # a CPU tensor lr is read for free: keep the float64 scalar math
    bias1 = 1 - beta1**step
    bias2 = 1 - beta2**step
    return bias1 / lr, bias2, -(lr * (1 - beta1)) / bias1


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

    float16/bfloat16 tensors are computed in float32 and rounded once on the way out (float16's
    epsilon would otherwise underflow to 0 and turn zero-gradient elements into 0/0 = NaN).
    """
    if grad_scale is not None or found_inf is not None:
        raise AssertionError("grad_scale and found_inf are only supported by fused=True")
    if capturable:
        _check_capturable_devices(params, state_steps)
    hyper = dict(
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, clip_gradient=clip_gradient,
        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize, differentiable=differentiable,
    )  # fmt: skip
    for i, param in enumerate(params):
        step_t = state_steps[i]
        step_t += 1
        scalars = _step_scalars(step_t, lr=lr, beta1=beta1, beta2=beta2, tensor_math=capturable or differentiable)
        grad, v = grads[i], vs[i]
        d, z = (None, None) if compact else (ds[i], zs[i])
        if torch.is_complex(param):  # every real coordinate is its own FTML problem
            param, grad, v = torch.view_as_real(param), torch.view_as_real(grad), torch.view_as_real(v)
            if d is not None and z is not None:
                d, z = torch.view_as_real(d), torch.view_as_real(z)
        if param.dtype in _LOW_PRECISION:
            w32, d32, v32, z32 = (None if t is None else t.float() for t in (param, d, v, z))
            _ftml_tensor(w32, grad.float(), d32, v32, z32, scalars, **hyper)
            for dst, src in ((param, w32), (d, d32), (v, v32), (z, z32)):
                if dst is not None:
                    dst.copy_(src)
        else:
            _ftml_tensor(param, grad, d, v, z, scalars, **hyper)


def _ftml_tensor(
    param: Tensor,
    grad: Tensor,
    d: Tensor | None,
    v: Tensor,
    z: Tensor | None,
    scalars: tuple[float | Tensor, float | Tensor, float | Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    clip_gradient: float | None,
    decoupled_weight_decay: bool,
    maximize: bool,
    differentiable: bool,
) -> None:
    """One FTML step of one real tensor, in place (``d`` and ``z`` are None in the compact form).

    Intermediates are computed out of place where an in-place op would overwrite a value that
    autograd saved, so the same code serves ``differentiable=True``.
    """
    d_scale, bias2, neg_step_size = scalars
    if maximize:
        grad = -grad
    if weight_decay != 0:
        if decoupled_weight_decay:
            decay = 1 - lr * weight_decay
            param.mul_(decay)
            if z is not None:
                z.mul_(decay)  # keeps w = -z/d
        else:
            grad = grad.add(param, alpha=weight_decay)
    if clip_gradient is not None:
        grad = grad.clamp(-clip_gradient, clip_gradient)

    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = torch.sqrt(v / bias2) + eps
    if d is None or z is None:  # compact: w <- w - lr (1-beta1)/(1-beta1^t) g' / denom
        if isinstance(neg_step_size, Tensor):
            param.addcdiv_(grad, denom / neg_step_size)
        else:
            param.addcdiv_(grad, denom, value=neg_step_size)
        return

    d_t = denom * d_scale
    w_prev = param.clone() if differentiable else param  # autograd saves it; param is rewritten below
    # z <- beta1 z + (1 - beta1) g' - (d_t - beta1 d) w, written as + (beta1 d - d_t) w
    z.mul_(beta1).add_(grad, alpha=1 - beta1).addcmul_(d.mul(beta1).sub_(d_t), w_prev)
    d.copy_(d_t)
    param.copy_(z / d_t).neg_()


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

    Op for op the arithmetic of the for-loop, so both round alike. Peak extra memory: one
    param-sized list for ``d_t`` (plus one for the gradient under maximize, weight decay or clipping,
    and float32 copies of float16/bfloat16 groups).
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
    hyper = dict(
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, clip_gradient=clip_gradient,
        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize,
    )  # fmt: skip

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
        scalars = [_step_scalars(s, lr=lr, beta1=beta1, beta2=beta2, tensor_math=capturable) for s in dev_steps]
        d_scales, bias2s, neg_step_sizes = (list(x) for x in zip(*scalars))

        if dev_params[0].dtype in _LOW_PRECISION:  # computed in float32, as in the for-loop
            stored = [dev_params, dev_ds, dev_vs, dev_zs]
            up = [[t.float() for t in lst] for lst in stored]
            grads32 = [g.float() for g in dev_grads]
            _foreach_ftml(up[0], grads32, up[1], up[2], up[3], d_scales, bias2s, neg_step_sizes, **hyper)
            for dst, src in zip(stored, up):
                if dst:
                    torch._foreach_copy_(dst, src)
        else:
            _foreach_ftml(dev_params, dev_grads, dev_ds, dev_vs, dev_zs, d_scales, bias2s, neg_step_sizes, **hyper)


def _foreach_ftml(
    params: list[Tensor],
    grads: list[Tensor],
    ds: list[Tensor],
    vs: list[Tensor],
    zs: list[Tensor],
    d_scales: list[Any],
    bias2s: list[Any],
    neg_step_sizes: list[Any],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    clip_gradient: float | None,
    decoupled_weight_decay: bool,
    maximize: bool,
) -> None:
    """:func:`_ftml_tensor` over lists of real tensors of one device and dtype (``ds == zs == []``: compact)."""
    compact = not ds
    owned = False  # whether grads is our intermediate (then it may be modified in place)
    if maximize:
        grads, owned = list(torch._foreach_neg(grads)), True
    if weight_decay != 0:
        if decoupled_weight_decay:
            decay = 1 - lr * weight_decay
            torch._foreach_mul_(params, decay)
            if not compact:
                torch._foreach_mul_(zs, decay)  # keeps w = -z/d
        elif owned:
            torch._foreach_add_(grads, params, alpha=weight_decay)
        else:
            grads, owned = list(torch._foreach_add(grads, params, alpha=weight_decay)), True
    if clip_gradient is not None:
        if owned:
            torch._foreach_clamp_min_(grads, -clip_gradient)
        else:
            grads = list(torch._foreach_clamp_min(grads, -clip_gradient))
        torch._foreach_clamp_max_(grads, clip_gradient)

    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
    denom = list(torch._foreach_div(vs, bias2s))
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    if compact:
        if isinstance(neg_step_sizes[0], Tensor):
            torch._foreach_div_(denom, neg_step_sizes)
            torch._foreach_addcdiv_(params, grads, denom)
        else:
            torch._foreach_addcdiv_(params, grads, denom, neg_step_sizes)
        return

    d_t = denom
    torch._foreach_mul_(d_t, d_scales)
    # z <- beta1 z + (1 - beta1) g' + (beta1 d - d_t) w; the old d is not needed afterwards.
    torch._foreach_mul_(zs, beta1)
    torch._foreach_add_(zs, grads, alpha=1 - beta1)
    del grads
    torch._foreach_mul_(ds, beta1)
    torch._foreach_sub_(ds, d_t)
    torch._foreach_addcmul_(zs, ds, params)
    torch._foreach_copy_(ds, d_t)
    # w <- -z / d_t
    torch._foreach_copy_(params, zs)
    torch._foreach_div_(params, d_t)
    torch._foreach_neg_(params)


def _local_shards(*lists: list[Tensor]) -> list[list[Tensor]]:
    """Replace DTensors (FSDP2 parameters, their gradients and state) by their local shards.

    ``to_local()`` returns views, so in-place updates land in the DTensors. FTML is element-wise,
    so stepping each rank's shard is exact; this also avoids foreach ops that have no DTensor
    sharding rule (``_foreach_copy_``) and hands the fused kernel real tensors, not wrappers.
    """
    import sys

    if "torch.distributed.tensor" not in sys.modules:  # no DTensor can exist
        return list(lists)
    from torch.distributed.tensor import DTensor

    return [[t.to_local() if isinstance(t, DTensor) else t for t in lst] for lst in lists]


def _fused_ftml(params: list[Tensor], grads: list[Tensor], ds: list[Tensor], vs: list[Tensor],
                zs: list[Tensor], state_steps: list[Tensor], **kwargs: Any) -> None:  # fmt: skip
    """Forward to :func:`ftmlopt.torch._fused._fused_ftml` (looked up at call time)."""
    from ftmlopt.torch import _fused

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
    incremented here. With ``compact=True``, ``ds`` and ``zs`` are empty lists.

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
    if clip_gradient is not None and not (math.isfinite(clip_gradient) and clip_gradient > 0):
        raise ValueError(f"Invalid clip_gradient: must be None (off) or > 0, got {clip_gradient!r}")

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
