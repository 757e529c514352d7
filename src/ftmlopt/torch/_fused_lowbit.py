r"""The fused low-bit FTML step for torch tensors: 8-/4-bit ``v`` (:mod:`ftmlopt.lowbit`), one kernel call per group.

Two entry points:

* :func:`step_lowbit` -- the kernel call itself, for lists of tensors on one device whose step
  counts and constants the caller has already worked out (what ``FTML(state_bits=...)``'s quantized
  path has at hand). CPU: :mod:`ftmlopt.kernels.cpu_lowbit` on the tensors' own memory, on
  ``torch.get_num_threads()`` threads; CUDA: :mod:`ftmlopt.kernels.triton_lowbit`.
* :func:`fused_ftml_lowbit` -- the whole step with torch's fused-optimizer conventions (step
  tensors incremented here, ``grad_scale`` divides the gradient and the unscaled gradient is written
  back, a nonzero ``found_inf`` skips the step). Eagerly it runs the op's body directly; under
  ``torch.compile`` or a dispatch mode it is one call of the registered op
  ``torch.ops.ftmlopt.fused_ftml_lowbit_`` (declared mutations), so the compiled graph keeps one
  opaque node, as ``FTML(fused=True)``'s float-state step does.

Per element the step is :func:`ftmlopt.lowbit.compact_step` (the rule's compact step from the
decoded ``v``, requantized with new block scales and the counter-based random bits of
``(seed, step)``); float32 and float64 params give the reference's weights, codes and scales bit
for bit, half params the float32 reference rounded once.

Example:
    >>> import torch
    >>> from ftmlopt import lowbit
    >>> from ftmlopt.torch._fused_lowbit import fused_ftml_lowbit
    >>> w, g, step = torch.ones(5000), torch.full((5000,), 0.5), torch.zeros(())
    >>> codes, scales = lowbit.zeros_state(5000, 8, ops=lowbit.ops_for(w))
    >>> fused_ftml_lowbit([w], [g], [codes], [scales], [0], [step], grad_scale=None, found_inf=None, lr=0.1,
    ...                   beta1=0.6, beta2=0.999, eps=1e-8, weight_decay=0.0, clip_gradient=None,
    ...                   decoupled_weight_decay=False, maximize=False, bits=8, rounding="stochastic")
    >>> round(float(w[0]), 6), float(step), int(codes[0])
    (0.9, 1.0, 255)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from ftmlopt import lowbit, rule

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["fused_ftml_lowbit", "step_lowbit"]

_NAMES = {"torch.float32": "float32", "torch.float64": "float64", "torch.float16": "float16",
          "torch.bfloat16": "bfloat16"}


def _check(params: Sequence[Tensor], grads: Sequence[Tensor], codes: Sequence[Tensor], scales: Sequence[Tensor],
           seeds: Sequence[int], steps: Sequence[int], bits: int) -> None:
    """Every list aligned and every tensor what the kernel will write through: ValueError/TypeError, nothing changed."""
    import torch

    lowbit.format_of(bits)
    n = len(params)
    for name, lst in (("grads", grads), ("codes", codes), ("scales", scales), ("seeds", seeds), ("steps", steps)):
        if len(lst) != n:
            raise ValueError(f"{name} has {len(lst)} entries, params has {n}")
    plain = {torch.Tensor, torch.nn.Parameter}
    device = params[0].device if n else None
    for i, (p, g, q, s) in enumerate(zip(params, grads, codes, scales)):
        for t in (p, g, q, s):
            if type(t) not in plain:
                raise TypeError(f"the fused low-bit step needs plain tensors, got a {type(t).__name__}")
            if t.device != device:
                raise ValueError(f"the fused low-bit step takes tensors of one device, got {t.device} and {device}")
        if str(p.dtype) not in _NAMES or g.numel() != p.numel():
            raise ValueError(f"param {i}: a floating param and a gradient of its size are needed, got {p.dtype} "
                             f"with {p.numel()} and {g.numel()} elements")
        numel = p.numel()
        if q.dtype != torch.uint8 or q.numel() != lowbit.n_code_bytes(numel, bits) or not q.is_contiguous():
            raise ValueError(f"param {i}: codes must be a contiguous uint8 tensor of "
                             f"{lowbit.n_code_bytes(numel, bits)} elements ({bits}-bit codes of {numel}), got "
                             f"{q.dtype} {tuple(q.shape)}")
        if s.dtype != torch.float32 or s.numel() != lowbit.n_blocks(numel) or not s.is_contiguous():
            raise ValueError(f"param {i}: scales must be a contiguous float32 tensor of {lowbit.n_blocks(numel)} "
                             f"elements, got {s.dtype} {tuple(s.shape)}")
    for seed, count in zip(seeds, steps):
        if isinstance(seed, bool) or not 0 <= int(seed) < 2**32:
            raise ValueError(f"Invalid seed: {seed!r} (an int in [0, 2**32))")
        rule.check_step(count, "step")


def step_lowbit(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    codes: Sequence[Tensor],
    scales: Sequence[Tensor],
    seeds: Sequence[int],
    steps: Sequence[int],
    constants: rule.Constants | Sequence[rule.Constants],
    *,
    bits: int,
    rounding: str = "stochastic",
    threads: int | None = None,
    grad_scale: float | None = None,
) -> None:
    r"""One fused low-bit compact step over lists of tensors of one device (in place: params, codes, scales).

    Args:
        params, grads: the params (their real views for complex ones) and gradients, any float dtype; a
            gradient of another dtype or a non-contiguous tensor is stepped through a contiguous copy.
        codes, scales: each param's state as :func:`ftmlopt.lowbit.zeros_state` makes it.
        seeds, steps: each param's seed and the 1-based step count its constants are for (the random bits).
        constants: :func:`ftmlopt.rule.constants` of each param's step (Python floats; a single value
            for all). They may differ only in their step (bias corrections, step size). The rule's
            ``grad_scale`` multiplier is not taken here; see ``grad_scale``.
        bits, rounding: 8 or 4; ``"stochastic"`` (default) or ``"nearest"``.
        threads: CPU threads (default ``torch.get_num_threads()``).
        grad_scale: torch's convention: the gradient is divided by it first and written back unscaled.

    Example:
        >>> import torch
        >>> from ftmlopt import lowbit, rule
        >>> w, g = torch.ones(4096), torch.full((4096,), 0.5)
        >>> q, s = lowbit.zeros_state(4096, 4, ops=lowbit.ops_for(w))
        >>> step_lowbit([w], [g], [q], [s], [7], [1], rule.constants(0.1, 1, 0.6, 0.999, 1e-8), bits=4)
        >>> round(float(w[0]), 6), int(q[0]), round(float(s[0]) * 1.5, 6)  # u = sqrt(0.001 * 0.5**2)
        (0.9, 255, 0.015811)
    """
    _check(params, grads, codes, scales, seeds, steps, bits)
    _step_checked(params, grads, codes, scales, seeds, steps, constants, bits=bits, rounding=rounding,
                  threads=threads, grad_scale=grad_scale)


def _step_checked(
    params: Sequence[Tensor], grads: Sequence[Tensor], codes: Sequence[Tensor], scales: Sequence[Tensor],
    seeds: Sequence[int], steps: Sequence[int], constants: rule.Constants | Sequence[rule.Constants], *, bits: int,
    rounding: str, threads: int | None, grad_scale: float | None,
) -> None:
    """:func:`step_lowbit` once :func:`_check` has passed (the registered op's body checks once per step)."""
    import torch

    cs = [constants] * len(params) if isinstance(constants, rule.Constants) else list(constants)
    lowbit.check_rounding(rounding)
    if len(cs) != len(params):
        raise ValueError(f"constants has {len(cs)} entries, params has {len(params)}")
    if not params:
        return
    if any(c.grad_scale is not None for c in cs):
        raise ValueError("step_lowbit takes torch's grad_scale (a divisor) as its own argument, not in the constants")
    device = params[0].device
    if device.type == "cuda":
        from ftmlopt.kernels import triton_lowbit

        triton_lowbit.step(list(params), list(grads), list(codes), list(scales), seeds, steps, cs, bits=bits,
                           rounding=rounding, grad_scale=grad_scale)
        return
    if device.type != "cpu":
        raise RuntimeError(f"no fused low-bit kernel for device {device.type!r} (CPU and CUDA only)")
    from ftmlopt.kernels import cpu, cpu_lowbit

    if not cpu_lowbit.AVAILABLE:
        raise RuntimeError("the fused low-bit CPU step needs llvmlite >= 0.44: "
                           "pip install 'ftmlopt[cpu]'")
    p_dtype = params[0].dtype
    name = _NAMES[str(p_dtype)]
    if name not in cpu.available_dtypes() or any(p.dtype != p_dtype for p in params):
        name, want = "float32", torch.float32
    else:
        want = p_dtype
    staged: list[tuple[Tensor, Tensor]] = []

    def usable(t: Tensor, write_back: bool) -> Tensor:
        if t.dtype == want and t.is_contiguous():
            return t
        copy = torch.empty(t.shape, dtype=want, device=t.device).copy_(t)
        if write_back:
            staged.append((t, copy))
        return copy

    ws = [usable(p, True) for p in params]
    gs = [usable(g, grad_scale is not None) for g in grads]
    spec = cpu_lowbit.LowbitSpec(
        bits, name, rounding, maximize=cs[0].sign < 0, coupled_wd=cs[0].wd is not None,
        decoupled_wd=cs[0].decay is not None, clip=cs[0].clip is not None, scale=grad_scale is not None,
        write_grad=grad_scale is not None,
    )
    ct = np.dtype(spec.compute)
    k = cpu.k_vector(cs[0], ct, scale=1.0 if grad_scale is None else float(grad_scale))
    distinct = {id(c): c for c in cs}
    if len(distinct) > 1:
        for c in distinct.values():
            if not np.array_equal(cpu.k_vector(c, ct, scale=float(k[cpu.K_FIELDS.index("scale")])), k) or (
                    (c.sign, c.wd is None, c.decay is None, c.clip is None)
                    != (cs[0].sign, cs[0].wd is None, cs[0].decay is None, cs[0].clip is None)):
                raise ValueError("the constants of one fused low-bit call may differ only in their step")
    ptr = torch.Tensor.data_ptr
    n = len(params)
    sizes = tuple(map(torch.Tensor.numel, params))
    g_ptrs = tuple(map(ptr, gs))
    key = (spec, sizes, tuple(map(ptr, ws)), tuple(map(ptr, codes)), tuple(map(ptr, scales)))
    call = _PLANS.get(key)
    if call is None:
        addresses = np.array([list(map(ptr, row)) for row in zip(ws, gs, codes, scales)], dtype=np.int64)
        # built with each tensor's index as its key: the pieces' owners (the keys are written per step)
        ptrs, counts, _ = cpu_lowbit.make_pieces(addresses, np.array(sizes, dtype=np.int64),
                                                 np.arange(n, dtype=np.int64), np.zeros((n, 2), dtype=ct))
        call = cpu.Prepared(cpu_lowbit.kernel(spec), ptrs, counts, ptrs[:, 5], ct, tracked={1: g_ptrs})
        if not staged:  # staged params get new addresses every step: nothing to reuse
            from ftmlopt.torch._fused import _MAX_PLANS  # one bound for both caches

            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.clear()
            _PLANS[key] = call
    call.point(1, g_ptrs)  # new gradient tensors (zero_grad(set_to_none=True)) move the gradient column
    call.set_column(5, np.fromiter((lowbit.step_key(seed, t) for seed, t in zip(seeds, steps)), np.int64, n))
    pairs = [(c.step_size, c.bias2_rsqrt) for c in distinct.values()]
    call.set_coefs(pairs[0] if len(pairs) == 1 else [(c.step_size, c.bias2_rsqrt) for c in cs])
    call.k[:] = k
    with torch.no_grad():
        call(torch.get_num_threads() if threads is None else threads)
        for original, copy in staged:
            original.copy_(copy)


#: the kernel calls of CPU groups by (spec, sizes, addresses of params, codes and scales), kept between
#: steps as ``torch._fused``'s plans are: the gradient column, keys, coefficients and ``k`` change per step
_PLANS: dict[tuple[Any, ...], Any] = {}


def fused_ftml_lowbit(
    params: list[Tensor],
    grads: list[Tensor],
    codes: list[Tensor],
    scales: list[Tensor],
    seeds: list[int],
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
    maximize: bool,
    bits: int,
    rounding: str = "stochastic",
) -> None:
    r"""One fused low-bit FTML step with torch's fused-optimizer conventions (in place).

    .. math::

        g' = \mathrm{clamp}(\pm g / s + \lambda w, -c, c),\quad
        v = \beta_2 \hat v + (1-\beta_2) g'^2,\quad
        w \leftarrow w - \eta\tfrac{1-\beta_1}{1-\beta_1^t}\, g' / (\sqrt{v/(1-\beta_2^t)} + \epsilon)

    with :math:`\hat v` decoded from ``codes``/``scales`` and ``v`` encoded back
    (:func:`ftmlopt.lowbit.compact_step`). Each ``state_steps`` tensor (one element, float32 or
    float64) is incremented first; where ``found_inf`` is nonzero nothing changes.
    """
    import torch

    from ftmlopt.torch._fused import _python_dispatch_active

    if not params:
        return
    if torch.compiler.is_compiling() or _python_dispatch_active():
        lr_tensor = lr if isinstance(lr, torch.Tensor) else None
        _OP(params, grads, codes, scales, state_steps, [int(s) for s in seeds], grad_scale, found_inf, lr_tensor,
            0.0 if lr_tensor is not None else float(lr), beta1, beta2, eps, weight_decay, clip_gradient,
            decoupled_weight_decay, maximize, bits, rounding)
        return
    _body(params, grads, codes, scales, state_steps, seeds, grad_scale, found_inf, lr, beta1, beta2, eps,
          weight_decay, clip_gradient, decoupled_weight_decay, maximize, bits, rounding)
    mutated = [*params, *codes, *scales, *state_steps, *(grads if grad_scale is not None else ())]
    torch.autograd.graph.increment_version(mutated)


def _body(
    params: list[Tensor], grads: list[Tensor], codes: list[Tensor], scales: list[Tensor], state_steps: list[Tensor],
    seeds: Sequence[int], grad_scale: Tensor | None, found_inf: Tensor | None, lr: float | Tensor, beta1: float,
    beta2: float, eps: float, weight_decay: float, clip_gradient: float | None, decoupled_weight_decay: bool,
    maximize: bool, bits: int, rounding: str,
) -> None:
    """The registered op's body: check, count the step, one :func:`step_lowbit` call per device."""
    import torch

    if len(state_steps) != len(params):
        raise ValueError(f"state_steps has {len(state_steps)} tensors, params has {len(params)}")
    if any(s.numel() != 1 or s.dtype not in (torch.float32, torch.float64) for s in state_steps):
        raise ValueError("the fused low-bit step needs one-element float32/float64 step tensors")
    _check(params, grads, codes, scales, seeds, [1] * len(params), bits)
    lowbit.check_rounding(rounding)
    if found_inf is not None and float(found_inf) != 0.0:
        return  # an inf/NaN gradient: nothing changes, the step is not counted
    ts = _count(state_steps)
    cache: dict[int, rule.Constants] = {}
    for t in set(ts):
        cache[t] = rule.constants(float(lr), t, beta1, beta2, eps, weight_decay=weight_decay,
                                  decoupled=decoupled_weight_decay, clip=clip_gradient, maximize=maximize)
    scale = None if grad_scale is None else float(grad_scale)
    groups: dict[Any, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype), []).append(i)
    for idx in groups.values():
        def pick(lst: Sequence[Any], idx: list[int] = idx) -> list[Any]:
            return [lst[i] for i in idx]

        _step_checked(pick(params), pick(grads), pick(codes), pick(scales), pick(seeds), pick(ts),
                      [cache[t] for t in pick(ts)], bits=bits, rounding=rounding, threads=None, grad_scale=scale)


def _count(state_steps: list[Tensor]) -> list[int]:
    """Increment every step tensor by one and return the new counts.

    Contiguous CPU float32/float64 counters of one dtype are bumped and read in one compiled call
    (:func:`ftmlopt.kernels.cpu.bump_counters`); anything else through ``torch._foreach_add_``.
    """
    import torch

    dtype = state_steps[0].dtype
    names = {torch.float32: "float32", torch.float64: "float64"}
    if (all(s.device.type == "cpu" and s.dtype == dtype and s.is_contiguous() for s in state_steps)
            and dtype in names):
        from ftmlopt.kernels import cpu

        if cpu.AVAILABLE:
            addresses = np.fromiter(map(torch.Tensor.data_ptr, state_steps), np.int64, len(state_steps))
            return [int(t) for t in cpu.bump_counters(addresses, names[dtype]).tolist()]
    with torch.no_grad():
        torch._foreach_add_(state_steps, 1)
    return [int(s.item()) for s in state_steps]


def _register() -> Any:
    """Register ``torch.ops.ftmlopt.fused_ftml_lowbit_`` (at import: registration cannot run under a tracer)."""
    import torch

    def impl(
        params: list[torch.Tensor], grads: list[torch.Tensor], codes: list[torch.Tensor], scales: list[torch.Tensor],
        steps: list[torch.Tensor], seeds: list[int], grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None,
        lr_tensor: torch.Tensor | None, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
        clip_gradient: float | None, decoupled_weight_decay: bool, maximize: bool, bits: int, rounding: str,
    ) -> None:
        _body(params, grads, codes, scales, steps, seeds, grad_scale, found_inf,
              lr_tensor if lr_tensor is not None else lr, beta1, beta2, eps, weight_decay, clip_gradient,
              decoupled_weight_decay, maximize, bits, rounding)

    # typing.Optional rather than `X | None`: what the schema inference of every torch >= 2.4 reads
    tensors, maybe_tensor, maybe_float = list[torch.Tensor], Optional[torch.Tensor], Optional[float]  # noqa: UP045
    for name, annotation in {
        "params": tensors, "grads": tensors, "codes": tensors, "scales": tensors, "steps": tensors,
        "seeds": list[int], "grad_scale": maybe_tensor, "found_inf": maybe_tensor, "lr_tensor": maybe_tensor,
        "lr": float, "beta1": float, "beta2": float, "eps": float, "weight_decay": float,
        "clip_gradient": maybe_float, "decoupled_weight_decay": bool, "maximize": bool, "bits": int, "rounding": str,
        "return": None,
    }.items():
        impl.__annotations__[name] = annotation
    op = torch.library.custom_op(
        "ftmlopt::fused_ftml_lowbit_", impl, mutates_args=("params", "grads", "codes", "scales", "steps")
    )

    @op.register_fake
    def _fake(*args: Any) -> None:
        return None

    return op


_OP = _register()
