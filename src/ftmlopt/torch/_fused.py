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
from ftmlopt.torch._constants import StepOptions, StepTensors

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
    lists: StepTensors, opts: StepOptions, *, grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
    has_complex: bool = False, capturable: bool = False, differentiable: bool = False,
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
        >>> from ftmlopt.torch._constants import StepOptions, StepTensors
        >>> from ftmlopt.torch._fused import _fused_ftml, fused_supported
        >>> w = torch.ones(3); g = torch.full((3,), 0.5); step = torch.zeros(())
        >>> d, v, z = torch.zeros(3), torch.zeros(3), torch.zeros(3)
        >>> fused_supported([w])  # llvmlite is installed ('ftmlopt[cpu]')
        True
        >>> opts = StepOptions(lr=0.1, beta1=0.6, beta2=0.999, eps=1e-8, weight_decay=0.0, clip_gradient=None,
        ...                    decoupled_weight_decay=False, compact=False, maximize=False)
        >>> _fused_ftml(StepTensors([w], [g], [d], [v], [z], [step]), opts)
        >>> [round(x, 4) for x in w.tolist()], float(step)
        ([0.9, 0.9, 0.9], 1.0)
    """
    import torch

    params, grads, ds, vs, zs, state_steps = lists
    compact, clip_gradient = opts.compact, opts.clip_gradient
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
    work = [params, grads, vs] if compact else [params, grads, ds, vs, zs]
    if has_complex:
        work = [[torch.view_as_real(t) if t.is_complex() else t for t in lst] for lst in work]
    if compact:
        p_, g_, v_ = work
        d_: list[Tensor] = []
        z_: list[Tensor] = []
    else:
        p_, g_, d_, v_, z_ = work
    if torch.compiler.is_compiling() or _python_dispatch_active():
        # Traced (torch.compile, export, a dispatch mode): one opaque registered op with declared mutations.
        # The op's schema takes primitive types only: the options go in flat (lr as a tensor or a float).
        lr_tensor = opts.lr if isinstance(opts.lr, torch.Tensor) else None
        _OP(p_, g_, d_, v_, z_, state_steps, grad_scale, found_inf, lr_tensor,
            0.0 if lr_tensor is not None else float(opts.lr), *opts[1:])
        return
    # Eager: the op's body itself. Going through the dispatcher costs a Python-level version bump and
    # argument flattening per tensor (about 4 us each: 8 ms for 2,000 tensors); one call does it here.
    _step(work, state_steps, opts, grad_scale, found_inf)
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
        opts = StepOptions(lr_tensor if lr_tensor is not None else lr, beta1, beta2, eps, weight_decay, clip_gradient,
                           decoupled_weight_decay, compact, maximize)
        _step([params, grads, vs] if compact else [params, grads, ds, vs, zs], steps, opts, grad_scale, found_inf)

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
    lists: list[list[Tensor]], steps: list[Tensor], opts: StepOptions, grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """The op's body (eager): one kernel call per (device, dtypes) group.

    ``lists`` is ``[params, grads, ds, vs, zs]`` (``[params, grads, vs]`` in the compact form).
    """
    import torch

    params, vs = lists[0], lists[2 if opts.compact else 3]
    groups: dict[Any, list[int]] = {}
    if all(map(_IS_CPU, params)) and all(len(set(map(_DTYPE, lst))) == 1 for lst in (params, vs, steps)):
        # the usual case, one CPU group: found without building a key per tensor
        groups[(params[0].device, params[0].dtype, vs[0].dtype, steps[0].dtype)] = list(range(len(params)))
    else:
        keys = list(zip(map(_DEVICE, params), map(_DTYPE, params), map(_DTYPE, vs), map(_DTYPE, steps)))
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
    with torch.no_grad():
        for (device, *_), idx in groups.items():
            whole = len(idx) == len(params)
            sub = lists if whole else [[lst[i] for i in idx] for lst in lists]
            sub_steps = steps if whole else [steps[i] for i in idx]
            if device.type == "cpu":
                _cpu_group(sub, sub_steps, opts, grad_scale=grad_scale, found_inf=found_inf)
            else:
                from ftmlopt.kernels import triton_cuda

                if not triton_cuda.AVAILABLE:
                    raise RuntimeError("FTML(fused=True) on CUDA needs triton: pip install 'ftmlopt[triton]'")
                triton_cuda.multi_tensor_step(sub, sub_steps, opts, grad_scale=grad_scale, found_inf=found_inf)


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


class _Plan:
    """What a CPU group's step needs besides the gradients and the step's constants.

    Built on a group's first step and reused while the same tensors (same addresses, sizes and
    dtypes) come back: the kernel call over its pieces (:class:`ftmlopt.kernels.cpu.Prepared`,
    whose coefficients and ``k`` are filled each step and whose gradient column follows new
    gradient tensors) and the compiled bump of the step counters. Only integers (addresses) are
    kept, never the tensors. After a large step the Python side runs with caches the kernel has
    flushed; building these arrays every step cost about half a millisecond there (16 tensors),
    5-8 % of the step of 16M parameters.
    """

    __slots__ = ("call", "count_args", "counter", "k_key", "step_out", "step_ptrs")

    def __init__(self, call: Any, step_ptrs: np.ndarray, step_dtype: str) -> None:
        from ftmlopt.kernels import cpu

        self.call = call
        self.k_key: tuple[Any, ...] | None = None
        self.counter = cpu.counter_kernel(step_dtype)
        self.step_ptrs = step_ptrs
        self.step_out = np.empty(step_ptrs.size, dtype=np.float64)
        # the counter's arguments (the arrays above stay put: their addresses are taken once)
        self.count_args = (step_ptrs.size, step_ptrs.ctypes.data, self.step_out.ctypes.data, 1.0)

    def count(self) -> list[float]:
        """Increment the step counters by one and return the new counts."""
        self.counter(*self.count_args)
        return self.step_out.tolist()


#: plans by (options, dtypes, the group's addresses and sizes); a handful of groups at a time
_PLANS: dict[tuple[Any, ...], _Plan] = {}
_MAX_PLANS = 64


def _plan_flags(opts: StepOptions, p_name: str, s_name: str, scaled: bool, step_name: str) -> tuple[Any, ...]:
    """What picks a group's kernel besides its tensors: the form, the storage dtypes and the options in use."""
    return (opts.compact, p_name, s_name, opts.maximize, opts.weight_decay != 0, opts.decoupled_weight_decay,
            opts.clip_gradient is not None, scaled, step_name)


def _plan_key(flags: tuple[Any, ...], sizes: tuple[int, ...], work: list[list[Tensor]],
              steps: list[Tensor]) -> tuple[Any, ...]:
    """A group's key in :data:`_PLANS`: the flags, sizes and the addresses of params, state and steps."""
    import torch

    ptr = torch.Tensor.data_ptr
    # (w, g, d, v, z) per tensor: compact steps read d and z through v's address (each read once)
    state_cols = (work[2],) if flags[0] else (work[2], work[3], work[4])
    return (flags, sizes, tuple(map(ptr, work[0])), *(tuple(map(ptr, lst)) for lst in state_cols),
            tuple(map(ptr, steps)))


def cached_plan(lists: list[list[Tensor]], steps: list[Tensor], opts: StepOptions, scaled: bool) -> _Plan | None:
    """The plan :func:`_cpu_group` steps these lists with, if it is cached and used without staging copies.

    For :mod:`ftmlopt.torch._fast_path`, right after such a step: the caller has checked that the
    lists are plain, contiguous CPU tensors of one size per position, ``lists[1]`` of the params'
    dtype and each other list of one dtype; this adds that the kernels take those dtypes as they are.
    """
    from ftmlopt.kernels import cpu

    names, usable = _names(), cpu.available_dtypes()
    p_name = names.get(lists[0][0].dtype, "")
    s_name = names.get(lists[2 if opts.compact else 3][0].dtype, "")
    step_name = names.get(steps[0].dtype, "")
    if p_name not in usable or s_name not in usable or step_name not in _NP:
        return None
    sizes = tuple(t.numel() for t in lists[0])
    return _PLANS.get(_plan_key(_plan_flags(opts, p_name, s_name, scaled, step_name), sizes, lists, steps))


def _cpu_group(
    lists: list[list[Tensor]], steps: list[Tensor], opts: StepOptions, *, grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """Step one CPU group (one param dtype, one state dtype) with a single kernel call."""
    import torch

    lr, compact = opts.lr, opts.compact

    from ftmlopt.kernels import cpu

    if not cpu.AVAILABLE:
        raise RuntimeError("FTML(fused=True) on CPU needs llvmlite >= 0.44: pip install 'ftmlopt[cpu]'")
    # The kernel writes through raw addresses: refuse anything whose memory is not what it seems.
    plain = {torch.Tensor, torch.nn.Parameter}
    for lst in (*lists, steps):
        if not set(map(type, lst)) <= plain:
            bad = next(type(t).__name__ for t in lst if type(t) not in plain)
            raise TypeError(f"fused FTML needs plain tensors, got a {bad} (tensor subclasses are not supported)")
    numel = torch.Tensor.numel
    sizes = tuple(map(numel, lists[0]))
    for lst in lists[1:]:
        other = tuple(map(numel, lst))
        if other != sizes:
            i = next(j for j, (a, b) in enumerate(zip(sizes, other)) if a != b)
            counts_i = [int(x[i].numel()) for x in lists[1:]]
            raise ValueError(
                f"fused FTML: parameter {i} has {sizes[i]} elements but its gradient/state tensors have "
                f"{counts_i}; the state does not belong to this parameter"
            )
    if set(map(numel, steps)) != {1}:
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

    flags = _plan_flags(opts, names[want_p], names[want_s], scale is not None, names[step_dtype])
    key = _plan_key(flags, sizes, work, steps)
    plan = _PLANS.get(key)
    g_ptrs = tuple(map(torch.Tensor.data_ptr, work[1]))
    if plan is None:
        plan = _new_plan(work, steps, flags, sizes, g_ptrs)
        if not staged:  # staging copies get new addresses every step: nothing to reuse
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.clear()
            _PLANS[key] = plan
    run_plan(plan, g_ptrs, opts, lr_value, scale)
    for original, copy, write_back in staged:
        if write_back:
            original.copy_(copy)


def run_plan(plan: _Plan, g_ptrs: tuple[int, ...], opts: StepOptions, lr_value: float, scale: float | None) -> None:
    """Step a CPU group through its plan: the step's constants, then the one kernel call.

    The last part of :func:`_cpu_group`, after its checks, and all of the step on
    :class:`FTML`'s fast path (:mod:`ftmlopt.torch._fast_path`), so that both paths set the same
    constants for the same kernel. ``g_ptrs`` are the gradients' addresses (same sizes as the
    plan's), ``lr_value`` is ``float(opts.lr)`` and ``scale`` ``float(grad_scale)`` or None; a
    ``found_inf`` step never gets here.
    """
    import torch

    from ftmlopt.kernels import cpu

    _, beta1, beta2, eps, weight_decay, clip_gradient, decoupled_weight_decay, compact, maximize = opts
    call = plan.call
    call.point(1, g_ptrs)  # new gradient tensors (zero_grad(set_to_none=True)) move the gradient column

    # the counters are incremented and read in one call through their addresses (checked above: one
    # element each, float32/float64, on the CPU)
    t_list = plan.count()
    one_t = min(t_list) == max(t_list)  # a few Python floats compare faster than a NumPy reduction, caches cold
    per = None if one_t else np.empty((len(t_list), 2), dtype=np.float64)
    c = None
    for t_value in ([t_list[0]] if one_t else sorted(set(t_list))):
        c = rule.constants(
            lr_value, int(t_value), beta1, beta2, eps, weight_decay=weight_decay, decoupled=decoupled_weight_decay,
            clip=clip_gradient, maximize=maximize,
        )
        pair = (c.step_size, c.bias2_rsqrt) if compact else (c.d_scale, c.bias2)
        if per is None:
            call.set_coefs(pair)
        else:
            per[[t == t_value for t in t_list]] = pair
    assert c is not None
    if per is not None:
        call.set_coefs(per)
    k_key = (lr_value, beta1, beta2, eps, weight_decay, decoupled_weight_decay, clip_gradient, maximize, scale)
    if plan.k_key != k_key:  # the k scalars depend on the hyper-parameters only, not on t
        call.k[:] = cpu.k_vector(c, call.k.dtype, scale=1.0 if scale is None else scale)
        plan.k_key = k_key

    call(torch.get_num_threads())


def _new_plan(work: list[list[Tensor]], steps: list[Tensor], flags: tuple[Any, ...], sizes: tuple[int, ...],
              g_ptrs: tuple[int, ...]) -> _Plan:
    """The :class:`_Plan` of a group whose tensors (``work``, already staged) are seen for the first time."""
    import torch

    from ftmlopt.kernels import cpu

    compact, p_name, s_name, maximize, has_wd, decoupled, clip, scaled, _ = flags
    spec = cpu.Spec(
        "compact" if compact else "mxnet", p_name, s_name, maximize=maximize,
        coupled_wd=has_wd and not decoupled, decoupled_wd=has_wd and decoupled, clip=clip,
        scale=scaled, write_grad=scaled,
    )
    n = len(steps)
    w, v = work[0], work[2] if compact else work[3]
    d = v if compact else work[2]
    z = v if compact else work[4]
    ptr = torch.Tensor.data_ptr
    addresses = np.empty((n, 6), dtype=np.int64)
    addresses[:, 1] = np.fromiter(g_ptrs, np.int64, n)
    for col, row in ((0, w), (2, d), (3, v), (4, z)):
        addresses[:, col] = np.fromiter(map(ptr, row), np.int64, n)
    addresses[:, 5] = addresses[:, 0]
    p_size, s_size = w[0].element_size(), v[0].element_size()
    size_arr = np.array(sizes, dtype=np.int64)
    # the owner of each piece: pieces() is given the tensor index as its per-tensor coefficient
    ptrs, counts, owner_col = cpu.pieces(addresses, size_arr, [p_size, p_size, s_size, s_size, s_size, p_size],
                                         np.arange(n, dtype=np.int64)[:, None])
    call = cpu.Prepared(cpu.kernel(spec), ptrs, counts, owner_col[:, 0], _NP[spec.compute], tracked={1: g_ptrs})
    return _Plan(call, np.fromiter(map(ptr, steps), np.int64, n), flags[-1])
