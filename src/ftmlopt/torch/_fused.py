r"""The fused FTML step behind ``ftmlopt.torch.FTML(fused=True)``: one kernel call per group.

Tensors are grouped by (device, dtype); each group makes one call into a multi-tensor kernel:

* CPU: :func:`ftmlopt.kernels.numba_cpu.multi_tensor_step`, handed a table of raw addresses
  of the tensors themselves (zero-copy; no Python round trip per tensor inside the step);
* CUDA: :func:`ftmlopt.kernels.triton_cuda.multi_tensor_step`, one Triton launch.

The rule is the torch one (see :mod:`ftmlopt.kernels.numba_cpu` for the per-element lines):
``maximize`` negates the gradient, ``grad_scale`` divides it (and the unscaled gradient is
written back, as torch's fused Adam does), L2 weight decay is added to it unless
``decoupled_weight_decay`` (then ``w`` and ``z`` are scaled by ``1 - lr*wd`` first), it is
clamped to ``[-clip_gradient, clip_gradient]``, then the three-state or compact FTML update
runs. Each ``state_steps`` tensor is incremented here. Where ``found_inf`` is nonzero nothing
changes: params, state and steps keep their values.

float16/bfloat16 tensors, tensors of mixed dtypes and non-contiguous tensors are computed in
float32 (or their own float64) on contiguous staging copies that are written back afterwards;
complex tensors are processed as their real views.
"""

from __future__ import annotations

import math
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from torch import Tensor

__all__ = ["fused_supported"]


def _numba_available() -> bool:
    try:
        from ftmlopt.kernels import numba_cpu
    except ImportError:  # pragma: no cover - the module itself never fails to import
        return False
    return numba_cpu.AVAILABLE


def _triton_available() -> bool:
    from ftmlopt.kernels import triton_cuda

    return triton_cuda.AVAILABLE


def fused_supported(params: Iterable[Tensor]) -> bool:
    """Whether :func:`_fused_ftml` can step these tensors (the default-dispatch test).

    True when every tensor is floating point (or complex) and lives on the CPU with Numba
    installed, or on a CUDA device with Triton installed.

    Example:
        >>> import torch
        >>> from ftmlopt.torch._fused import fused_supported
        >>> isinstance(fused_supported([torch.zeros(3)]), bool)
        True
        >>> fused_supported([torch.zeros(3, dtype=torch.int64)])
        False
    """
    kinds = set()
    for p in params:
        if not (p.is_floating_point() or p.is_complex()):
            return False
        kinds.add(p.device.type)
    checks = {"cpu": _numba_available, "cuda": _triton_available}
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
        ValueError: list lengths that do not match, or a negative ``clip_gradient``.

    Example:
        >>> import torch
        >>> from ftmlopt.torch._fused import _fused_ftml, fused_supported
        >>> w = torch.ones(3); g = torch.full((3,), 0.5); step = torch.zeros(())
        >>> d, v, z = torch.zeros(3), torch.zeros(3), torch.zeros(3)
        >>> if fused_supported([w]):
        ...     _fused_ftml([w], [g], [d], [v], [z], [step], grad_scale=None, found_inf=None, lr=0.1,
        ...                 beta1=0.6, beta2=0.999, eps=1e-8, weight_decay=0.0, clip_gradient=None,
        ...                 decoupled_weight_decay=False, compact=False, maximize=False, has_complex=False,
        ...                 capturable=False, differentiable=False)
        ... else:
        ...     _ = w.fill_(0.9), step.fill_(1)
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
    if clip_gradient is not None and not clip_gradient >= 0:
        raise ValueError(f"clip_gradient must be >= 0 or None, got {clip_gradient!r}")
    if n == 0:
        return
    if not compact:
        lists = [params, grads, ds, vs, zs]
    else:
        lists = [params, grads, vs]
    if has_complex:
        lists = [[torch.view_as_real(t) if t.is_complex() else t for t in lst] for lst in lists]

    with torch.no_grad():
        for idx, device in _groups(lists[0], state_steps):
            sub = [[lst[i] for i in idx] for lst in lists] if idx is not None else lists
            steps = [state_steps[i] for i in idx] if idx is not None else state_steps
            args = dict(
                grad_scale=grad_scale, found_inf=found_inf, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                weight_decay=weight_decay, clip_gradient=clip_gradient,
                decoupled_weight_decay=decoupled_weight_decay, compact=compact, maximize=maximize,
            )  # fmt: skip
            if device.type == "cpu":
                _cpu_group(sub, steps, **args)
            elif device.type == "cuda":
                from ftmlopt.kernels import triton_cuda

                if not triton_cuda.AVAILABLE:
                    raise RuntimeError("FTML(fused=True) on CUDA needs triton: pip install 'ftmlopt[triton]'")
                triton_cuda.multi_tensor_step(sub, steps, **args)
            else:
                raise RuntimeError(f"FTML(fused=True) has no kernel for device {device.type!r} (CPU and CUDA only)")


def _groups(params: Sequence[Tensor], steps: Sequence[Tensor]) -> list[tuple[list[int] | None, Any]]:
    """Indices per (device, dtype, step dtype); ``None`` when everything is one group (common case)."""
    keys = [(p.device, p.dtype, s.dtype) for p, s in zip(params, steps)]
    first = keys[0]
    if all(k == first for k in keys):
        return [(None, first[0])]
    grouped: dict[tuple[Any, ...], list[int]] = {}
    for i, k in enumerate(keys):
        grouped.setdefault(k, []).append(i)
    return [(idx, key[0]) for key, idx in grouped.items()]


def _hyper(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
           clip_gradient: float | None, scale: float, maximize: bool) -> np.ndarray:  # fmt: skip
    from ftmlopt.kernels.numba_cpu import HYPER_FIELDS

    values = {
        "lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps, "weight_decay": weight_decay,
        "clip": math.inf if clip_gradient is None else clip_gradient, "grad_scale": scale,
        "sign": -1.0 if maximize else 1.0,
    }  # fmt: skip
    return np.array([float(values[k]) for k in HYPER_FIELDS], dtype=np.float64)


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
    """Step one CPU (dtype) group with a single Numba call over a table of addresses."""
    import torch

    from ftmlopt.kernels import numba_cpu

    if not numba_cpu.AVAILABLE:
        raise RuntimeError("FTML(fused=True) on CPU needs numba: pip install 'ftmlopt[numba]'")
    # The kernel writes through raw addresses: refuse anything whose memory is not what it seems.
    plain = {torch.Tensor, torch.nn.Parameter}
    for lst in (*lists, steps):
        if not set(map(type, lst)) <= plain:
            bad = next(type(t).__name__ for t in lst if type(t) not in plain)
            raise TypeError(f"fused FTML needs plain tensors, got a {bad} (tensor subclasses are not supported)")
    numels = np.array([list(map(torch.Tensor.numel, lst)) for lst in lists], dtype=np.int64)
    if (numels != numels[0]).any():
        i = int(np.nonzero((numels != numels[0]).any(axis=0))[0][0])
        raise ValueError(
            f"fused FTML: parameter {i} has {int(numels[0, i])} elements but its gradient/state tensors have "
            f"{numels[1:, i].tolist()}; the state does not belong to this parameter"
        )
    if any(t.numel() != 1 for t in steps):
        raise ValueError("fused FTML: every 'step' state must be a one-element tensor")
    if found_inf is not None and float(found_inf) != 0.0:
        return  # an inf/NaN gradient: skip the step entirely (steps are not incremented)
    write_grad = grad_scale is not None
    hyper = _hyper(float(lr), beta1, beta2, eps, weight_decay, clip_gradient,
                   float(grad_scale) if write_grad else 1.0, maximize)  # fmt: skip
    dtype = lists[0][0].dtype
    compute = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    step_dtype = steps[0].dtype
    if step_dtype not in (torch.float32, torch.float64) or not all(map(_IS_CPU, steps)):
        raise RuntimeError(f"fused FTML needs float32/float64 CPU step tensors, got {step_dtype}")

    # Zero-copy where possible; otherwise a contiguous staging copy in the compute dtype. (map() keeps
    # the per-tensor checks in C: with thousands of small tensors they are most of a step's cost.)
    flags = [
        list(map(torch.Tensor.is_contiguous, lst)) if set(map(_DTYPE, lst)) == {compute}
        else [t.dtype == compute and t.is_contiguous() for t in lst]
        for lst in lists
    ]  # fmt: skip
    direct = list(map(all, zip(*flags)))
    staged: list[tuple[Tensor, Tensor, bool]] = []  # (original, copy, write back)
    work = [list(lst) for lst in lists] if not all(direct) else lists
    for i, ok in enumerate(direct):
        if ok:
            continue
        for pos, lst in enumerate(work):
            t = lst[i]
            if t.dtype != compute or not t.is_contiguous():
                copy = torch.empty(t.shape, dtype=compute, device=t.device).copy_(t)
                staged.append((t, copy, pos != 1 or write_grad))
                lst[i] = copy
    dummy = [0] * len(steps)  # d and z of the compact form: never read
    rows = [work[0], work[1], dummy, work[2], dummy, steps] if compact else [*work, steps]
    table = np.array([row if row is dummy else list(map(torch.Tensor.data_ptr, row)) for row in rows], dtype=np.int64)
    sizes = numels[0]
    numba_cpu.multi_tensor_step(
        table, sizes, _NUMPY[compute], _NUMPY[step_dtype], hyper, compact=compact,
        coupled_wd=weight_decay != 0 and not decoupled_weight_decay,
        decoupled_wd=weight_decay != 0 and decoupled_weight_decay, write_grad=write_grad,
    )  # fmt: skip
    for original, copy, write_back in staged:
        if write_back:
            original.copy_(copy)
    # The kernel wrote through raw pointers: tell autograd these tensors changed in place.
    touched = [t for pos, lst in enumerate(lists) if pos != 1 or write_grad for t in lst]
    torch.autograd.graph.increment_version([*touched, *steps])


_IS_CPU = attrgetter("is_cpu")
_DTYPE = attrgetter("dtype")


def _numpy_dtypes() -> dict[Any, Any]:
    import torch

    return {torch.float32: np.float32, torch.float64: np.float64}


class _LazyDtypes(dict):  # type: ignore[type-arg]
    """torch dtype -> numpy dtype, filled on first use so that torch is imported lazily."""

    def __missing__(self, key: Any) -> Any:
        self.update(_numpy_dtypes())
        return dict.__getitem__(self, key)


_NUMPY = _LazyDtypes()
