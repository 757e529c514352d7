"""``ftmlopt bench`` / ``python -m ftmlopt.bench``: the options, and the run that ties the modules together.

:func:`run` checks the options, times each (workload, dtype) pair with
:func:`ftmlopt.bench.timing.bench_workload`, runs the fresh-process probes of
:mod:`ftmlopt.bench.probes` (unless ``--no-extras``; CPU only), prints the tables of
:mod:`ftmlopt.bench.report` and writes the strict JSON report.

Example:
    >>> parse_dtypes("float32, bfloat16")
    ['float32', 'bfloat16']
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Sequence
from typing import Any

from ftmlopt._json import write_json
from ftmlopt.bench import probes, report, training_loop
from ftmlopt.bench.timing import NoProgress, bench_workload
from ftmlopt.bench.workloads import WORKLOADS

__all__ = ["add_arguments", "main", "parse_dtypes", "parse_sizes", "run"]


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


def parse_dtypes(text: str) -> list[str]:
    """``"float32,bfloat16"`` -> ``["float32", "bfloat16"]``; raises ValueError naming a bad item."""
    allowed = ("float32", "float64", "float16", "bfloat16")
    out = [d.strip() for d in text.split(",") if d.strip()]
    for d in out:
        if d not in allowed:
            raise ValueError(f"--dtype: unknown dtype {d!r} (use {', '.join(allowed)})")
    if not out:
        raise ValueError(f"--dtype: no dtype given in {text!r}")
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


def _progress(total: int, quiet: bool) -> Any:
    if not quiet:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc="bench rounds", unit="round", file=sys.stderr)
        except ImportError:
            pass
    return NoProgress()


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
    progress = _progress(len(plan) * (args.rounds + args.warmup), args.quiet)
    load_before = report.load_average()
    results = []
    try:
        for name, shapes, dt in plan:
            results.append(bench_workload(name, shapes, dt, args, progress))
    finally:
        progress.close()
    extras = None if args.no_extras or args.device != "cpu" else probes.extras(args.threads)
    loop = training_loop.from_args(args)  # None with --no-extras, --training-loop 0 or on CUDA
    out = {
        "command": "ftmlopt bench " + " ".join(_argv_of(args)),
        "device": args.device,
        "device_name": report.device_name(args.device),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": report.load_average(),
        "dtypes": dtypes,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "workloads": results,
        "extras": extras,
        "training_loop": loop,
    }
    print(report.header(out))
    for res in results:
        print(report.table(res), end="\n\n")
    if extras is not None:
        print(report.extras_table(extras), end="\n\n")
    if loop is not None:
        print(training_loop.table(loop), end="\n\n")
    if args.json:
        write_json(out, args.json, indent=2)
        print(f"wrote {args.json}")
    return 0


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


DESCRIPTION = "Every FTML implementation against torch.optim.Adam, in one interleaved run."


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ftmlopt.bench [options]``: the same as ``ftmlopt bench``."""
    parser = argparse.ArgumentParser(prog="python -m ftmlopt.bench", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
