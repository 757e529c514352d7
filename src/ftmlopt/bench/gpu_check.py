r"""``make gpu-check``: everything about the CUDA path that needs a GPU, in one run of under 5 minutes.

Run on a CUDA machine with its own ``python3`` (PyTorch with CUDA, Triton; nothing to install)::

    PYTHONPATH=src python3 -m ftmlopt.bench.gpu_check --out gpu-check-out

Sections (each is timed, failures are recorded and the run goes on; the exit status is 1 if any
check failed):

1. ``correctness`` -- the compiled Triton kernel (``TRITON_INTERPRET`` must be unset) through
   ``FTML(fused=True)``'s functional step, step by step against :mod:`ftmlopt.rule` in float64 fed
   with the kernel's own previous state (state included), both forms, options (maximize,
   coupled/decoupled weight decay, clip, ``grad_scale``, ``found_inf``), float32/bfloat16/float16
   params with state in the param dtype or float32;
2. ``lowbit`` -- the fused low-bit step (8-bit E4M4 and 4-bit E3M1 ``v``, the Triton kernel of
   :mod:`ftmlopt.kernels.triton_lowbit` through :func:`ftmlopt.torch._fused_lowbit.fused_ftml_lowbit`),
   step by step against :mod:`ftmlopt.lowbit` on the CPU fed with the kernel's own previous state:
   float32 and bfloat16 params, both roundings, odd sizes; whether weights, codes and scales are
   bit-identical, and the largest deviations (a code may move by one where ``v``'s last bit differs);
3. ``cuda_graph`` -- ``FTML(fused=True, capturable=True).step()`` captured in a CUDA graph and
   replayed with new gradients, against the same optimizer stepped eagerly;
4. ``compile`` -- ``torch.compile`` (inductor) of ``FTML.step`` and ``fullgraph=True`` of the
   functional fused step, against eager;
5. ``bench`` -- 16M float32 and bfloat16 params (16 tensors): fused FTML (both forms, the low-bit
   rows, and the ``multi_precision`` rows for bfloat16) against torch's fused and foreach Adam and the traffic
   floors, interleaved (:mod:`ftmlopt.bench`), with each row's bytes/s as a percentage of the
   device's copy bandwidth (``dst.copy_(src)`` on 1 GiB).

Results go to ``OUT/gpu_check.md`` (markdown tables) and ``OUT/gpu_check.json`` (strict JSON),
rewritten after every section so that a run cut short keeps what it measured.

``--cpu-dry-run`` runs every section that can run without a GPU on the CPU (the correctness
harness against the CPU kernel and, under ``TRITON_INTERPRET=1``, the Triton kernel on tiny
sizes; ``torch.compile``; a tiny benchmark; the report writers), which is how CI tests this file.

Example:
    >>> from ftmlopt.bench.gpu_check import parse_args
    >>> parse_args(["--out", "x", "--cpu-dry-run"]).cpu_dry_run
    True
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["main", "parse_args", "render_markdown"]

_HYPER = dict(lr=0.01, beta1=0.6, beta2=0.999, eps=1e-8)
_OPTIONS: list[dict[str, Any]] = [
    dict(weight_decay=0.0, clip_gradient=None, decoupled_weight_decay=False, maximize=False),
    dict(weight_decay=0.01, clip_gradient=0.5, decoupled_weight_decay=False, maximize=False),
    dict(weight_decay=0.1, clip_gradient=None, decoupled_weight_decay=True, maximize=True),
    dict(weight_decay=0.0, clip_gradient=0.05, decoupled_weight_decay=False, maximize=True, grad_scale=64.0),
]
_TOL = {"float32": (2e-5, 1e-6), "float16": (2e-3, 2e-3), "bfloat16": (1.6e-2, 1.6e-2), "float64": (1e-10, 1e-12)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python3 -m ftmlopt.bench.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for gpu_check.md and gpu_check.json")
    parser.add_argument("--cpu-dry-run", action="store_true", help="run what can run without a GPU, on the CPU")
    parser.add_argument("--budget", type=float, default=270.0, help="seconds for the whole run (default 270)")
    parser.add_argument("--rounds", type=int, default=20, help="benchmark rounds (default 20)")
    parser.add_argument("--sections", default="correctness,lowbit,cuda_graph,compile,bench",
                        help="comma-separated sections to run (default: all)")
    args = parser.parse_args(argv)
    unknown = {s.strip() for s in args.sections.split(",") if s.strip()} - set(_SECTIONS)
    if unknown:
        parser.error(f"--sections: unknown section(s) {sorted(unknown)} (use {', '.join(_SECTIONS)})")
    if args.budget <= 0 or args.rounds < 1:
        parser.error(f"--budget must be > 0 and --rounds >= 1, got {args.budget} and {args.rounds}")
    return args


# ============================================================================ 1. correctness
def _reference(tensors: dict[str, Any], g: Any, t: int, kw: dict[str, Any], compact: bool) -> dict[str, np.ndarray]:
    """One step of :mod:`ftmlopt.rule` in float64 from the kernel's state before the step."""
    from ftmlopt import rule

    f64 = {k: v.detach().double().cpu().numpy().reshape(-1) for k, v in tensors.items()}
    g64 = g.detach().double().cpu().numpy().reshape(-1)
    scale = kw.get("grad_scale")
    c = rule.constants(
        _HYPER["lr"], t, _HYPER["beta1"], _HYPER["beta2"], _HYPER["eps"], weight_decay=kw["weight_decay"],
        decoupled=kw["decoupled_weight_decay"], clip=kw["clip_gradient"], maximize=kw["maximize"],
        grad_scale=None if scale is None else 1.0 / scale,
    )
    if compact:
        w, v = rule.compact_step(f64["w"], g64, f64["v"], c, sqrt=np.sqrt, clip=np.clip)
        return {"w": w, "v": v}
    w, d, v, z = rule.mxnet_step(f64["w"], g64, f64["d"], f64["v"], f64["z"], c, sqrt=np.sqrt, clip=np.clip)
    return {"w": w, "d": d, "v": v, "z": z}


def _close(got: Any, want: np.ndarray, dtype: str) -> float:
    """The largest error in units of the tolerance (<= 1 passes)."""
    rtol, atol = _TOL[dtype]
    x = got.detach().double().cpu().numpy().reshape(-1)
    if x.size == 0:
        return 0.0
    err = np.abs(x - want) / (atol + rtol * np.abs(want))
    both_nan = np.isnan(x) & np.isnan(want)
    return float(np.max(np.where(both_nan, 0.0, np.nan_to_num(err, nan=np.inf))))


def check_correctness(device: str, fused: Callable[..., None], shapes: Sequence[tuple[int, ...]],
                      dtypes: Sequence[tuple[str, str]], steps: int = 3, kernel: str = "registered op",
                      ) -> list[dict[str, Any]]:
    """Every (form, option, dtype pair): ``steps`` steps, each checked against the rule, then a found_inf step."""
    import torch

    rows = []
    gen = torch.Generator().manual_seed(0)
    for compact in (True, False):
        for oi, opts in enumerate(_OPTIONS):
            for p_name, s_name in dtypes:
                p_dt, s_dt = getattr(torch, p_name), getattr(torch, s_name)
                ws = [(torch.randn(s, generator=gen) * 0.5).to(device=device, dtype=p_dt) for s in shapes]
                keys = ("v",) if compact else ("d", "v", "z")
                state = {k: [torch.zeros(s, device=device, dtype=s_dt) for s in shapes] for k in keys}
                counters = [torch.zeros((), device=device, dtype=torch.float32) for _ in shapes]
                worst = 0.0
                for t in range(1, steps + 1):
                    scale = opts.get("grad_scale")
                    gs = [(torch.randn(s, generator=gen) * (scale or 1.0)).to(device=device, dtype=p_dt)
                          for s in shapes]
                    before = [{"w": w.clone(), **{k: state[k][i].clone() for k in keys}} for i, w in enumerate(ws)]
                    grads_before = [g.clone() for g in gs]
                    fused(ws, gs, state, counters, compact=compact, found_inf=None, **opts)
                    for i in range(len(shapes)):
                        want = _reference(before[i], grads_before[i], t, opts, compact)
                        worst = max(worst, _close(ws[i], want["w"], p_name))
                        for k in keys:
                            worst = max(worst, _close(state[k][i], want[k], s_name))
                    if any(float(c) != t for c in counters):
                        worst = float("inf")
                # a found_inf step changes nothing (params, state, step counters)
                snapshot = [t.clone() for t in [*ws, *[x for k in keys for x in state[k]], *counters]]
                gs = [torch.randn(s, generator=gen).to(device=device, dtype=p_dt) for s in shapes]
                fused(ws, gs, state, counters, compact=compact, found_inf=torch.ones((), device=device), **opts)
                after = [*ws, *[x for k in keys for x in state[k]], *counters]
                unchanged = all(torch.equal(a, b) for a, b in zip(snapshot, after))
                rows.append({"kernel": kernel, "form": "compact" if compact else "three-state", "options": oi,
                             "param": p_name, "state": s_name, "worst_error_in_tolerances": worst,
                             "found_inf_unchanged": unchanged, "ok": worst <= 1.0 and unchanged})
    return rows


def _fused_via_op(ws: list[Any], gs: list[Any], state: dict[str, list[Any]], counters: list[Any], *, compact: bool,
                  found_inf: Any, grad_scale: float | None = None, **opts: Any) -> None:
    """The fused step as ``FTML(fused=True)`` calls it (the registered op; CUDA: the Triton kernel)."""
    import torch

    from ftmlopt.torch._constants import StepTensors
    from ftmlopt.torch._fused import _fused_ftml

    scale = None if grad_scale is None else torch.full((), grad_scale, device=ws[0].device)
    _fused_ftml(StepTensors(ws, gs, state.get("d", []), state["v"], state.get("z", []), counters),
                _step_options(compact, opts), grad_scale=scale, found_inf=found_inf)


def _fused_via_triton(ws: list[Any], gs: list[Any], state: dict[str, list[Any]], counters: list[Any], *,
                      compact: bool, found_inf: Any, grad_scale: float | None = None, **opts: Any) -> None:
    """The Triton kernel called directly (the dry run uses it under ``TRITON_INTERPRET=1``)."""
    import torch

    from ftmlopt.kernels import triton_cuda

    lists = [ws, gs, state["v"]] if compact else [ws, gs, state["d"], state["v"], state["z"]]
    scale = None if grad_scale is None else torch.full((), grad_scale, device=ws[0].device)
    triton_cuda.multi_tensor_step(lists, counters, _step_options(compact, opts), grad_scale=scale,
                                  found_inf=found_inf)


def _step_options(compact: bool, opts: dict[str, Any]) -> Any:
    """The torch front end's ``StepOptions`` for this check's hyper-parameters and ``opts`` (wd, clip, ...)."""
    from ftmlopt.torch._constants import StepOptions

    return StepOptions(lr=_HYPER["lr"], beta1=_HYPER["beta1"], beta2=_HYPER["beta2"], eps=_HYPER["eps"],
                       compact=compact, **opts)


# ============================================================================ 2. low-bit state
def check_lowbit(device: str, shapes: Sequence[tuple[int, ...]], *, dry: bool = False, steps: int = 3
                 ) -> list[dict[str, Any]]:
    """The fused low-bit step against :func:`ftmlopt.lowbit.compact_step` (NumPy, CPU), one step at a time.

    Each step of the kernel starts from its own previous state; the reference takes a copy of that
    state. Rows: bits x rounding x param dtype, with whether every weight, code and scale was
    bit-identical, the largest code difference, the share of codes that differ, the largest relative
    scale difference and the largest weight difference in units of the dtype's tolerance. ``ok``:
    codes within one step of the reference in at most 0.1 % of the elements, scales within 1e-6,
    weights within tolerance. ``dry``: the Triton kernel in the interpreter on CPU tensors.
    """
    import torch

    from ftmlopt import lowbit, rule
    from ftmlopt.kernels import triton_lowbit
    from ftmlopt.torch._fused_lowbit import fused_ftml_lowbit

    rows = []
    gen = torch.Generator().manual_seed(7)
    for bits in (8, 4):
        for rounding in ("stochastic", "nearest"):
            for p_name in ("float32", "bfloat16"):
                p_dt = getattr(torch, p_name)
                ws = [torch.randn(s, generator=gen).to(device=device, dtype=p_dt) for s in shapes]
                state = [lowbit.zeros_state(w.numel(), bits, ops=lowbit.ops_for(w)) for w in ws]
                qs, ss = [q for q, _ in state], [s for _, s in state]
                counters = [torch.zeros((), device=device) for _ in ws]
                identical, code_diff, code_share, scale_rel, w_err = True, 0, 0.0, 0.0, 0.0
                for t in range(1, steps + 1):
                    gs = [(torch.randn(s, generator=gen) * 10.0 ** (4 * torch.rand(s, generator=gen) - 3)).to(
                        device=device, dtype=p_dt) for s in shapes]
                    before = [(w.float().cpu().reshape(-1).numpy().copy(), q.cpu().numpy().copy(),
                               s.cpu().numpy().copy()) for w, q, s in zip(ws, qs, ss)]
                    grads = [g.float().cpu().reshape(-1).numpy().copy() for g in gs]
                    c = rule.constants(_HYPER["lr"], t, _HYPER["beta1"], _HYPER["beta2"], _HYPER["eps"])
                    if dry:  # the Triton kernel itself, in the interpreter
                        triton_lowbit.step(ws, gs, qs, ss, list(range(len(ws))), [t] * len(ws), [c] * len(ws),
                                           bits=bits, rounding=rounding)
                    else:
                        fused_ftml_lowbit(ws, gs, qs, ss, list(range(len(ws))), counters, grad_scale=None,
                                          found_inf=None, lr=_HYPER["lr"], beta1=_HYPER["beta1"],
                                          beta2=_HYPER["beta2"], eps=_HYPER["eps"], weight_decay=0.0,
                                          clip_gradient=None, decoupled_weight_decay=False, maximize=False,
                                          bits=bits, rounding=rounding)
                    for i, (w0, q0, s0) in enumerate(before):
                        w_ref, q_ref, s_ref = lowbit.compact_step(w0, grads[i], q0, s0, c.cast(np.float32), bits=bits,
                                                                  seed=i, step=t, rounding=rounding)
                        w_ref = torch.from_numpy(w_ref).to(p_dt)
                        n = ws[i].numel()
                        got_q, want_q = (_codes_of(q, n, bits) for q in (qs[i].cpu().numpy(), q_ref))
                        same = (torch.equal(qs[i].cpu(), torch.from_numpy(q_ref))
                                and torch.equal(ss[i].cpu(), torch.from_numpy(s_ref))
                                and torch.equal(ws[i].cpu().reshape(-1).view(torch.uint8), w_ref.view(torch.uint8)))
                        identical &= same
                        diff = np.abs(got_q - want_q)
                        code_diff = max(code_diff, int(diff.max()) if n else 0)
                        code_share = max(code_share, float((diff > 0).mean()) if n else 0.0)
                        s_ref_t = torch.from_numpy(s_ref)
                        denom = torch.where(s_ref_t > 0, s_ref_t, torch.ones_like(s_ref_t))
                        scale_rel = max(scale_rel, float(((ss[i].cpu() - s_ref_t).abs() / denom).max()))
                        w_err = max(w_err, _close(ws[i], w_ref.double().numpy(), p_name))
                ok = code_diff <= 1 and code_share <= 1e-3 and scale_rel <= 1e-6 and w_err <= 1.0
                rows.append({"kernel": "triton interpreter" if dry else "registered op", "bits": bits,
                             "rounding": rounding, "param": p_name, "bit_identical": identical,
                             "max_code_steps": code_diff, "share_of_codes_differing": code_share,
                             "max_scale_rel_diff": scale_rel, "worst_w_error_in_tolerances": w_err, "ok": ok})
    return rows


def _codes_of(stored: np.ndarray, numel: int, bits: int) -> np.ndarray:
    """The integer codes of ``numel`` elements (4-bit: unpacked), as int64."""
    from ftmlopt import lowbit

    if bits == 8:
        return stored.astype(np.int64)
    return np.asarray(lowbit.unpack4(stored, numel, lowbit.ops_for(stored)), dtype=np.int64)


# ============================================================================ 3. CUDA graph
def check_cuda_graph(device: str, replays: int = 5) -> dict[str, Any]:
    """``capturable=True`` fused FTML captured once and replayed, against eager steps on the same grads."""
    import torch

    from ftmlopt.torch import FTML

    out: dict[str, Any] = {}
    for compact in (True, False):
        gen = torch.Generator().manual_seed(3)
        shapes = [(1000,), (33, 7), (1 << 16,)]
        init = [torch.randn(s, generator=gen) for s in shapes]
        grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(replays + 3)]
        ps = [torch.nn.Parameter(x.to(device)) for x in init]
        qs = [torch.nn.Parameter(x.to(device)) for x in init]
        kw: dict[str, Any] = dict(lr=1e-2, weight_decay=0.01, clip_gradient=1.0, fused=True, compact=compact)
        opt = FTML(ps, capturable=True, **kw)
        ref = FTML(qs, **kw)
        for p, q, g in zip(ps, qs, grads[0]):
            p.grad = g.to(device).clone()
            q.grad = g.to(device).clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the capture: state, tables and constants are created here
                opt.step()
                ref.step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            opt.step()
        for r in range(replays):
            for p, q, g in zip(ps, qs, grads[r + 1]):
                assert p.grad is not None and q.grad is not None
                p.grad.copy_(g.to(device))  # the captured graph reads these very tensors
                q.grad.copy_(g.to(device))
            graph.replay()
            ref.step()
        torch.cuda.synchronize()
        worst = max(float((p - q).detach().abs().max()) for p, q in zip(ps, qs))
        steps_equal = all(float(opt.state[p]["step"]) == float(ref.state[q]["step"]) for p, q in zip(ps, qs))
        out["compact" if compact else "three-state"] = {"max_abs_diff": worst, "steps_equal": steps_equal,
                                                        "ok": worst <= 1e-6 and steps_equal}
    return out


# ============================================================================ 4. torch.compile
def check_compile(device: str, backend: str = "inductor") -> dict[str, Any]:
    """``torch.compile`` of ``FTML.step`` (``backend``) and ``fullgraph=True`` of the functional step."""
    import torch

    from ftmlopt.torch import FTML

    out: dict[str, Any] = {}
    for compact in (True, False):
        gen = torch.Generator().manual_seed(5)
        init = [torch.randn(s, generator=gen) for s in ((300,), (17, 3))]
        ps = [torch.nn.Parameter(x.to(device)) for x in init]
        qs = [torch.nn.Parameter(x.to(device)) for x in init]
        opt, ref = (FTML(xs, lr=1e-2, fused=True, compact=compact, weight_decay=0.01) for xs in (ps, qs))
        step = torch.compile(opt.step, backend=backend)
        for _ in range(3):
            for p, q in zip(ps, qs):
                g = torch.randn(p.shape, generator=gen).to(device)
                p.grad, q.grad = g.clone(), g.clone()
            step()
            ref.step()
        worst = max(float((p - q).detach().abs().max()) for p, q in zip(ps, qs))
        out[f"step {'compact' if compact else 'three-state'}"] = {"max_abs_diff": worst, "ok": worst == 0.0}

    def functional(ws: list[Any], gs: list[Any], vs: list[Any], counters: list[Any]) -> None:
        _fused_via_op(ws, gs, {"v": vs}, counters, compact=True, found_inf=None, **_OPTIONS[1])

    gen = torch.Generator().manual_seed(6)
    lists = [[torch.randn(64, generator=gen).to(device) for _ in range(2)] for _ in range(2)]
    lists += [[torch.zeros(64, device=device) for _ in range(2)], [torch.zeros((), device=device) for _ in range(2)]]
    twin = [[t.clone() for t in lst] for lst in lists]
    compiled = torch.compile(functional, backend=backend, fullgraph=True)
    for _ in range(2):
        compiled(*lists)
        functional(*twin)
    same = all(torch.equal(a, b) for x, y in zip(lists, twin) for a, b in zip(x, y))
    out["functional fullgraph"] = {"equal": same, "ok": same}
    return out


# ============================================================================ 5. bench
def copy_bandwidth(device: str, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """The device's copy bandwidth in GB/s: ``dst.copy_(src)`` moves ``2 * nbytes`` (median of ``repeats``)."""
    import torch

    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 2):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * nbytes / float(np.median(times[2:])) / 1e9


_BENCH_ROWS = ("ftml fused", "ftml fused compact", "ftml fused 8-bit", "ftml fused 4-bit", "ftml fused mp",
               "ftml fused compact mp", "ftml foreach compact", "adam foreach", "adam fused", "floor", "floor compact")


def run_bench(device: str, sizes: str, dtypes: str, rounds: int, copy_gbs: float) -> list[dict[str, Any]]:
    """The interleaved benchmark of :mod:`ftmlopt.bench`, with ``% of copy bandwidth`` per row."""
    from ftmlopt.bench.cli import parse_dtypes, parse_sizes
    from ftmlopt.bench.timing import NoProgress, bench_workload

    ns = argparse.Namespace(device=device, only=",".join(_BENCH_ROWS), mxnet=None, warmup=3, rounds=rounds)
    results = []
    for dtype in parse_dtypes(dtypes):
        for name, shapes in parse_sizes(sizes).items():
            res = bench_workload(name, shapes, dtype, ns, NoProgress())
            for row in res["results"]:
                if row.get("gb_per_s") is not None:
                    row["percent_of_copy_bandwidth"] = 100 * row["gb_per_s"] / copy_gbs
                row.pop("times_ms", None)
            results.append(res)
    return results


# ============================================================================ report
def render_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: a header, then one table per section that ran.

    Example:
        >>> print(render_markdown({"device": "cpu", "sections": {}}).splitlines()[0])
        # ftmlopt GPU check
    """
    env = report.get("environment", {})
    lines = ["# ftmlopt GPU check", "", f"device: {report.get('device')}, "
             + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    sections = report.get("sections", {})
    for name, sec in sections.items():
        status = "ok" if sec.get("ok") else "FAILED"
        lines += [f"## {name}: {status} ({sec.get('seconds', 0):.1f} s)", ""]
        if sec.get("error"):
            lines += ["```", str(sec["error"]).strip(), "```", ""]
        data = sec.get("result")
        if name == "correctness" and isinstance(data, list):
            lines += ["| kernel | form | options | param | state | worst error / tolerance | found_inf no-op | ok |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in data:
                lines.append(f"| {r['kernel']} | {r['form']} | {r['options']} | {r['param']} | {r['state']} | "
                             f"{r['worst_error_in_tolerances']:.3g} | {r['found_inf_unchanged']} | {r['ok']} |")
        elif name == "lowbit" and isinstance(data, list):
            lines += ["| kernel | bits | rounding | param | bit-identical | max code steps | codes differing | "
                      "max scale rel. diff | worst w error / tolerance | ok |", "|---" * 10 + "|"]
            for r in data:
                lines.append(f"| {r['kernel']} | {r['bits']} | {r['rounding']} | {r['param']} | {r['bit_identical']} | "
                             f"{r['max_code_steps']} | {r['share_of_codes_differing']:.2%} | "
                             f"{r['max_scale_rel_diff']:.2g} | {r['worst_w_error_in_tolerances']:.3g} | {r['ok']} |")
        elif name == "bench" and isinstance(data, dict):
            lines.append(f"copy bandwidth: {data.get('copy_gb_per_s', 0):.0f} GB/s")
            for res in data.get("workloads", []):
                lines += ["", f"### {res['workload']} {res['dtype']}: {res['elements']:,} elements", "",
                          "| implementation | median ms | GB/s | % copy bandwidth | x fused Adam | % floor | "
                          "state B/param | peak extra B |", "|---|---|---|---|---|---|---|---|"]
                for row in res["results"]:
                    if row.get("median_ms") is None:
                        lines.append(f"| {row['name']} | not run: {row.get('error')} | | | | | | |")
                        continue

                    def fmt(key: str, spec: str, row: dict[str, Any] = row) -> str:
                        value = row.get(key)
                        return "-" if value is None else format(value, spec)

                    lines.append(f"| {row['name']} | {fmt('median_ms', '.3f')} | {fmt('gb_per_s', '.0f')} | "
                                 f"{fmt('percent_of_copy_bandwidth', '.0f')} | {fmt('ratio_to_fused_adam', '.2f')} | "
                                 f"{fmt('percent_of_floor', '.0f')} | {fmt('state_bytes_per_param', '.0f')} | "
                                 f"{fmt('peak_extra_bytes', 'd')} |")
        elif isinstance(data, dict):
            lines += ["| check | result |", "|---|---|"]
            lines += [f"| {k} | {json.dumps(v)} |" for k, v in data.items()]
        lines.append("")
    return "\n".join(lines)


def _write(report: dict[str, Any], out: str) -> None:
    from ftmlopt._json import write_json

    os.makedirs(out, exist_ok=True)
    write_json(report, os.path.join(out, "gpu_check.json"), indent=2)
    with open(os.path.join(out, "gpu_check.md"), "w") as fh:
        fh.write(render_markdown(report))


def _environment() -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version()}
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        env["torch"] = None
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET")
    return env


_SECTIONS = ("correctness", "lowbit", "cuda_graph", "compile", "bench")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sections, writing the report after each; returns 1 when a check failed."""
    args = parse_args(argv)
    dry = args.cpu_dry_run
    if dry:
        os.environ["TRITON_INTERPRET"] = "1"  # before the Triton kernel is first defined
    elif os.environ.get("TRITON_INTERPRET", "") not in ("", "0"):
        print("TRITON_INTERPRET is set: the GPU check must run the compiled kernel; unset it", file=sys.stderr)
        return 2
    import torch

    if not dry and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or pass --cpu-dry-run", file=sys.stderr)
        return 2
    device = "cpu" if dry else "cuda"
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    deadline = time.monotonic() + args.budget
    report: dict[str, Any] = {"device": device if dry else torch.cuda.get_device_name(0), "dry_run": dry,
                              "command": " ".join(["python3 -m ftmlopt.bench.gpu_check", *(argv or sys.argv[1:])]),
                              "environment": _environment(), "sections": {}}
    shapes = [(), (1,), (7,), (3, 5), (5000,)] if dry else [(), (1,), (7,), (3, 5), (40_001,), (1 << 20,)]
    pairs = [("float32", "float32"), ("bfloat16", "float32"), ("float16", "float32"), ("bfloat16", "bfloat16")]

    def correctness() -> Any:
        rows = check_correctness(device, _fused_via_op, shapes, pairs)
        if dry:  # the Triton kernel itself, in the interpreter, on a few tiny cases
            rows += check_correctness("cpu", _fused_via_triton, [(5,), (4100,)], pairs[:2], steps=2,
                                      kernel="triton interpreter")
        return rows

    def bench_section() -> Any:
        copy_gbs = copy_bandwidth(device, nbytes=(1 << 24) if dry else (1 << 30))
        sizes, rounds = ("2x20000", 2) if dry else ("16m", args.rounds)
        return {"copy_gb_per_s": copy_gbs, "workloads": run_bench(device, sizes, "float32,bfloat16", rounds, copy_gbs)}

    def lowbit_section() -> Any:
        sizes = [(1,), (5,), (3, 43), (1500,)] if dry else [(1,), (5,), (3, 43), (40_001,), (1 << 20,)]
        rows = check_lowbit(device, sizes)
        if dry:  # the Triton kernel itself, in the interpreter
            rows += check_lowbit("cpu", sizes, dry=True)
        return rows

    runners: dict[str, Callable[[], Any]] = {
        "correctness": correctness,
        "lowbit": lowbit_section,
        "cuda_graph": (lambda: {"skipped": "no CUDA graphs on the CPU (dry run)"}) if dry
        else (lambda: check_cuda_graph(device)),
        "compile": lambda: check_compile(device, backend="eager" if dry else "inductor"),
        "bench": bench_section,
    }
    failed = False
    for name in wanted:
        if time.monotonic() > deadline:
            report["sections"][name] = {"ok": False, "error": "skipped: the time budget is spent", "seconds": 0.0}
            failed = True
            _write(report, args.out)
            continue
        start = time.monotonic()
        entry: dict[str, Any] = {}
        try:
            result = runners[name]()
            entry["result"] = result
            entry["ok"] = _all_ok(result)
        except Exception:
            entry["ok"] = False
            entry["error"] = traceback.format_exc(limit=8)
        entry["seconds"] = time.monotonic() - start
        failed |= not entry["ok"]
        report["sections"][name] = entry
        _write(report, args.out)
        print(f"{name}: {'ok' if entry['ok'] else 'FAILED'} ({entry['seconds']:.1f} s)", flush=True)
    print(f"wrote {os.path.join(args.out, 'gpu_check.md')} and gpu_check.json")
    return 1 if failed else 0


def _all_ok(result: Any) -> bool:
    """False when any ``ok`` field inside ``result`` is False (sections without one pass)."""
    if isinstance(result, dict):
        return result.get("ok", True) is not False and all(_all_ok(v) for v in result.values())
    if isinstance(result, list):
        return all(_all_ok(v) for v in result)
    return True


if __name__ == "__main__":
    sys.exit(main())
