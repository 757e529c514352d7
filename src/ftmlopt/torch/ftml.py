r"""``FTML``, the ``torch.optim.Optimizer``: defaults, param groups, lazy state, ``step``.

Laid out like ``torch/optim/adam.py``, one job per file:

* this module: the :class:`FTML` class (checks through :mod:`ftmlopt.torch._validation`, state
  created in ``_init_group``, ``step`` calls the functional once per param group);
* :mod:`ftmlopt.torch.functional`: the dispatching functional :func:`~ftmlopt.torch.functional.ftml`
  (re-exported here), which picks the for-loop (:mod:`ftmlopt.torch._single_tensor`, the ground
  truth), foreach (:mod:`ftmlopt.torch._multi_tensor`) or the fused kernels
  (:mod:`ftmlopt.torch._fused`);
* :mod:`ftmlopt.torch._checkpoint`: ``load_state_dict``'s checks and the conversion between forms;
* :mod:`ftmlopt.torch._dtypes`: the rule's dtype policy in torch dtypes.

The rule itself is :mod:`ftmlopt.rule`, written once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, _get_scalar_dtype, _use_grad_for_differentiable

from ftmlopt import rule
from ftmlopt.torch import _checkpoint, _dtypes, _fast_path, _lowbit
from ftmlopt.torch._validation import (
    check_fused_param,
    check_group_at_step,
    check_hyperparameters,
    check_state,
)
from ftmlopt.torch.functional import ftml

# ``ftml`` is re-exported: ``from ftmlopt.torch.ftml import ftml`` is an older address of the functional.
__all__ = ["FTML", "ftml"]


class FTML(Optimizer):
    r"""FTML, Follow the Moving Leader (Zheng & Kwok, ICML 2017), as a ``torch.optim`` optimizer.

    .. math::

        g' &= \mathrm{clamp}(\pm g_t + \lambda w_{t-1}, -c, c) \\
        v_t &= \beta_2 v_{t-1} + (1-\beta_2)\, g'^2 \\
        w_t &= w_{t-1} - \frac{\eta_t (1-\beta_1)}{1-\beta_1^t}\,
               \frac{g'}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}

    A drop-in replacement for ``torch.optim.Adam``: param groups, LR schedulers (at ``lr = 0``
    the weights stay, ``v`` takes the gradient and the step is counted, as in Adam), ``state_dict``,
    closures, hooks, ``GradScaler`` (fused path), ``torch.compile`` and CUDA graphs
    (``capturable``). The state is ``step`` and ``v``: half of Adam's.

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
            Per param group too. ``load_state_dict`` converts a checkpoint of another width. Under
            FSDP2 the blocks are per local shard (``docs/lowbit.md``: the tolerance against one process).
        maximize: maximize the objective (the gradient is negated first).
        foreach: use the ``torch._foreach_*`` implementation (default: on CUDA).
        fused: use the fused kernels of :mod:`ftmlopt.torch._fused` (LLVM via llvmlite on CPU, Triton on CUDA;
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
        lr: float | Tensor = rule.DEFAULT_LR,
        betas: tuple[float, float] = (rule.DEFAULT_BETA1, rule.DEFAULT_BETA2),
        eps: float = rule.DEFAULT_EPS,
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
        check_hyperparameters(defaults)
        defaults["betas"] = (float(betas[0]), float(betas[1]))
        if isinstance(lr, Tensor) and lr.dim() != 0:
            defaults["lr"] = lr.reshape(())
        super().__init__(params, defaults)
        #: per group, what its last step checked, for the next step's fast path (:mod:`ftmlopt.torch._fast_path`)
        self._fast_groups: list[_fast_path.FastGroup | None] | None = None
        if fused:
            # GradScaler hands this optimizer the scale and the inf flag instead of unscaling.
            self._step_supports_amp_scaling = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its own hyper-parameters are validated first, as the defaults are."""
        if isinstance(param_group, dict):
            check_hyperparameters(param_group)
            merged = {**self.defaults, **param_group}
            check_hyperparameters({k: merged[k] for k in ("fused", "foreach", "differentiable", "lr", "capturable",
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
        self._fast_groups = None  # (not pickled: built by the next step)
        for group in self.param_groups:
            for key, value in _checkpoint.FLAG_DEFAULTS.items():
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
        * compact -> MXNet form: ``d = (1 - b1^t)/lr * (sqrt(v/(1 - b2^t)) + eps)`` with this
          optimizer's lr, betas and eps as they were before loading, and ``z = -d w`` with the
          current weights. The next MXNet step depends on the old ``d`` and ``z`` only through
          ``z + d w`` (0 here), so it continues the compact trajectory exactly (in exact arithmetic)
          whatever lr was used for ``d``.

        Float32 master copies and states of ``multi_precision`` float16/bfloat16 params stay float32
        (``torch.optim.Optimizer.load_state_dict`` would cast them to the param's dtype).
        """
        plan = _checkpoint.prepare_load(self, state_dict)
        super().load_state_dict(plan.state_dict)
        _checkpoint.finish_load(self, plan)
        self._fast_groups = None  # (the next step would see the new state anyway; this lets the old one go now)

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
        multi_precision, differentiable = group["multi_precision"], group["differentiable"]
        states = self.state
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError("FTML does not support sparse gradients")
            if p.is_complex():
                has_complex = True
            use_master = multi_precision and _dtypes.is_half(p.dtype)
            state = states[p]
            if not state:
                if group["fused"]:
                    check_fused_param(p)
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
                    dtype = _dtypes.state_dtype(p, group)
                    for key in ("v",) if compact else ("d", "v", "z"):
                        state[key] = torch.zeros_like(like, dtype=dtype, memory_format=torch.preserve_format)
            if differentiable and state["step"].requires_grad:
                raise RuntimeError("`requires_grad` is not supported for `step` in differentiable mode")

            low = quantized is not None and "codes" in state
            to_params, to_grads = (quantized[0], quantized[1]) if low and quantized is not None else (params, grads)
            if use_master:
                master = state["master"]
                to_params.append(master)
                to_grads.append(grad.to(torch.float32))
                masters.append((p, master))
            else:
                to_params.append(p)
                to_grads.append(grad)
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

        A fused CPU group whose params, gradients' layout and state are those its last step checked
        takes a shorter way to the same kernel call (:mod:`ftmlopt.torch._fast_path`): it compares
        them with that step's instead of checking and gathering them again. Its numbers are checked
        in either case (again only when they changed).

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

        compiling = torch.compiler.is_compiling()
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        # groups whose tensors are the ones their last step checked: (fast path, gradients, their addresses)
        fast: list[tuple[_fast_path.FastGroup, list[Tensor], tuple[int, ...]] | None] = [None] * len(self.param_groups)
        recorded = getattr(self, "_fast_groups", None) if not compiling else None
        if recorded and not _fast_path.eager():
            recorded = None
        if not compiling:
            for i, group in enumerate(self.param_groups):
                last = recorded[i] if recorded and i < len(recorded) else None
                if last is None or not last.numbers_checked(group):  # (numbers equal to checked ones pass again)
                    check_group_at_step(group, i)
                if last is not None:
                    found = last.gradients(group, self.state, grad_scale)
                    if found is not None:  # everything below was checked on this group's last step, and is unchanged
                        fast[i] = (last, *found)
                        continue
                # the common case (the state has the param's dtype, default flags) costs one comparison
                low_bits = group["state_bits"] < 32
                plain = (group.get("state_dtype") is None and not group["multi_precision"] and group["compact"]
                         and not low_bits)
                states = self.state
                for p in group["params"]:
                    grad = p.grad
                    if grad is None:
                        continue
                    if grad.is_sparse:
                        raise RuntimeError("FTML does not support sparse gradients")
                    if not (p.is_floating_point() or p.is_complex()):
                        raise TypeError(f"FTML needs floating-point or complex parameters, got one of dtype {p.dtype}")
                    if low_bits:
                        _lowbit.check_param(p, group)
                    state = states.get(p)
                    if state and not (plain and "v" in state and state["v"].dtype == p.dtype):
                        check_state(p, state, group)
        steps_taken: list[_fast_path.FastGroup | None] = []
        for i, group in enumerate(self.param_groups):
            ready = fast[i]
            if ready is not None:
                # the fast path (ftmlopt.torch._fast_path): the cached kernel call the path below would reach
                ready[0].step(ready[1], ready[2], group, grad_scale, found_inf)
                steps_taken.append(ready[0])
                continue
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
            if params or not quantized[0]:  # (a group of low-bit params only has nothing for this call)
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
                    grad_scale=grad_scale,
                    found_inf=found_inf,
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
            # Called for every group, even with empty lists: behind a guard such as `if quantized[0]:`,
            # a first step under torch.compile left the quantized params unstepped (step 0, codes 0)
            # while it stepped the float ones; this call (compiler-disabled) breaks the graph instead.
            _lowbit.step_quantized(*quantized, group, grad_scale=grad_scale, found_inf=found_inf,
                                   fused=group["fused"], foreach=group["foreach"])
            for p, master in masters:
                p.detach().copy_(master)
            if not compiling:
                steps_taken.append(_fast_path.record(
                    group, self.state, [params, grads, ds, vs, zs], state_steps, has_complex=has_complex,
                    other_paths=bool(masters or quantized[0]), grad_scale=grad_scale))
        if not compiling:
            self._fast_groups = steps_taken
        return loss


def _graph_capture_health_check(opt: Optimizer) -> None:
    # Renamed in torch 2.13 (the old name remains as a deprecated alias there).
    check = getattr(opt, "_accelerator_graph_capture_health_check", None)
    if check is None:  # pragma: no cover - torch < 2.13
        check = opt._cuda_graph_capture_health_check
    check()
