r"""The fused FTML step behind ``ftmlopt.torch.FTML(fused=True)``: one registered op per step.

:func:`_fused_ftml` checks its arguments and makes one call to the custom operator
``torch.ops.ftmlopt.fused_ftml_`` (:func:`torch.library.custom_op`, declared mutations), so
``torch.compile`` (``fullgraph=True`` included) and CUDA graphs see a single opaque op; the op
groups the tensors by (device, dtype) and makes one kernel call per group:

* CPU: :mod:`ftmlopt.kernels.cpu`, handed the tensors' own addresses (zero-copy, also for
  float16/bfloat16 params and state), on ``torch.get_num_threads()`` threads read at each step.
  No process-wide thread setting is changed.
* CUDA: :func:`ftmlopt.kernels.triton_cuda.multi_tensor_step`, one Triton launch.

The rule is the torch one (per-element lines in :mod:`ftmlopt.kernels.cpu`): ``maximize`` negates
the gradient, ``grad_scale`` divides it (and the unscaled gradient is written back, as torch's
fused Adam does), L2 weight decay is added to it unless ``decoupled_weight_decay`` (then ``w`` and
``z`` are scaled by ``1 - lr*wd`` first), it is clamped to ``[-clip_gradient, clip_gradient]``,
then the three-state or compact FTML update runs with the constants of
:func:`ftmlopt.rule.constants` for each tensor's own step. Each ``state_steps`` tensor is
incremented here. Where ``found_inf`` is nonzero nothing changes: params, state and steps keep
their values.

Non-contiguous tensors and a gradient whose dtype differs from its parameter's are stepped on
contiguous copies that are written back; complex tensors are processed as their real views.
"""

from __future__ import annotations

from operator import attrgetter
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from ftmlopt import rule

if TYPE_CHECKING:
    from collections.abc import Iterable

    from torch import Tensor

__all__ = ["fused_supported"]


def _cpu_available() -> bool:
    from ftmlopt.kernels import cpu

    return cpu.AVAILABLE


def _triton_available() -> bool:
    from ftmlopt.kernels import triton_cuda

    return triton_cuda.AVAILABLE


def fused_supported(params: Iterable[Tensor]) -> bool:
    """Whether :func:`_fused_ftml` can step these tensors (the default-dispatch test).

    True when every tensor is floating point (or complex) and lives on the CPU with the CPU
    kernels available (llvmlite: ``pip install 'ftmlopt[cpu]'``), or on a CUDA device with Triton.

    Example:
        >>> import torch
        >>> from ftmlopt.torch._fused import fused_supported
        >>> isinstance(fused_supported([torch.zeros(3)]), bool)
        True
        >>> fused_supported([torch.zeros(3, dtype=torch.int64)])
        False
    """
    import torch

    params = params if isinstance(params, list) else list(params)
    if (not torch.compiler.is_compiling() and all(map(_IS_CPU, params))
            and all(map(torch.Tensor.is_floating_point, params))):
        return _cpu_available()  # the usual eager case, checked without a Python loop per tensor
    kinds = set()
    for p in params:
        if not (p.is_floating_point() or p.is_complex()):
            return False
        kinds.add(p.device.type)
    checks = {"cpu": _cpu_available, "cuda": _triton_available}
    return all(kind in checks and checks[kind]() for kind in kinds)


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
    r"""One fused FTML step over lists of tensors (in place), torch semantics.

    .. math::

        g &\leftarrow \pm g / s,\quad g \leftarrow \mathrm{clamp}(g + \lambda w, -c, c)\\
        v &\leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
        d_t = \tfrac{1-\beta_1^t}{\eta}\big(\sqrt{v/(1-\beta_2^t)} + \epsilon\big)\\
        z &\leftarrow \beta_1 z + (1-\beta_1) g - (d_t - \beta_1 d) w,\quad d \leftarrow d_t,\quad
        w \leftarrow -z/d_t

    (compact form: :math:`w \leftarrow w - \eta\frac{1-\beta_1}{1-\beta_1^t}\,
    g/(\sqrt{v/(1-\beta_2^t)}+\epsilon)`, with ``ds`` and ``zs`` empty lists).

    Raises:
        RuntimeError: ``differentiable=True``, or a device without a fused kernel.
        ValueError: list lengths that do not match, or a ``clip_gradient`` that is not None or > 0
            (:func:`ftmlopt.rule.check_clip`).

    Example:
        >>> import torch
        >>> from ftmlopt.torch._fused import _fused_ftml, fused_supported
        >>> w = torch.ones(3); g = torch.full((3,), 0.5); step = torch.zeros(())
        >>> d, v, z = torch.zeros(3), torch.zeros(3), torch.zeros(3)
        >>> fused_supported([w])  # llvmlite is installed ('ftmlopt[cpu]')
        True
        >>> _fused_ftml([w], [g], [d], [v], [z], [step], grad_scale=None, found_inf=None, lr=0.1,
        ...             beta1=0.6, beta2=0.999, eps=1e-8, weight_decay=0.0, clip_gradient=None,
        ...             decoupled_weight_decay=False, compact=False, maximize=False, has_complex=False,
        ...             capturable=False, differentiable=False)
        >>> [round(x, 4) for x in w.tolist()], float(step)
        ([0.9, 0.9, 0.9], 1.0)
    """
    import torch

    if differentiable:
        raise RuntimeError("FTML with fused=True does not support differentiable=True")
    n = len(params)
    expected = {"grads": grads, "vs": vs, "state_steps": state_steps}
    if not compact:
        expected.update(ds=ds, zs=zs)
    elif ds or zs:
        raise ValueError(f"compact=True takes empty ds and zs lists, got {len(ds)} and {len(zs)} tensors")
    for name, lst in expected.items():
        if len(lst) != n:
            raise ValueError(f"{name} has {len(lst)} tensors, params has {n}")
    if clip_gradient is not None:
        rule.check_clip(clip_gradient, "clip_gradient value")  # None or > 0, as on every other path
    if n == 0:
        return
    if torch.compiler.is_compiling() or not all(map(_IS_CPU, params)):  # (dynamo cannot trace attrgetter)
        for p in params:
            if p.device.type not in ("cpu", "cuda"):
                raise RuntimeError(f"FTML(fused=True) has no kernel for device {p.device.type!r} (CPU and CUDA only)")
    lists = [params, grads, vs] if compact else [params, grads, ds, vs, zs]
    if has_complex:
        lists = [[torch.view_as_real(t) if t.is_complex() else t for t in lst] for lst in lists]
    if compact:
        p_, g_, v_ = lists
        d_: list[Tensor] = []
        z_: list[Tensor] = []
    else:
        p_, g_, d_, v_, z_ = lists
    if torch.compiler.is_compiling() or _python_dispatch_active():
        # Traced (torch.compile, export, a dispatch mode): one opaque registered op with declared mutations.
        lr_tensor = lr if isinstance(lr, torch.Tensor) else None
        _OP(
            p_, g_, d_, v_, z_, state_steps, grad_scale, found_inf, lr_tensor,
            0.0 if lr_tensor is not None else float(lr), beta1, beta2, eps, weight_decay, clip_gradient,
            decoupled_weight_decay, compact, maximize,
        )
        return
    # Eager: the op's body itself. Going through the dispatcher costs a Python-level version bump and
    # argument flattening per tensor (about 4 us each: 8 ms for 2,000 tensors); one call does it here.
    _step(p_, g_, d_, v_, z_, state_steps, grad_scale, found_inf, lr, beta1, beta2, eps, weight_decay,
          clip_gradient, decoupled_weight_decay, compact, maximize)
    mutated = [*p_, *d_, *v_, *z_, *state_steps, *(g_ if grad_scale is not None else ())]
    torch.autograd.graph.increment_version(mutated)


def _python_dispatch_active() -> bool:
    """Whether a Python dispatch mode (fake tensors, functionalization, tracing) is active."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is not None


# ============================================================================ the registered op
def _register() -> Any:
    """Register ``torch.ops.ftmlopt.fused_ftml_`` (at import: registration cannot run under a tracer)."""
    import torch

    # list[Tensor] arguments need real annotations at registration time (no postponed strings).
    def impl(
        params: list[torch.Tensor], grads: list[torch.Tensor], ds: list[torch.Tensor], vs: list[torch.Tensor],
        zs: list[torch.Tensor], steps: list[torch.Tensor], grad_scale: torch.Tensor | None,
        found_inf: torch.Tensor | None, lr_tensor: torch.Tensor | None, lr: float, beta1: float, beta2: float,
        eps: float, weight_decay: float, clip_gradient: float | None, decoupled_weight_decay: bool, compact: bool,
        maximize: bool,
    ) -> None:
        _step(params, grads, ds, vs, zs, steps, grad_scale, found_inf, lr_tensor if lr_tensor is not None else lr,
              beta1, beta2, eps, weight_decay, clip_gradient, decoupled_weight_decay, compact, maximize)

    # typing.Optional rather than `X | None`: what the schema inference of every torch >= 2.4 reads
    tensors, maybe_tensor, maybe_float = list[torch.Tensor], Optional[torch.Tensor], Optional[float]  # noqa: UP045
    for name, annotation in {
        "params": tensors, "grads": tensors, "ds": tensors, "vs": tensors, "zs": tensors, "steps": tensors,
        "grad_scale": maybe_tensor, "found_inf": maybe_tensor, "lr_tensor": maybe_tensor,
        "lr": float, "beta1": float, "beta2": float, "eps": float, "weight_decay": float,
        "clip_gradient": maybe_float, "decoupled_weight_decay": bool, "compact": bool, "maximize": bool,
        "return": None,
    }.items():
        impl.__annotations__[name] = annotation
    op = torch.library.custom_op(
        "ftmlopt::fused_ftml_", impl, mutates_args=("params", "grads", "ds", "vs", "zs", "steps")
    )

    @op.register_fake
    def _fake(*args: Any) -> None:
        return None

    return op


_OP = _register()


def _step(
    params: list[Tensor], grads: list[Tensor], ds: list[Tensor], vs: list[Tensor], zs: list[Tensor],
    steps: list[Tensor], grad_scale: Tensor | None, found_inf: Tensor | None, lr: float | Tensor, beta1: float,
    beta2: float, eps: float, weight_decay: float, clip_gradient: float | None, decoupled_weight_decay: bool,
    compact: bool, maximize: bool,
) -> None:
    """The op's body (eager): one kernel call per (device, dtypes) group."""
    import torch

    lists = [params, grads, vs] if compact else [params, grads, ds, vs, zs]
    groups: dict[Any, list[int]] = {}
    if all(map(_IS_CPU, params)) and all(len(set(map(_DTYPE, lst))) == 1 for lst in (params, vs, steps)):
        # the usual case, one CPU group: found without building a key per tensor
        groups[(params[0].device, params[0].dtype, vs[0].dtype, steps[0].dtype)] = list(range(len(params)))
    else:
        keys = list(zip(map(_DEVICE, params), map(_DTYPE, params), map(_DTYPE, vs), map(_DTYPE, steps)))
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
    args: dict[str, Any] = dict(
        grad_scale=grad_scale, found_inf=found_inf, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, clip_gradient=clip_gradient, decoupled_weight_decay=decoupled_weight_decay,
        compact=compact, maximize=maximize,
    )
    with torch.no_grad():
        for (device, *_), idx in groups.items():
            whole = len(idx) == len(params)
            sub = lists if whole else [[lst[i] for i in idx] for lst in lists]
            sub_steps = steps if whole else [steps[i] for i in idx]
            if device.type == "cpu":
                _cpu_group(sub, sub_steps, **args)
            else:
                from ftmlopt.kernels import triton_cuda

                if not triton_cuda.AVAILABLE:
                    raise RuntimeError("FTML(fused=True) on CUDA needs triton: pip install 'ftmlopt[triton]'")
                triton_cuda.multi_tensor_step(sub, sub_steps, **args)


_NP = {"float32": np.float32, "float64": np.float64}
_NAMES: dict[Any, str] = {}


def _names() -> dict[Any, str]:
    """torch dtype -> the kernels' storage type name (built once)."""
    if not _NAMES:
        import torch

        _NAMES.update({torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
                       torch.bfloat16: "bfloat16"})
    return _NAMES


_DTYPE = attrgetter("dtype")
_DEVICE = attrgetter("device")
_IS_CPU = attrgetter("is_cpu")


def _cpu_group(
    lists: list[list[Tensor]],
    steps: list[Tensor],
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
) -> None:
    """Step one CPU group (one param dtype, one state dtype) with a single kernel call."""
    import torch

    from ftmlopt.kernels import cpu

    if not cpu.AVAILABLE:
        raise RuntimeError("FTML(fused=True) on CPU needs llvmlite >= 0.44: pip install 'ftmlopt[cpu]'")
    # The kernel writes through raw addresses: refuse anything whose memory is not what it seems.
    plain = {torch.Tensor, torch.nn.Parameter}
    for lst in (*lists, steps):
        if not set(map(type, lst)) <= plain:
            bad = next(type(t).__name__ for t in lst if type(t) not in plain)
            raise TypeError(f"fused FTML needs plain tensors, got a {bad} (tensor subclasses are not supported)")
    n = len(steps)
    numels = np.array([np.fromiter(map(torch.Tensor.numel, lst), np.int64, n) for lst in lists])
    if (numels != numels[0]).any():
        i = int(np.nonzero((numels != numels[0]).any(axis=0))[0][0])
        raise ValueError(
            f"fused FTML: parameter {i} has {int(numels[0, i])} elements but its gradient/state tensors have "
            f"{numels[1:, i].tolist()}; the state does not belong to this parameter"
        )
    if set(map(torch.Tensor.numel, steps)) != {1}:
        raise ValueError("fused FTML: every 'step' state must be a one-element tensor")
    step_dtype = steps[0].dtype
    if step_dtype not in (torch.float32, torch.float64) or not all(map(_IS_CPU, steps)):
        raise RuntimeError(f"fused FTML needs float32/float64 CPU step tensors, got {step_dtype}")
    if found_inf is not None and float(found_inf) != 0.0:
        return  # an inf/NaN gradient: skip the step entirely (steps are not incremented)
    lr_value = float(lr)
    if not compact and lr_value == 0.0:
        # the MXNet-form kernels divide by lr; ftmlopt.torch.functional sends such a step to foreach
        raise ValueError(
            "the fused MXNet-form kernels cannot take an lr-0 step; call "
            "ftmlopt.torch.functional._fused_with_lr0_fallback (or ftmlopt.torch.functional.ftml)"
        )
    scale = float(grad_scale) if grad_scale is not None else None

    names = _names()
    usable = cpu.available_dtypes()
    p_dtype, s_dtype = lists[0][0].dtype, lists[2 if compact else 3][0].dtype
    want_p = p_dtype if names.get(p_dtype) in usable else torch.float32
    want_s = s_dtype if names.get(s_dtype) in usable else torch.float32
    # Zero-copy where the tensor is contiguous and of the group's dtype, else a staging copy.
    staged: list[tuple[Tensor, Tensor, bool]] = []  # (original, copy, write back)
    work = lists
    for pos, lst in enumerate(lists):
        want = want_p if pos < 2 else want_s
        if set(map(_DTYPE, lst)) == {want} and all(map(torch.Tensor.is_contiguous, lst)):
            continue
        if work is lists:
            work = [list(x) for x in lists]
        for i, t in enumerate(lst):
            if t.dtype != want or not t.is_contiguous():
                copy = torch.empty(t.shape, dtype=want, device=t.device).copy_(t)
                staged.append((t, copy, pos != 1 or scale is not None))
                work[pos][i] = copy
    spec = cpu.Spec(
        "compact" if compact else "mxnet", names[want_p], names[want_s], maximize=maximize,
        coupled_wd=weight_decay != 0 and not decoupled_weight_decay,
        decoupled_wd=weight_decay != 0 and decoupled_weight_decay, clip=clip_gradient is not None,
        scale=scale is not None, write_grad=scale is not None,
    )
    compute = _NP[spec.compute]
    fn = cpu.kernel(spec)

    # the counters are incremented and read in one call through their addresses (checked above: one
    # element each, float32/float64, on the CPU)
    t_all = cpu.bump_counters(np.fromiter(map(torch.Tensor.data_ptr, steps), np.int64, n), names[step_dtype])
    per = np.empty((n, 2), dtype=np.float64)
    c = None
    t_values: list[float] = [float(t_all[0])] if t_all.min() == t_all.max() else np.unique(t_all).tolist()
    for t_value in t_values:
        c = rule.constants(
            lr_value, int(t_value), beta1, beta2, eps, weight_decay=weight_decay, decoupled=decoupled_weight_decay,
            clip=clip_gradient, maximize=maximize,
        )
        per[t_all == t_value] = (c.step_size if compact else c.d_scale, c.bias2)
    assert c is not None
    k = cpu.k_vector(c, compute, scale=1.0 if scale is None else scale)

    w, g = work[0], work[1]
    v = work[2] if compact else work[3]
    d = v if compact else work[2]
    z = v if compact else work[4]
    # (w, g, d, v, z, out) per tensor; compact: d and z are v, out is w (each address read once)
    ptr = torch.Tensor.data_ptr
    addresses = np.empty((n, 6), dtype=np.int64)
    for col, row in ((0, w), (1, g), (3, v), *(() if compact else ((2, d), (4, z)))):
        addresses[:, col] = np.fromiter(map(ptr, row), np.int64, n)
    addresses[:, 5] = addresses[:, 0]
    if compact:
        addresses[:, 2] = addresses[:, 4] = addresses[:, 3]
    sizes = numels[0]
    p_size, s_size = w[0].element_size(), v[0].element_size()
    ptrs, counts, coefs = cpu.pieces(addresses, sizes, [p_size, p_size, s_size, s_size, s_size, p_size],
                                     per.astype(compute))
    cpu.run(fn, ptrs, counts, coefs, k, torch.get_num_threads())
    for original, copy, write_back in staged:
        if write_back:
            original.copy_(copy)
