"""The foreach FTML step: the for-loop's arithmetic with ``torch._foreach_*`` ops per (device, dtype).

Op for op the arithmetic of :func:`ftmlopt.rule.compact_step` / :func:`ftmlopt.rule.mxnet_step`, in
the same order and in the same compute dtype (:func:`ftmlopt.rule.compute_dtype` of the param's
dtype and its state's), so on the CPU this path and the for-loop round identically (tested bit for
bit, and both against the rule in NumPy).

Example:
    >>> import torch
    >>> from ftmlopt.torch._constants import StepOptions, StepTensors
    >>> from ftmlopt.torch._multi_tensor import _multi_tensor_ftml
    >>> w, g, v, step = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.0]), torch.zeros(2), torch.tensor(0.0)
    >>> opts = StepOptions(lr=0.1, beta1=0.6, beta2=0.999, eps=1e-8, weight_decay=0.0, clip_gradient=None,
    ...                    decoupled_weight_decay=False, compact=True, maximize=False)
    >>> _multi_tensor_ftml(StepTensors([w], [g], [], [v], [], [step]), opts)
    >>> w, step
    (tensor([ 0.9000, -2.0000]), tensor(1.))
"""

from __future__ import annotations

import itertools
import sys
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, _get_value, _view_as_real

from ftmlopt import rule
from ftmlopt.torch import _dtypes
from ftmlopt.torch._constants import StepOptions, StepTensors, step_constants
from ftmlopt.torch._validation import check_capturable_devices

__all__ = ["_multi_tensor_ftml", "local_shards"]


def _multi_tensor_ftml(
    lists: StepTensors, opts: StepOptions, *, grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
    has_complex: bool = False, capturable: bool = False, differentiable: bool = False,
) -> None:
    """The same step as :func:`ftmlopt.torch._single_tensor._single_tensor_ftml` with ``torch._foreach_*`` ops.

    The tensors are grouped by (device, dtype) and, within a group, by the dtype of their state;
    each such list is computed in ``rule.compute_dtype(param dtype, state dtype)`` (on copies where
    a stored dtype differs, written back once). lr = 0 (:mod:`ftmlopt.rule`): the weights stay,
    ``v`` takes the gradient, ``step`` is counted; the MXNet form keeps ``d`` and ``z``.
    """
    params, grads, ds, vs, zs, state_steps = lists
    lr, compact = opts.lr, opts.compact
    if not params:
        return
    if grad_scale is not None or found_inf is not None:
        raise AssertionError("grad_scale and found_inf are only supported by fused=True")
    if differentiable:
        raise AssertionError("_foreach ops don't support autograd")
    if isinstance(lr, Tensor) and not capturable:
        raise RuntimeError("lr as a Tensor is not supported for capturable=False and foreach=True")
    if capturable:
        check_capturable_devices(params, state_steps)
    tensor_math = capturable or torch.compiler.is_compiling()
    masked = not compact and isinstance(lr, Tensor)

    params, grads, ds, vs, zs = local_shards(params, grads, ds, vs, zs)
    by_group: list[list[Tensor]] = [params, grads, vs, state_steps] + ([] if compact else [ds, zs])
    grouped = Optimizer._group_tensors_by_device_and_dtype(by_group)  # type: ignore[arg-type]
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
            c = cache.get(key) or cache.setdefault(key, step_constants(opts, t))
            consts.append(c)

        for idx in _by_state_dtype(dev_vs):
            stored = [_pick(dev_params, idx), _pick(dev_vs, idx), _pick(dev_ds, idx), _pick(dev_zs, idx)]
            _step_in_compute_dtype(stored, _pick(dev_grads, idx), _pick(consts, idx),
                                   cast(Tensor, lr) if masked else None)


def _by_state_dtype(vs: list[Tensor]) -> list[list[int] | None]:
    """Index lists of ``vs`` with one state dtype each (``[None]``: all of them, the usual case)."""
    dtypes = [v.dtype for v in vs]
    if dtypes.count(dtypes[0]) == len(dtypes):
        return [None]
    groups: dict[torch.dtype, list[int]] = {}
    for i, dt in enumerate(dtypes):
        groups.setdefault(dt, []).append(i)
    return list(groups.values())


def _pick(lst: list[Any], idx: list[int] | None) -> list[Any]:
    return lst if idx is None or not lst else [lst[i] for i in idx]


def _step_in_compute_dtype(
    stored: list[list[Tensor]], grads: list[Tensor], consts: list[rule.Constants], mask_lr: Tensor | None
) -> None:
    """Step ``stored = [params, vs, ds, zs]`` (one param dtype, one state dtype) in their compute dtype.

    Lists of another dtype are stepped on copies in the compute dtype and written back once (rounded
    once, as in the for-loop). ``mask_lr``: the MXNet form's tensor lr; where it is 0, ``w``, ``d`` and
    ``z`` keep their values (``v`` takes the gradient).
    """
    compute = _dtypes.compute_dtype(stored[0][0].dtype, stored[1][0].dtype)
    converted = [any(t.dtype != compute for t in lst) for lst in stored]
    work = [[t.to(compute) for t in lst] if conv else lst for lst, conv in zip(stored, converted)]
    if any(g.dtype != compute for g in grads):
        grads = [g.to(compute) for g in grads]
    # at a tensor lr of 0 the MXNet form keeps w, d and z (v takes the gradient): masked below
    old = [[t.clone() for t in lst] if k != 1 else [] for k, lst in enumerate(work)] if mask_lr is not None else None
    _foreach_step(work[0], grads, work[1], work[2], work[3], consts)
    if mask_lr is not None and old is not None:
        frozen = mask_lr.eq(0)
        for lst, before in zip(work, old):
            if lst and before:
                torch._foreach_copy_(lst, [torch.where(frozen, b, a) for a, b in zip(lst, before)])
    for dst, src, conv in zip(stored, work, converted):
        if conv:
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
        return  # lr 0 (rule.py): the weights stay, v took the gradient; the MXNet form keeps d and z
    if compact:  # denom = sqrt(v) * bias2_rsqrt + eps
        denom = list(torch._foreach_sqrt(vs))
        torch._foreach_mul_(denom, [x.bias2_rsqrt for x in consts])
    else:  # denom = sqrt(v / bias2) + eps
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


def local_shards(*lists: list[Tensor]) -> list[list[Tensor]]:
    """Replace DTensors (FSDP2 parameters, their gradients and state) by their local shards.

    ``to_local()`` returns views, so in-place updates land in the DTensors. FTML is element-wise,
    so stepping each rank's shard is exact; this also avoids foreach ops that have no DTensor
    sharding rule (``_foreach_copy_``) and hands the fused kernel real tensors, not wrappers.
    """
    if "torch.distributed.tensor" not in sys.modules:  # no DTensor can exist
        return list(lists)
    from torch.distributed.tensor import DTensor

    # state is created like its param, so the params say whether any tensor is a DTensor (one C loop)
    if not torch.compiler.is_compiling() and not any(map(isinstance, lists[0], itertools.repeat(DTensor))):
        return list(lists)
    return [[t.to_local() if isinstance(t, DTensor) else t for t in lst] for lst in lists]
