"""The interleaved timing of ``ftmlopt bench`` and the per-row summaries (ratios, bandwidth, % of floor).

:func:`bench_workload` builds every implementation of :mod:`ftmlopt.bench.workloads` over the same
random parameters and gradients, takes each one's first step (state creation, compilation) and its
peak extra memory, then times ``warmup + rounds`` rounds in which every implementation steps once,
A B C A B C ... (and MXNet's operator in its own interpreter, :mod:`ftmlopt.bench.mxnet_server`,
when ``--mxnet`` is given). :func:`summarize` turns the per-round times into the row figures; every
ratio is the median over rounds of a round-by-round ratio, so the machine's drift cancels.

Example:
    >>> TRAFFIC["ftml"](4, 4), TRAFFIC["ftml-compact"](4, 4), TRAFFIC["adam"](4, 4)
    (36, 20, 28)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from ftmlopt.bench import lowbit_rows
from ftmlopt.bench.workloads import Impl, implementations

__all__ = ["FLOOR_OF", "TRAFFIC", "NoProgress", "bench_workload", "peak_extra", "summarize"]

#: bytes read + written per element, from (param bytes, state bytes): the traffic model of each family.
#: FTML: w, g read, w written; d, v, z read and written. Compact: v only. Adam: m, v. Under
#: multi_precision the float32 master is read and written, the gradient is converted to a float32
#: copy (read p, write 4, read 4) and the param is written back from the master.
TRAFFIC: dict[str, Callable[[int, int], float]] = {
    "ftml": lambda p, s: 3 * p + 6 * s,
    "ftml-compact": lambda p, s: 3 * p + 2 * s,
    "adam": lambda p, s: 3 * p + 4 * s,
    "floor": lambda p, s: 3 * p + 6 * s,
    "floor-compact": lambda p, s: 3 * p + 2 * s,
    "floor-adam": lambda p, s: 3 * p + 4 * s,
    "mxnet": lambda p, s: 3 * p + 6 * s,
    "ftml-mp": lambda p, s: 8 + (p + 8) + 24 + p,
    "ftml-compact-mp": lambda p, s: 8 + (p + 8) + 8 + p,
    **lowbit_rows.TRAFFIC,
}

#: the floor each family is compared with in "% floor"
FLOOR_OF = {"ftml": "floor", "mxnet": "floor", "ftml-compact": "floor compact", "adam": "floor adam",
            "floor": "floor", "floor-compact": "floor compact", "floor-adam": "floor adam"}


class NoProgress:
    """The progress-bar interface (``update``, ``close``) doing nothing: ``--quiet``, or no tqdm."""

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _sync(device: Any) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def peak_extra(step: Callable[[], None], device: Any) -> int:
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
        peak_extra(lambda: None, device)
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


def bench_workload(
    name: str, shapes: list[tuple[int, ...]], dtype_name: str, args: argparse.Namespace, progress: Any
) -> dict[str, Any]:
    """Time every implementation on ``shapes`` in ``dtype_name``, interleaved; return :func:`summarize`'s dict.

    ``args`` needs ``device``, ``only``, ``mxnet``, ``warmup`` and ``rounds`` (and ``threads`` with
    ``mxnet``); ``progress`` gets ``update(1)`` after each round. An implementation that cannot run
    here is reported with its error, not fatal.
    """
    import torch

    from ftmlopt.bench.mxnet_server import MXNetProcess

    device = torch.device(args.device)
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    numel = sum(p.numel() for p in params)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    impls = implementations(device, dtype, only)
    for impl in impls:
        try:
            impl.step = impl.make(params, grads)
            impl.step()  # first steps: state creation, compilation
        except Exception as exc:  # an implementation that cannot run here is reported, not fatal
            impl.step, impl.error = None, f"{type(exc).__name__}: {exc}"
            continue
        try:
            impl.peak_extra = peak_extra(impl.step, device)
        except Exception as exc:  # e.g. a torch whose profiler lacks the memory timeline
            impl.error = f"peak memory not measured: {type(exc).__name__}: {exc}"
    mxnet = None
    if args.mxnet:
        try:
            mxnet = MXNetProcess(args.mxnet, shapes, dtype_name, args.threads)
        except Exception as exc:
            impls.append(Impl("mxnet ftml_update", "mxnet", lambda p, g: lambda: None, error=str(exc)))
    mx_impl = Impl(f"mxnet {mxnet.version} ftml_update", "mxnet", lambda p, g: lambda: None) if mxnet else None
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
    return summarize(name, shapes, numel, dtype_name, dtype.itemsize, impls)


def summarize(
    name: str, shapes: list[tuple[int, ...]], numel: int, dtype_name: str, itemsize: int, impls: list[Impl]
) -> dict[str, Any]:
    """One result row per implementation: times, throughput, ratios to fused Adam and to the floor.

    ``x fused Adam`` is ``median(t / t_adam)`` and ``% floor`` ``100 median(t_floor / t)`` over rounds;
    bandwidth compares bytes moved per second, ``median((B / t) / (B_adam / t_adam))``.

    Example:
        >>> a = Impl("adam fused", "adam", lambda p, g: lambda: None, times=[2.0, 4.0])
        >>> f = Impl("ftml fused", "ftml", lambda p, g: lambda: None, times=[1.0, 4.0])
        >>> rows = summarize("w", [(10,)], 10, "float32", 4, [f, a])["results"]
        >>> rows[0]["ratio_to_fused_adam"], rows[0]["median_ms"]
        (0.75, 2500.0)
    """
    by_name = {i.name: i for i in impls}
    ref = by_name.get("adam fused")
    rows = []
    for impl in impls:
        row: dict[str, Any] = {"name": impl.name, "family": impl.family, "error": impl.error}
        if impl.times:
            med = statistics.median(impl.times)
            traffic = TRAFFIC[impl.family](itemsize, itemsize)
            row.update(
                median_ms=med * 1e3, min_ms=min(impl.times) * 1e3, max_ms=max(impl.times) * 1e3,
                gelem_per_s=numel / med / 1e9, bytes_per_element=traffic, gb_per_s=numel * traffic / med / 1e9,
                rounds=len(impl.times), times_ms=[t * 1e3 for t in impl.times],
            )
            if ref is not None and len(ref.times) == len(impl.times):
                row["ratio_to_fused_adam"] = statistics.median(a / b for a, b in zip(impl.times, ref.times))
                # bytes moved per second relative to fused Adam's (round by round)
                adam_traffic = TRAFFIC["adam"](itemsize, itemsize)
                row["bandwidth_vs_fused_adam"] = statistics.median(
                    (traffic / a) / (adam_traffic / b) for a, b in zip(impl.times, ref.times)
                )
            floor = by_name.get(FLOOR_OF.get(impl.family, ""))
            if floor is not None and len(floor.times) == len(impl.times):
                row["percent_of_floor"] = 100 * statistics.median(f / a for a, f in zip(impl.times, floor.times))
        row["peak_extra_bytes"] = impl.peak_extra
        row["state_bytes_per_param"] = None if impl.state_bytes is None else impl.state_bytes / numel
        rows.append(row)
    return {"workload": name, "dtype": dtype_name, "tensors": len(shapes), "elements": numel, "results": rows}
