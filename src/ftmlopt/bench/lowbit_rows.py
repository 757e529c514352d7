"""``ftmlopt bench`` rows for the fused low-bit step: compact FTML with ``v`` in 8 bits (E4M4) and 4 bits (E3M1).

Each row times :func:`ftmlopt.torch._fused_lowbit.fused_ftml_lowbit` (the registered op's eager body,
the call ``FTML(state_bits=8 | 4, fused=True)`` makes for its quantized params: step counters,
constants, one kernel call per device and dtype) on copies of the workload's tensors, with the state
of :func:`ftmlopt.lowbit.zeros_state`. Its traffic model (:data:`TRAFFIC`): ``w``, ``g`` read and
``w`` written in the param dtype; codes and float32 block scales read and written: 1 + 4/128 bytes
per element at 8 bits, 0.5 + 4/128 at 4 bits (14.06 and 13.06 bytes per float32 parameter, against
20 for float32 state and 28 for Adam). ``state B/param`` is the codes and scales over the elements.

Example:
    >>> from ftmlopt.bench import lowbit_rows
    >>> lowbit_rows.TRAFFIC["ftml-lowbit8"](4, 4), lowbit_rows.TRAFFIC["ftml-lowbit4"](4, 4)
    (14.0625, 13.0625)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ftmlopt import lowbit

__all__ = ["ROWS", "TRAFFIC", "impls"]

#: row name -> state bits
ROWS = {"ftml fused 8-bit": 8, "ftml fused 4-bit": 4}

def _traffic(bits: int) -> Callable[[int, int], float]:
    per_element = lowbit.state_bytes(lowbit.BLOCK, bits) / lowbit.BLOCK  # codes + scale of a full block

    def traffic(p: int, s: int) -> float:
        return 3 * p + 2 * per_element

    return traffic


#: bytes read + written per element from (param bytes, state bytes): the low-bit families
TRAFFIC: dict[str, Callable[[int, int], float]] = {f"ftml-lowbit{bits}": _traffic(bits) for bits in (8, 4)}


def _maker(bits: int, sink: Any) -> Callable[[list[Any], list[Any]], Callable[[], None]]:
    def make(params: list[Any], grads: list[Any]) -> Callable[[], None]:
        import torch

        from ftmlopt.torch._fused_lowbit import fused_ftml_lowbit

        ws = [p.clone() for p in params]
        gs = [g.clone() for g in grads]
        ops = lowbit.ops_for(ws[0])
        state = [lowbit.zeros_state(w.numel(), bits, ops=ops) for w in ws]
        codes, scales = [q for q, _ in state], [s for _, s in state]
        steps = [torch.zeros((), device=w.device) for w in ws]
        sink.state_bytes = sum(t.numel() * t.element_size() for t in (*codes, *scales))

        def step() -> None:
            fused_ftml_lowbit(ws, gs, codes, scales, list(range(len(ws))), steps, grad_scale=None, found_inf=None,
                              lr=1e-3, beta1=0.6, beta2=0.999, eps=1e-8, weight_decay=0.0, clip_gradient=None,
                              decoupled_weight_decay=False, maximize=False, bits=bits)

        step()  # state creation's counterpart: the first step compiles the kernel
        return step

    return make


def impls(device: Any, dtype: Any, *, impl: Callable[..., Any]) -> list[Any]:
    """The low-bit rows for ``device``/``dtype``, made with the bench's row class ``impl(name, family, make)``.

    :data:`ftmlopt.bench.workloads.PROVIDERS` lists it with ``impl`` bound to its ``Impl`` (this module
    does not import that one, which imports this one).
    """
    rows = []
    for name, bits in ROWS.items():
        row = impl(name, f"ftml-lowbit{bits}", _unset)
        row.make = _maker(bits, row)
        rows.append(row)
    return rows


def _unset(params: list[Any], grads: list[Any]) -> Callable[[], None]:
    raise RuntimeError("replaced by the row's own maker")
