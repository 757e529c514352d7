"""The rule's dtype policy in torch dtypes: the dtype a step is computed in, and the dtype of the state.

The decisions are :func:`ftmlopt.rule.compute_dtype` and :func:`ftmlopt.rule.state_dtype`; this
module only tabulates them for torch's floating dtypes (plain dict lookups also trace cleanly under
``torch.compile``, where a ``functools`` cache would warn) and adds what is torch's own:
``multi_precision`` (float32 state for half params) and complex params (state of their own dtype).

Example:
    >>> import torch
    >>> from ftmlopt.torch import _dtypes
    >>> _dtypes.compute_dtype(torch.bfloat16), _dtypes.compute_dtype(torch.float32, torch.float64)
    (torch.float32, torch.float64)
    >>> _dtypes.is_half(torch.float16), _dtypes.is_half(torch.float32)
    (True, False)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import Tensor

from ftmlopt import rule

__all__ = ["HALF", "compute_dtype", "is_half", "state_dtype", "torch_dtype"]


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a rule dtype name (``"bfloat16"`` -> ``torch.bfloat16``)."""
    return cast(torch.dtype, getattr(torch, name))


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: :data:`ftmlopt.rule.HALF_DTYPES` as torch dtypes: computed in float32, float32 state by default,
#: and a float32 master copy under ``multi_precision=True``.
HALF = tuple(dt for dt in _FLOATS if rule.dtype_name(dt) in rule.HALF_DTYPES)

_COMPUTE = {(p, s): torch_dtype(rule.compute_dtype(p, s)) for p in _FLOATS for s in (None, *_FLOATS)}
_STATE = {(p, req): torch_dtype(rule.state_dtype(p, req)) for p in _FLOATS for req in (None, *_FLOATS)}


def is_half(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is float16 or bfloat16 (:data:`HALF`)."""
    return dtype in HALF


def compute_dtype(param: torch.dtype, state: torch.dtype | None = None) -> torch.dtype:
    """:func:`ftmlopt.rule.compute_dtype` as a torch dtype: float64 when the param or its state is
    float64, float32 for float16/bfloat16 params, the param's dtype otherwise."""
    return _COMPUTE.get((param, state)) or torch_dtype(rule.compute_dtype(param, state))


def state_dtype(p: Tensor, group: Mapping[str, Any]) -> torch.dtype:
    """The dtype of ``v`` (``d``, ``z``) for ``p`` in ``group``: :func:`ftmlopt.rule.state_dtype` (float32
    for half params unless the group's ``state_dtype`` says otherwise; always float32 under
    ``multi_precision``); complex params keep their own dtype."""
    dtype = p.dtype
    if dtype.is_complex:
        return dtype
    if group.get("multi_precision") and is_half(dtype):
        return torch.float32
    requested = group.get("state_dtype")
    return _STATE.get((dtype, requested)) or torch_dtype(rule.state_dtype(dtype, requested))
