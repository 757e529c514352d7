r"""``ftmlopt bench``: every FTML implementation against ``torch.optim.Adam``, in one interleaved run.

An optimizer step is memory-bound, so every figure is a *ratio* taken round by round on the
same machine at the same time (see ``docs/benchmarks.md``): in each round every implementation
steps once, A B C A B C ..., and the table reports

* the median and min-max time per step (ms) and the throughput (G elements/s, and GB/s from the
  traffic model of each implementation: bytes read and written per element, by dtype);
* ``x fused Adam``: the median over rounds of (time / time of ``Adam(fused=True)``);
* ``% floor``: the median over rounds of (floor time / time), where the floor is a kernel that
  moves exactly that form's bytes and computes nothing (:mod:`ftmlopt.bench.floors`): ``floor``
  for the three-state form (read w, g, d, v, z; write w, d, v, z), ``floor compact`` for the
  compact form and ``floor adam`` for Adam's traffic (read w, g, m, v; write w, m, v);
* ``state B/param``: optimizer state bytes per parameter after the step (Adam: 8 in float32);
* ``peak extra``: memory allocated during one step beyond what is already held (torch's
  allocation events and ``tracemalloc`` on CPU, ``torch.cuda.max_memory_allocated`` on CUDA).

``--dtype`` takes a comma-separated list (default ``float32,bfloat16,float16``); float16/bfloat16
runs add the ``multi_precision=True`` rows (float32 master copy and state). After the tables come,
unless ``--no-extras``: the first fused step of a new process (two fresh interpreters, kernel
compilation included), and a model's forward+backward time after fused FTML steps against after
fused Adam steps (fresh interpreters, ``--threads`` honoured), with the thread counts before/after.
The load average is printed with the numbers.

Workloads (``--sizes``, comma separated): ``16m`` (16 tensors of 2**20), ``resnet18`` (its 62
parameter shapes, 11.7M elements), ``tiny`` (2,000 tensors of 1-64 elements) or ``NxM`` (N
tensors of M elements). ``--mxnet`` also times MXNet 1.9.1's own ``ftml_update`` operator
(per tensor, as its optimizer calls it) in an interpreter where ``import mxnet`` works; that
process is driven round by round, so its times are interleaved with the others.

Example:
    >>> from ftmlopt.bench import main
    >>> argv = ["--sizes", "2x64", "--rounds", "1", "--warmup", "0", "--json", "", "--quiet", "--no-extras"]
    >>> main(argv)  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ftmlopt.bench import training_loop

__all__ = ["WORKLOADS", "add_arguments", "main", "parse_dtypes", "parse_sizes", "run", "strict", "write_json"]

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

#: bytes read + written per element, from (param bytes, state bytes): the traffic model of each family.
#: FTML: w, g read, w written; d, v, z read and written. Compact: v only. Adam: m, v. Under
#: multi_precision the float32 master is read and written, the gradient is converted to a float32
#: copy (read p, write 4, read 4) and the param is written back from the master.
_TRAFFIC: dict[str, Callable[[int, int], int]] = {
    "ftml": lambda p, s: 3 * p + 6 * s,
    "ftml-compact": lambda p, s: 3 * p + 2 * s,
    "adam": lambda p, s: 3 * p + 4 * s,
    "floor": lambda p, s: 3 * p + 6 * s,
    "floor-compact": lambda p, s: 3 * p + 2 * s,
    "floor-adam": lambda p, s: 3 * p + 4 * s,
    "mxnet": lambda p, s: 3 * p + 6 * s,
    "ftml-mp": lambda p, s: 8 + (p + 8) + 24 + p,
    "ftml-compact-mp": lambda p, s: 8 + (p + 8) + 8 + p,
}

#: the floor each family is compared with in "% floor"
_FLOOR_OF = {"ftml": "floor", "mxnet": "floor", "ftml-compact": "floor compact", "adam": "floor adam",
             "floor": "floor", "floor-compact": "floor compact", "floor-adam": "floor adam"}

_HYPER = dict(lr=1e-3, beta1=0.6, beta2=0.999, eps=1e-8)


def parse_sizes(text: str) -> dict[str, list[tuple[int, ...]]]:
    """``"16m,tiny,3x1000"`` -> ``{name: shapes}``; raises ValueError naming a bad item.

    Example:
        >>> {k: len(v) for k, v in parse_sizes("tiny,3x1000").items()}
        {'tiny': 2000, '3x1000': 3}
    """
    out: dict[str, list[tuple[int, ...]]] = {}
    for item in (s.strip() for s in text.split(",") if s.strip()):
        if item in WORKLOADS:
            out[item] = WORKLOADS[item]
            continue
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--sizes: unknown workload {item!r} (use {', '.join(WORKLOADS)} or NxM, e.g. 16x1048576)")
        out[item] = [(int(parts[1]),)] * int(parts[0])
    if not out:
        raise ValueError(f"--sizes: no workload given in {text!r}")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to ``parser`` (used by ``ftmlopt bench`` and ``python -m ftmlopt.bench``)."""
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default) or cuda[:N]")
    parser.add_argument("--dtype", default="float32,bfloat16,float16",
                        help="param dtypes, comma separated: float32, float64, float16, bfloat16 (default "
                             "float32,bfloat16,float16; half dtypes run on the 16m workload only)")
    parser.add_argument("--sizes", default="16m,resnet18,tiny", help="workloads: 16m, resnet18, tiny or NxM")
    parser.add_argument("--rounds", type=int, default=15, help="timed interleaved rounds (default 15)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (JIT, caches; default 2)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch and the kernels (default: all)")
    parser.add_argument("--only", default="", help="comma-separated implementation names to run (default: all)")
    parser.add_argument("--json", default="ftmlopt-bench.json", help="write results here ('' for none)")
    parser.add_argument("--no-extras", action="store_true",
                        help="skip the first-step and forward/backward measurements (fresh interpreters)")
    parser.add_argument(
        "--mxnet", nargs="?", const=sys.executable, default=None, metavar="PYTHON",
        help="also time MXNet's ftml_update in PYTHON (default: this interpreter) where `import mxnet` works",
    )
    parser.add_argument("--training-loop", type=int, default=10, metavar="ROUNDS",
                        help="rounds of the step timed inside a training loop (bench/training_loop.py; 0: skip)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def parse_dtypes(text: str) -> list[str]:
    """``"float32,bfloat16"`` -> ``["float32", "bfloat16"]``; raises ValueError naming a bad item.

    Example:
        >>> parse_dtypes("float32, bfloat16")
        ['float32', 'bfloat16']
    """
    allowed = ("float32", "float64", "float16", "bfloat16")
    out = [d.strip() for d in text.split(",") if d.strip()]
    for d in out:
        if d not in allowed:
            raise ValueError(f"--dtype: unknown dtype {d!r} (use {', '.join(allowed)})")
    if not out:
        raise ValueError(f"--dtype: no dtype given in {text!r}")
    return out


# --------------------------------------------------------------------------- implementations
@dataclass
class _Impl:
    name: str
    family: str
    make: Callable[[list[Any], list[Any]], Callable[[], None]]
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


def _torch_impls(device: Any, dtype: Any) -> list[_Impl]:
    import torch

    from ftmlopt.torch import FTML

    def optimizer(cls: Any, **kw: Any) -> Callable[[list[Any], list[Any]], Callable[[], None]]:
        def make(params: list[Any], grads: list[Any]) -> Callable[[], None]:
            ps = [torch.nn.Parameter(p.clone()) for p in params]
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt = cls(ps, **kw)
            opt.step()  # state creation
            impl_of[id(make)].state_bytes = _state_bytes(opt)
            return opt.step  # type: ignore[no-any-return]

        return make

    impl_of: dict[int, _Impl] = {}
    ftml = dict(lr=_HYPER["lr"], betas=(_HYPER["beta1"], _HYPER["beta2"]), eps=_HYPER["eps"])
    adam = dict(lr=_HYPER["lr"], betas=(0.9, 0.999), eps=_HYPER["eps"])
    half = dtype in (torch.float16, torch.bfloat16)
    impls = [
        _Impl("ftml fused", "ftml", optimizer(FTML, fused=True, compact=False, **ftml)),
        _Impl("ftml fused compact", "ftml-compact", optimizer(FTML, fused=True, compact=True, **ftml)),
    ]
    if half:
        impls += [
            _Impl("ftml fused mp", "ftml-mp", optimizer(FTML, fused=True, compact=False, multi_precision=True, **ftml)),
            _Impl("ftml fused compact mp", "ftml-compact-mp",
                  optimizer(FTML, fused=True, compact=True, multi_precision=True, **ftml)),
        ]
    impls += [
        _Impl("ftml foreach", "ftml", optimizer(FTML, foreach=True, fused=False, compact=False, **ftml)),
        _Impl("ftml foreach compact", "ftml-compact", optimizer(FTML, foreach=True, fused=False, compact=True, **ftml)),
    ]
    if not half:
        impls.insert(4, _Impl("ftml for-loop", "ftml", optimizer(FTML, foreach=False, fused=False, compact=False,
                                                                 **ftml)))
        if device.type == "cpu":
            impls += [
                _Impl("ftml_update compiled", "mxnet", _operator_maker(compiled=True)),
                _Impl("ftml_update numpy", "mxnet", _operator_maker(compiled=False)),
            ]
        impls.append(_Impl("adam for-loop", "adam", optimizer(torch.optim.Adam, foreach=False, **adam)))
    impls += [
        _Impl("adam foreach", "adam", optimizer(torch.optim.Adam, foreach=True, **adam)),
        _Impl("adam fused", "adam", optimizer(torch.optim.Adam, fused=True, **adam)),
        _Impl("floor", "floor", _floor_maker(device, "three")),
        _Impl("floor compact", "floor-compact", _floor_maker(device, "compact")),
        _Impl("floor adam", "floor-adam", _floor_maker(device, "adam")),
    ]
    for impl in impls:
        impl_of[id(impl.make)] = impl
    return impls


def _operator_maker(compiled: bool) -> Callable[[list[Any], list[Any]], Callable[[], None]]:
    """``ftmlopt.ftml_update`` per tensor on NumPy views, with or without the compiled kernel."""

    def make(params: list[Any], grads: list[Any]) -> Callable[[], None]:
        from ftmlopt import ftml_update

        if params[0].dtype.itemsize < 4:
            raise RuntimeError("ftml_update runs for float32/float64 here")
        ws = [p.clone().numpy() for p in params]
        gs = [g.numpy() for g in grads]
        states = [tuple(np.zeros_like(w) for _ in range(3)) for w in ws]
        t = [0]

        def step() -> None:
            t[0] += 1
            old = os.environ.get("FTMLOPT_DISABLE_NUMBA")
            os.environ["FTMLOPT_DISABLE_NUMBA"] = "0" if compiled else "1"
            try:
                for w, g, (d, v, z) in zip(ws, gs, states):
                    ftml_update(w, g, d, v, z, _HYPER["lr"], t[0], _HYPER["beta1"], _HYPER["beta2"],
                                _HYPER["eps"], out=w)
            finally:
                if old is None:
                    del os.environ["FTMLOPT_DISABLE_NUMBA"]
                else:
                    os.environ["FTMLOPT_DISABLE_NUMBA"] = old

        return step

    return make


def _floor_maker(device: Any, form: str) -> Callable[[list[Any], list[Any]], Callable[[], None]]:
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


# --------------------------------------------------------------------------- measurement
def _sync(device: Any) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _peak_extra(step: Callable[[], None], device: Any) -> int:
    """Bytes allocated during one step beyond what was held before it (peak)."""
    import torch

    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # the profiler's start/stop chatter on stderr
    from torch.profiler import ProfilerActivity, profile

    if not _PROFILER_WARM:  # the first profile imports and builds things: keep that out of the figures
        _PROFILER_WARM.append(True)
        _peak_extra(lambda: None, device)
    tracemalloc.start()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            step()
        _, numpy_peak = tracemalloc.get_traced_memory()  # NumPy (and Python) allocations
    finally:
        tracemalloc.stop()
    return int(_torch_cpu_peak(prof) + numpy_peak)


def _torch_cpu_peak(prof: Any) -> int:
    """Peak of live torch CPU allocations made during the profiled step, from its allocation timeline."""
    from torch.profiler._memory_profiler import Action  # private: checked on torch 2.13

    current = peak = 0
    for _time, action, _key, size in sorted(prof._memory_profile().timeline, key=lambda item: item[0]):
        if action == Action.CREATE:
            current += size
        elif action == Action.DESTROY:
            current -= size
        peak = max(peak, current)
    return peak


_PROFILER_WARM: list[bool] = []

_MXNET_SERVER = r"""
import sys, time
import numpy as np
import mxnet as mx
shapes = [tuple(s) for s in eval(sys.argv[1])]
dtype, lr, b1, b2, eps = sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
rng = np.random.default_rng(0)
ws = [mx.nd.array(rng.standard_normal(s), dtype=dtype) for s in shapes]
gs = [mx.nd.array(rng.standard_normal(s), dtype=dtype) for s in shapes]
st = [[mx.nd.zeros(s, dtype=dtype) for _ in range(3)] for s in shapes]
t = 0
print("ready", mx.__version__, flush=True)
for line in sys.stdin:
    if line.strip() != "step":
        break
    t += 1
    start = time.perf_counter()
    for w, g, (d, v, z) in zip(ws, gs, st):
        mx.nd.ftml_update(w, g, d, v, z, lr=lr, beta1=b1, beta2=b2, epsilon=eps, t=t, out=w)
    mx.nd.waitall()
    print(time.perf_counter() - start, flush=True)
"""


class _MXNet:
    """MXNet's operator in another interpreter, stepped on request (so rounds stay interleaved)."""

    def __init__(self, python: str, shapes: list[tuple[int, ...]], dtype: str, threads: int) -> None:
        command = [python, "-c", _MXNET_SERVER, repr([list(s) for s in shapes]), dtype,
                   *(str(_HYPER[k]) for k in ("lr", "beta1", "beta2", "eps"))]
        # Idle OpenMP threads must sleep, not spin: this process waits while the others are timed.
        env = {**os.environ, "OMP_NUM_THREADS": str(threads or os.cpu_count() or 1), "OMP_WAIT_POLICY": "PASSIVE"}
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        ready = self.proc.stdout.readline().split()
        if not ready or ready[0] != "ready":
            self.close()
            raise RuntimeError(f"MXNet is not importable in {python}")
        self.version = ready[1]

    def step(self) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _bench_workload(
    name: str, shapes: list[tuple[int, ...]], dtype_name: str, args: argparse.Namespace, progress: Any
) -> dict[str, Any]:
    import torch

    device = torch.device(args.device)
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    numel = sum(p.numel() for p in params)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    impls = [i for i in _torch_impls(device, dtype) if not only or i.name in only]
    for impl in impls:
        try:
            impl.step = impl.make(params, grads)
            impl.step()  # first steps: state creation, compilation
        except Exception as exc:  # an implementation that cannot run here is reported, not fatal
            impl.step, impl.error = None, f"{type(exc).__name__}: {exc}"
            continue
        try:
            impl.peak_extra = _peak_extra(impl.step, device)
        except Exception as exc:  # e.g. a torch whose profiler lacks the memory timeline
            impl.error = f"peak memory not measured: {type(exc).__name__}: {exc}"
    mxnet = None
    if args.mxnet:
        try:
            mxnet = _MXNet(args.mxnet, shapes, dtype_name, args.threads)
        except Exception as exc:
            impls.append(_Impl("mxnet ftml_update", "mxnet", lambda p, g: lambda: None, error=str(exc)))
    mx_impl = _Impl(f"mxnet {mxnet.version} ftml_update", "mxnet", lambda p, g: lambda: None) if mxnet else None
    live = [i for i in impls if i.step is not None]
    for r in range(args.warmup + args.rounds):
        for impl in live:
            _sync(device)
            start = time.perf_counter()
            impl.step()  # type: ignore[misc]
            _sync(device)
            if r >= args.warmup:
                impl.times.append(time.perf_counter() - start)
        if mx_impl is not None and mxnet is not None:
            elapsed = mxnet.step()
            if r >= args.warmup:
                mx_impl.times.append(elapsed)
        progress.update(1)
    if mxnet is not None and mx_impl is not None:
        mxnet.close()
        impls.append(mx_impl)
    return _summarize(name, shapes, numel, dtype_name, dtype.itemsize, impls)


def _summarize(
    name: str, shapes: list[tuple[int, ...]], numel: int, dtype_name: str, itemsize: int, impls: list[_Impl]
) -> dict[str, Any]:
    by_name = {i.name: i for i in impls}
    ref = by_name.get("adam fused")
    rows = []
    for impl in impls:
        row: dict[str, Any] = {"name": impl.name, "family": impl.family, "error": impl.error}
        if impl.times:
            med = statistics.median(impl.times)
            traffic = _TRAFFIC[impl.family](itemsize, itemsize)
            row.update(
                median_ms=med * 1e3, min_ms=min(impl.times) * 1e3, max_ms=max(impl.times) * 1e3,
                gelem_per_s=numel / med / 1e9, bytes_per_element=traffic, gb_per_s=numel * traffic / med / 1e9,
                rounds=len(impl.times), times_ms=[t * 1e3 for t in impl.times],
            )
            if ref is not None and len(ref.times) == len(impl.times):
                row["ratio_to_fused_adam"] = statistics.median(a / b for a, b in zip(impl.times, ref.times))
                # bytes moved per second relative to fused Adam's (round by round)
                adam_traffic = _TRAFFIC["adam"](itemsize, itemsize)
                row["bandwidth_vs_fused_adam"] = statistics.median(
                    (traffic / a) / (adam_traffic / b) for a, b in zip(impl.times, ref.times)
                )
            floor = by_name.get(_FLOOR_OF.get(impl.family, ""))
            if floor is not None and len(floor.times) == len(impl.times):
                row["percent_of_floor"] = 100 * statistics.median(f / a for a, f in zip(impl.times, floor.times))
        row["peak_extra_bytes"] = impl.peak_extra
        row["state_bytes_per_param"] = None if impl.state_bytes is None else impl.state_bytes / numel
        rows.append(row)
    return {"workload": name, "dtype": dtype_name, "tensors": len(shapes), "elements": numel, "results": rows}


def _table(result: dict[str, Any]) -> str:
    head = f"{result['workload']} {result['dtype']}: {result['tensors']} tensors, {result['elements']:,} elements"
    cols = ["implementation", "median ms", "min-max ms", "GB/s", "x fused Adam", "B/s vs fused Adam", "% floor",
            "state B/param", "peak extra"]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in result["results"]:
        if "median_ms" not in row:
            lines.append(f"| {row['name']} | not run: {row['error']} |" + " |" * (len(cols) - 2))
            continue

        def opt(key: str, fmt: str, row: dict[str, Any] = row) -> str:
            return format(row[key], fmt) if row.get(key) is not None else "-"

        peak = row["peak_extra_bytes"]
        lines.append("| " + " | ".join([
            row["name"], f"{row['median_ms']:.2f}", f"{row['min_ms']:.2f}-{row['max_ms']:.2f}",
            f"{row['gb_per_s']:.1f}", opt("ratio_to_fused_adam", ".2f"), opt("bandwidth_vs_fused_adam", ".0%"),
            opt("percent_of_floor", ".0f"), opt("state_bytes_per_param", ".0f"), "-" if peak is None else _bytes(peak),
        ]) + " |")
    return "\n".join(lines)


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)  # pragma: no cover


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- fresh-process measurements
_FIRST_STEP = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
threads = int(sys.argv[2])
if threads:
    torch.set_num_threads(threads)
from ftmlopt.torch import FTML
kind = sys.argv[1]
p = torch.nn.Parameter(torch.randn(1 << 20)); p.grad = torch.randn(1 << 20)
opt = (torch.optim.Adam([p], fused=True) if kind == "adam fused"
       else FTML([p], fused=True, compact=kind.endswith("compact")))
t1 = time.perf_counter()
opt.step()
t2 = time.perf_counter()
opt.step()
t3 = time.perf_counter()
print(json.dumps({"first_step_s": t2 - t1, "second_step_s": t3 - t2, "import_s": t1 - t0}))
"""

_FWD_BWD = r"""
import json, statistics, sys, time
import torch
threads = int(sys.argv[2])
if threads:
    torch.set_num_threads(threads)
before = torch.get_num_threads()
from ftmlopt.torch import FTML
torch.manual_seed(0)
model = torch.nn.Sequential(*[m for _ in range(4) for m in (torch.nn.Linear(1024, 1024), torch.nn.ReLU())])
x = torch.randn(256, 1024)
kind = sys.argv[1]
opt = (torch.optim.Adam(model.parameters(), lr=1e-4, fused=True) if kind == "adam fused"
       else FTML(model.parameters(), lr=1e-4, fused=True, compact=True))
times = []
for i in range(int(sys.argv[3])):
    t0 = time.perf_counter()
    model(x).square().mean().backward()
    t1 = time.perf_counter()
    opt.step(); opt.zero_grad()
    if i >= 2:
        times.append(t1 - t0)
print(json.dumps({"fwd_bwd_ms": 1e3 * statistics.median(times), "threads_before": before,
                  "threads_after": torch.get_num_threads()}))
"""


def _fresh(code: str, *argv: str) -> dict[str, Any]:
    env = dict(os.environ)
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    res = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=600)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"}
    parsed: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return parsed


def _extras(args: argparse.Namespace) -> dict[str, Any]:
    """First fused step of new processes, and forward+backward after fused FTML vs fused Adam steps."""
    threads = str(args.threads)
    first = {kind: [_fresh(_FIRST_STEP, kind, threads) for _ in range(2)]
             for kind in ("ftml fused compact", "ftml fused", "adam fused")}
    fwd: dict[str, list[dict[str, Any]]] = {"adam fused": [], "ftml fused compact": []}
    for _ in range(2):  # alternate fresh processes: A B A B
        for kind in fwd:
            fwd[kind].append(_fresh(_FWD_BWD, kind, threads, "12"))
    return {"first_step": first, "forward_backward": fwd}


def _extras_table(extras: dict[str, Any]) -> str:
    lines = ["first step of a new process (1M float32 params; kernel compilation included; two processes)", "",
             "| optimizer | first step s | second step s | import+setup s |", "|---|---|---|---|"]
    for kind, runs in extras["first_step"].items():
        for r in runs:
            if "error" in r:
                lines.append(f"| {kind} | error: {r['error']} | | |")
            else:
                lines.append(f"| {kind} | {r['first_step_s']:.3f} | {r['second_step_s']:.4f} | {r['import_s']:.2f} |")
    lines += ["", "forward+backward of a 4x1024 MLP (batch 256) between optimizer steps, fresh processes A B A B", "",
              "| optimizer | fwd+bwd ms (median) | torch threads before -> after |", "|---|---|---|"]
    for kind, runs in extras["forward_backward"].items():
        for r in runs:
            if "error" in r:
                lines.append(f"| {kind} | error: {r['error']} | |")
            else:
                lines.append(f"| {kind} | {r['fwd_bwd_ms']:.1f} | {r['threads_before']} -> {r['threads_after']} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` (see :func:`add_arguments`); print tables, write JSON."""
    import torch

    if args.rounds < 1 or args.warmup < 0:
        raise ValueError(f"--rounds must be >= 1 and --warmup >= 0, got {args.rounds} and {args.warmup}")
    workloads = parse_sizes(args.sizes)
    dtypes = parse_dtypes(args.dtype)
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0: all), got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)  # the bench's own process: the kernels follow torch's count
    plan = [(name, shapes, dt) for dt in dtypes for name, shapes in workloads.items()
            if dt in ("float32", "float64") or name == "16m" or len(workloads) == 1]
    total = len(plan) * (args.rounds + args.warmup)
    progress: Any = _NoProgress()
    if not args.quiet:
        try:
            from tqdm.auto import tqdm

            progress = tqdm(total=total, desc="bench rounds", unit="round", file=sys.stderr)
        except ImportError:
            pass
    load_before = _load()
    results = []
    try:
        for name, shapes, dt in plan:
            results.append(_bench_workload(name, shapes, dt, args, progress))
    finally:
        progress.close()
    extras = None if args.no_extras or args.device != "cpu" else _extras(args)
    loop = training_loop.from_args(args)  # None with --no-extras, --training-loop 0 or on CUDA
    report = {
        "command": "ftmlopt bench " + " ".join(_argv_of(args)),
        "device": args.device,
        "device_name": _device_name(args.device),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": _load(),
        "dtypes": dtypes,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "workloads": results,
        "extras": extras,
        "training_loop": loop,
    }
    print(f"{report['command']}\n{report['device_name']}, {report['threads']} threads, torch {report['torch']}, "
          f"load average {load_before} before, {report['load_average_after']} after\n")
    for res in results:
        print(_table(res), end="\n\n")
    if extras is not None:
        print(_extras_table(extras), end="\n\n")
    if loop is not None:
        print(training_loop.table(loop), end="\n\n")
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    return 0


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not available on this platform
        return None


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return str(torch.cuda.get_device_name(device))
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def strict(x: Any) -> Any:
    """``x`` with every non-finite float replaced by None (and tuples by lists): strict-JSON ready.

    Example:
        >>> strict({"a": [1.0, float("nan")], "b": (float("inf"), "x")})
        {'a': [1.0, None], 'b': [None, 'x']}
    """
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): strict(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [strict(v) for v in x]
    if x is None or isinstance(x, bool | int | str):
        return x
    if isinstance(x, np.generic):
        return strict(x.item())
    return str(x)


def write_json(report: dict[str, Any], path: str) -> None:
    """Write ``report`` as strict JSON (NaN and infinities become null; ``allow_nan=False`` checks it)."""
    with open(path, "w") as fh:
        json.dump(strict(report), fh, indent=2, allow_nan=False)


def _argv_of(args: argparse.Namespace) -> list[str]:
    out = [f"--device {args.device}", f"--dtype {args.dtype}", f"--sizes {args.sizes}",
           f"--rounds {args.rounds}", f"--warmup {args.warmup}"]
    if args.threads:
        out.append(f"--threads {args.threads}")
    if args.only:
        out.append(f"--only '{args.only}'")
    if args.no_extras:
        out.append("--no-extras")
    if args.training_loop != 10:
        out.append(f"--training-loop {args.training_loop}")
    if args.mxnet:
        out.append(f"--mxnet {args.mxnet}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ftmlopt.bench [options]``: the same as ``ftmlopt bench``."""
    parser = argparse.ArgumentParser(prog="python -m ftmlopt.bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
