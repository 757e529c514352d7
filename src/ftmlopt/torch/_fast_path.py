r"""``FTML.step``'s fast path: a fused CPU param group whose tensors are the ones its last step checked.

The documented path of a step is: ``FTML.step`` checks every group's hyper-parameters, gradients
and state before it changes anything, ``_init_group`` gathers each group's tensors into lists,
and the functional :func:`ftmlopt.torch.functional.ftml` dispatches them to
:mod:`ftmlopt.torch._fused`, which checks each list again and finds the group's kernel call in a
cache (:class:`ftmlopt.torch._fused._Plan`). Between two steps of a training loop none of that
changes except the gradient tensors (new ones after ``zero_grad()``) and the numbers (an lr
schedule), and the layers cost about as much Python as the kernel call they lead to is worth at
16 tensors (issue #19): after a step that streamed hundreds of megabytes the Python runs with cold caches.

After a step that went through one cached CPU plan, :func:`record` keeps a :class:`FastGroup`:
the group's params, which of them had a gradient, the optimizer's state mapping, each param's
state dict (its length) and state tensors, and the metadata the documented path checked (type,
layout, dtype, size, device, contiguity and address of every param, gradient and state tensor).
At the next step :meth:`FastGroup.gradients` compares all of it again, in C-level ``map`` calls
rather than a Python loop per tensor. Where everything matches, the documented path would pass
the same checks and pick the same cached kernel call, so :meth:`FastGroup.step` calls it directly
through :func:`ftmlopt.torch._fused.run_plan`, the function the documented path ends in: the same
kernel with the same constants, from :mod:`ftmlopt.rule` as always. Anything else falls back to
the documented path (which checks, and raises, as before) and records anew:

* a param added, removed or replaced in the group; a gradient gone or new (``grad = None``), of
  another type, layout (sparse), dtype, size or device, or not contiguous;
* ``opt.state`` replaced (``load_state_dict``), a param's state dict or state tensor replaced, a
  state entry added or removed, and any param or state tensor changed in place
  (``p.data = ...``, ``resize_``: another address, size, dtype, device, layout or strides);
* any flag of the group (``compact``, ``maximize``, ``decoupled_weight_decay``, ``foreach``,
  ``fused``, ``capturable``, ``differentiable``, ``multi_precision``, ``state_dtype``,
  ``state_bits``), ``weight_decay`` or ``clip_gradient`` turned on or off, a tensor lr, an
  MXNet-form step at lr 0, GradScaler's scale appearing or going;
* tracing (``torch.compile``: the step stays one registered op) or a Python dispatch mode.

The numbers themselves (lr, betas, eps, weight_decay, clip_gradient) are checked by
:func:`ftmlopt.torch._validation.check_group_at_step` before either path runs, at every step where
they differ (in value or Python type) from the ones the group's last step checked.

Example:
    >>> import torch
    >>> from ftmlopt.torch import FTML
    >>> w = torch.nn.Parameter(torch.ones(3))
    >>> opt = FTML([w], lr=0.1, fused=True)
    >>> for _ in range(2):
    ...     w.grad = torch.full((3,), 0.5)
    ...     opt.step()
    >>> opt._fast_groups[0] is not None  # the second step took the fast path, and recorded it again
    True
"""

from __future__ import annotations

from itertools import compress, repeat
from operator import attrgetter, is_, is_not, itemgetter
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ftmlopt.torch import _fused
from ftmlopt.torch._constants import StepOptions

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["FastGroup", "eager", "record"]

#: the group entries that must not change for the fast path (besides the numbers, checked each step)
_FLAGS = itemgetter("compact", "maximize", "decoupled_weight_decay", "foreach", "fused", "capturable",
                    "differentiable", "multi_precision", "state_dtype", "state_bits")
#: the group's numbers, checked by check_group_at_step
_NUMBERS = itemgetter("lr", "betas", "eps", "weight_decay", "clip_gradient")
_NUMBER_TYPES = frozenset((float, int, type(None), tuple, list))
_PLAIN = frozenset((Tensor, torch.nn.Parameter))
_STRIDED = {torch.strided}
_GRAD = attrgetter("grad")
_DTYPE = attrgetter("dtype")
_LAYOUT = attrgetter("layout")
_IS_CPU = attrgetter("is_cpu")
_PTR = Tensor.data_ptr
_NUMEL = Tensor.numel
_IS_CONTIGUOUS = Tensor.is_contiguous


def eager() -> bool:
    """Whether a step may take the fast path: not traced, and no Python dispatch mode active."""
    return not torch.compiler.is_compiling() and not _fused._python_dispatch_active()


def _shape(group: Mapping[str, Any]) -> tuple[Any, ...]:
    """What of a group decides the checks and the kernel (not the values of lr, betas, eps, wd, clip)."""
    return (_FLAGS(group), type(group["lr"]), group["weight_decay"] != 0, group["clip_gradient"] is None)


def _number_key(group: Mapping[str, Any]) -> tuple[Any, ...] | None:
    """The group's numbers and their types, or None where they are not plain Python numbers (a tensor lr...)."""
    numbers = _NUMBERS(group)
    lr, betas, *rest = numbers
    types = (type(lr), type(betas), *map(type, betas), *map(type, rest)) if type(betas) in (tuple, list) else (None,)
    if not _NUMBER_TYPES.issuperset(types):
        return None
    return numbers, types


def _metadata(tensors: list[Tensor]) -> tuple[tuple[Any, ...], ...] | None:
    """The dtypes, sizes and addresses of plain, strided, contiguous CPU tensors; None for any other tensor."""
    if not set(map(type, tensors)) <= _PLAIN or set(map(_LAYOUT, tensors)) != _STRIDED:
        return None
    if not all(map(_IS_CPU, tensors)) or not all(map(_IS_CONTIGUOUS, tensors)):
        return None
    return tuple(map(_DTYPE, tensors)), tuple(map(_NUMEL, tensors)), tuple(map(_PTR, tensors))


class FastGroup:
    """What one step of a group checked, and the cached kernel call it stepped the group with.

    Built by :func:`record`; holds the group's params and state tensors (which the optimizer
    holds anyway) and integers, never a gradient.
    """

    __slots__ = ("dicts", "dtypes", "group", "keys", "lens", "mask", "mutated", "numbers", "numels", "params",
                 "params_list", "persistent", "plan", "ptrs", "scaled", "shape", "state", "state_tensors")

    def __init__(self, group: dict[str, Any], state: Any, mask: tuple[bool, ...], dicts: list[Any],
                 persistent: list[Tensor], meta: tuple[tuple[Any, ...], ...], mutated: list[Tensor], plan: Any,
                 scaled: bool) -> None:
        self.group = group
        self.shape = _shape(group)
        self.numbers = _number_key(group)  # validated by this step's check_group_at_step
        self.params_list = group["params"]
        self.params = list(self.params_list)
        self.mask = mask
        self.state = state
        self.dicts = dicts
        self.lens = tuple(map(len, dicts))
        self.keys = ("step", "v") if group["compact"] else ("step", "d", "v", "z")
        self.state_tensors = [[d[k] for d in dicts] for k in self.keys]
        self.persistent = persistent  # params (those with a gradient), state tensors, steps
        self.dtypes, self.numels, ptrs = meta  # of persistent + gradients
        self.ptrs = ptrs[:len(persistent)]
        self.mutated = mutated
        self.plan = plan
        self.scaled = scaled

    def numbers_checked(self, group: Mapping[str, Any]) -> bool:
        """Whether the group's numbers are the ones the recorded step checked (equal, of the same Python types).

        Then :func:`ftmlopt.torch._validation.check_group_at_step` would pass again and may be left out.
        """
        numbers = self.numbers
        if numbers is None or group is not self.group:
            return False
        values = _NUMBERS(group)
        return values == numbers[0] and _number_key(group) == numbers

    def gradients(self, group: dict[str, Any], state: Any, grad_scale: Tensor | None
                  ) -> tuple[list[Tensor], tuple[int, ...]] | None:
        """This step's gradients and their addresses if all the recorded step checked is unchanged, else None.

        Changes nothing. Call :func:`ftmlopt.torch._validation.check_group_at_step` first, unless
        :meth:`numbers_checked`: the numbers are not compared here.
        """
        params = self.params_list
        if (group is not self.group or group["params"] is not params or len(params) != len(self.params)
                or not all(map(is_, params, self.params)) or state is not self.state
                or (grad_scale is not None) != self.scaled or _shape(group) != self.shape):
            return None
        if not group["compact"] and group["lr"] == 0:
            return None  # the MXNet form's lr-0 step goes to foreach (ftmlopt.torch.functional)
        grads = list(map(_GRAD, params))
        if tuple(map(is_not, grads, repeat(None))) != self.mask:
            return None
        active = params
        if len(self.dicts) != len(params):  # some params had no gradient (and still have none)
            grads = list(compress(grads, self.mask))
            active = list(compress(params, self.mask))
        dicts = list(map(state.get, active))
        if not all(map(is_, dicts, self.dicts)) or tuple(map(len, dicts)) != self.lens:
            return None
        try:
            for key, tensors in zip(self.keys, self.state_tensors):
                if not all(map(is_, map(itemgetter(key), dicts), tensors)):
                    return None
        except KeyError:
            return None
        meta = _metadata(self.persistent + grads)
        if meta is None:
            return None
        dtypes, numels, ptrs = meta
        m = len(self.ptrs)
        if dtypes != self.dtypes or numels != self.numels or ptrs[:m] != self.ptrs:
            return None
        return grads, ptrs[m:]

    def step(self, grads: list[Tensor], g_ptrs: tuple[int, ...], group: dict[str, Any],
             grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """Step the group through its cached kernel call (``grads``, ``g_ptrs``: what :meth:`gradients` returned)."""
        if found_inf is None or float(found_inf) == 0.0:  # an inf/NaN gradient skips the step, as documented
            beta1, beta2 = group["betas"]
            opts = StepOptions(group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
                               group["clip_gradient"], group["decoupled_weight_decay"], group["compact"],
                               group["maximize"])
            scale = float(grad_scale) if grad_scale is not None else None
            _fused.run_plan(self.plan, g_ptrs, opts, float(opts.lr), scale)
        # the versions the documented path bumps (the gradients too when the unscaled gradient is written back)
        torch.autograd.graph.increment_version(self.mutated + grads if grad_scale is not None else self.mutated)


def record(group: dict[str, Any], state: Any, lists: list[list[Tensor]], steps: list[Tensor], *,
           has_complex: bool, other_paths: bool, grad_scale: Tensor | None) -> FastGroup | None:
    """A :class:`FastGroup` for a group just stepped on the documented path, or None where it does not apply.

    ``lists`` is ``[params, grads, ds, vs, zs]`` as ``FTML._init_group`` gathered them, ``steps``
    their step tensors, ``state`` the optimizer's state mapping; ``other_paths``: some of the
    group's params went to the low-bit step or have a float32 master copy.
    """
    from ftmlopt.torch.functional import _fused_is_default

    params, grads, ds, vs, zs = lists
    compact = group["compact"]
    if (not params or has_complex or other_paths or group["state_bits"] != 32 or group["capturable"]
            or group["differentiable"] or isinstance(group["lr"], Tensor) or (not compact and group["lr"] == 0)
            or not eager()):
        return None
    fused, foreach = group["fused"], group["foreach"]
    if not (fused or (fused is None and foreach is None and _fused_is_default(params, False))):
        return None
    roles = [params, vs, steps] if compact else [params, ds, vs, zs, steps]
    persistent = [t for role in roles for t in role]
    meta = _metadata(persistent + grads)
    if meta is None:
        return None
    # one dtype per role and the params' for the gradients (no staging copies), one size per param, 1-element steps
    dtypes, numels, _ = meta
    n = len(params)
    cut = [range(i * n, (i + 1) * n) for i in range(len(roles) + 1)]  # params, state..., steps, grads
    role_dtypes = [{dtypes[j] for j in c} for c in cut]
    role_sizes = [tuple(numels[j] for j in c) for c in cut]
    sizes = role_sizes[0]
    if (any(len(d) != 1 for d in role_dtypes) or role_dtypes[-1] != role_dtypes[0]
            or len({next(iter(d)) for d in role_dtypes[1:-2]}) != 1
            or any(s != sizes for s in role_sizes[1:-2]) or role_sizes[-1] != sizes or set(role_sizes[-2]) != {1}):
        return None
    beta1, beta2 = group["betas"]
    opts = StepOptions(group["lr"], beta1, beta2, group["eps"], group["weight_decay"], group["clip_gradient"],
                       group["decoupled_weight_decay"], compact, group["maximize"])
    kernel_lists = [params, grads, vs] if compact else [params, grads, ds, vs, zs]
    plan = _fused.cached_plan(kernel_lists, steps, opts, grad_scale is not None)
    if plan is None:
        return None
    mask = tuple(p.grad is not None for p in group["params"])
    active = list(compress(group["params"], mask))
    if len(active) != n or not all(map(is_, active, params)):
        return None  # (params stepped as something else than themselves)
    dicts = [state[p] for p in active]
    keys = ("step", "v") if compact else ("step", "d", "v", "z")
    if set(map(len, dicts)) != {len(keys)}:
        return None  # other entries: the per-step check (length, then these keys) would not see them change
    for key, role in zip(keys, [steps, vs] if compact else [steps, ds, vs, zs]):
        if not all(map(is_, [d.get(key) for d in dicts], role)):
            return None
    mutated = [*params, *ds, *vs, *zs, *steps]
    return FastGroup(group, state, mask, dicts, persistent, meta, mutated, plan, grad_scale is not None)
