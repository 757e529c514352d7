"""What ``ftmlopt bench`` times: the parameter shapes (``--sizes``) and the implementations stepped over them.

An implementation is an :class:`Impl`: a name (the table row), a family (its traffic model and floor in
:mod:`ftmlopt.bench.timing`) and ``make(params, grads) -> step``, which builds the optimizer over copies of
the given tensors, creates its state and returns a zero-argument function doing one step. A *provider*
is a function ``(device, dtype) -> list[Impl]``; :data:`PROVIDERS` lists them in table order and
:func:`implementations` concatenates what they return. To time one more thing, write a module with a
provider and append it to :data:`PROVIDERS` (its rows then join the interleaved rounds, the JSON and
the tables; give them an existing family or add the family to :data:`ftmlopt.bench.timing.TRAFFIC`).

Example:
    >>> len(WORKLOADS["resnet18"]), len(WORKLOADS["tiny"]), WORKLOADS["16m"][0]
    (62, 2000, (1048576,))
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ftmlopt.bench import lowbit_rows

__all__ = ["HYPER", "PROVIDERS", "WORKLOADS", "Impl", "Maker", "implementations", "torch_impls"]

#: ResNet-18 (torchvision) parameter shapes: convolutions, batch-norm weights/biases, the classifier.
_RESNET18: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
for _cin, _cout, _blocks in ((64, 64, 2), (64, 128, 2), (128, 256, 2), (256, 512, 2)):
    for _b in range(_blocks):
        _first = _b == 0
        _in = _cin if _first else _cout
        _RESNET18 += [(_cout, _in, 3, 3), (_cout,), (_cout,), (_cout, _cout, 3, 3), (_cout,), (_cout,)]
        if _first and _cin != _cout:
            _RESNET18 += [(_cout, _cin, 1, 1), (_cout,), (_cout,)]
_RESNET18 += [(1000, 512), (1000,)]

#: named workloads: lists of parameter shapes
WORKLOADS: dict[str, list[tuple[int, ...]]] = {
    "16m": [(1 << 20,)] * 16,
    "resnet18": _RESNET18,
    "tiny": [(1 + (i * 37) % 64,) for i in range(2000)],
}

#: FTML's hyper-parameters in every timed step (Adam keeps its betas (0.9, 0.999))
HYPER = dict(lr=1e-3, beta1=0.6, beta2=0.999, eps=1e-8)

#: ``make(params, grads) -> step``: builds an implementation over copies of the tensors
Maker = Callable[[list[Any], list[Any]], Callable[[], None]]


@dataclass
class Impl:
    """One timed implementation: its row name, traffic family, maker, and what the run measured."""

    name: str
    family: str
    make: Maker
    step: Callable[[], None] | None = None
    times: list[float] = field(default_factory=list)
    peak_extra: int | None = None
    state_bytes: int | None = None
    error: str | None = None


def _state_bytes(opt: Any) -> int:
    """Bytes of an optimizer's state tensors (``step`` counters excluded)."""
    total = 0
    for state in opt.state.values():
        for key, t in state.items():
            if key != "step" and hasattr(t, "element_size"):
                total += t.numel() * t.element_size()
    return total


def torch_impls(device: Any, dtype: Any) -> list[Impl]:
    """The FTML front end's paths, ``ftml_update``, torch's Adam paths and the traffic floors."""
    import torch

    from ftmlopt.torch import FTML

    def optimizer(cls: Any, **kw: Any) -> Maker:
        def make(params: list[Any], grads: list[Any]) -> Callable[[], None]:
            ps = [torch.nn.Parameter(p.clone()) for p in params]
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt = cls(ps, **kw)
            opt.step()  # state creation
            impl_of[id(make)].state_bytes = _state_bytes(opt)
            return opt.step  # type: ignore[no-any-return]

        return make

    impl_of: dict[int, Impl] = {}
    ftml = dict(lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"])
    adam = dict(lr=HYPER["lr"], betas=(0.9, 0.999), eps=HYPER["eps"])
    half = dtype in (torch.float16, torch.bfloat16)
    impls = [
        Impl("ftml fused", "ftml", optimizer(FTML, fused=True, compact=False, **ftml)),
        Impl("ftml fused compact", "ftml-compact", optimizer(FTML, fused=True, compact=True, **ftml)),
    ]
    if half:
        impls += [
            Impl("ftml fused mp", "ftml-mp", optimizer(FTML, fused=True, compact=False, multi_precision=True, **ftml)),
            Impl("ftml fused compact mp", "ftml-compact-mp",
                 optimizer(FTML, fused=True, compact=True, multi_precision=True, **ftml)),
        ]
    impls += [
        Impl("ftml foreach", "ftml", optimizer(FTML, foreach=True, fused=False, compact=False, **ftml)),
        Impl("ftml foreach compact", "ftml-compact", optimizer(FTML, foreach=True, fused=False, compact=True, **ftml)),
    ]
    if not half:
        impls.insert(4, Impl("ftml for-loop", "ftml", optimizer(FTML, foreach=False, fused=False, compact=False,
                                                                **ftml)))
        if device.type == "cpu":
            impls += [
                Impl("ftml_update compiled", "mxnet", _operator_maker(compiled=True)),
                Impl("ftml_update numpy", "mxnet", _operator_maker(compiled=False)),
            ]
        impls.append(Impl("adam for-loop", "adam", optimizer(torch.optim.Adam, foreach=False, **adam)))
    impls += [
        Impl("adam foreach", "adam", optimizer(torch.optim.Adam, foreach=True, **adam)),
        Impl("adam fused", "adam", optimizer(torch.optim.Adam, fused=True, **adam)),
        Impl("floor", "floor", _floor_maker(device, "three")),
        Impl("floor compact", "floor-compact", _floor_maker(device, "compact")),
        Impl("floor adam", "floor-adam", _floor_maker(device, "adam")),
    ]
    for impl in impls:
        impl_of[id(impl.make)] = impl
    return impls


def _operator_maker(compiled: bool) -> Maker:
    """``ftmlopt.ftml_update`` per tensor on NumPy views, with or without the compiled kernel."""

    def make(params: list[Any], grads: list[Any]) -> Callable[[], None]:
        from ftmlopt.mxnet import _kernel, operator

        if params[0].dtype.itemsize < 4:
            raise RuntimeError("ftml_update runs for float32/float64 here")
        if compiled and not _kernel.AVAILABLE:
            raise RuntimeError("the compiled operator kernel needs llvmlite (pip install 'ftmlopt[cpu]')")
        # ftml_update's two kernels, chosen here directly (no environment variable is touched)
        kernel = _kernel.operator_kernel if compiled else operator._numpy_kernel
        ws = [p.clone().numpy() for p in params]
        gs = [g.numpy() for g in grads]
        states = [tuple(np.zeros_like(w) for _ in range(3)) for w in ws]
        t = [0]

        def step() -> None:
            t[0] += 1
            for w, g, (d, v, z) in zip(ws, gs, states):
                s = operator.prepare_scalars(
                    w.dtype, HYPER["lr"], t[0], HYPER["beta1"], HYPER["beta2"], HYPER["eps"], 0.0, 1.0, -1.0
                )
                kernel(w, g, d, v, z, w, s)

        return step

    return make


def _floor_maker(device: Any, form: str) -> Maker:
    """A traffic floor (``form``: ``three``, ``compact`` or ``adam``) with the fused kernels' tools.

    The floors' state is in the param dtype, as the optimizers keep it without multi_precision
    (``zeros_like``). Adam's floor reads w, g, m, v and writes w, m, v.
    """

    def make(params: list[Any], grads: list[Any]) -> Callable[[], None]:
        import torch

        from ftmlopt.bench import floors

        ws = [p.clone() for p in params]
        gs = [g.clone() for g in grads]
        states = [[torch.zeros_like(p) for p in params] for _ in range(3)]
        lists = [ws, gs, *states]
        if device.type == "cuda":
            if form == "adam":
                raise RuntimeError("no Adam floor on CUDA (compare with torch's fused Adam directly)")
            return floors.cuda_floor(lists, compact=form == "compact")
        return floors.cpu_floor_step(*lists, threads=torch.get_num_threads, form=form)

    return make


#: the providers whose rows make up each table, in order
PROVIDERS: list[Callable[[Any, Any], list[Impl]]] = [torch_impls, functools.partial(lowbit_rows.impls, impl=Impl)]


def implementations(device: Any, dtype: Any, only: set[str] | frozenset[str] = frozenset()) -> list[Impl]:
    """Every provider's implementations for ``device``/``dtype`` (torch objects), restricted to ``only`` if given."""
    return [impl for provider in PROVIDERS for impl in provider(device, dtype) if not only or impl.name in only]
