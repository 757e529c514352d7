"""The tables ``ftmlopt bench`` prints (markdown), and the machine facts recorded with them.

:func:`table` renders one workload's rows from :func:`ftmlopt.bench.timing.summarize`;
:func:`extras_table` the fresh-process probes of :mod:`ftmlopt.bench.probes`; :func:`header` the
lines above the tables (command, device, threads, torch, load average before and after).

Example:
    >>> row = {"name": "adam fused", "median_ms": 2.0, "min_ms": 1.5, "max_ms": 3.0, "gb_per_s": 14.0,
    ...        "ratio_to_fused_adam": 1.0, "bandwidth_vs_fused_adam": 1.0, "percent_of_floor": 80.0,
    ...        "state_bytes_per_param": 8.0, "peak_extra_bytes": 2048}
    >>> print(table({"workload": "w", "dtype": "float32", "tensors": 1, "elements": 1000, "results": [row]})
    ...       .splitlines()[-1])
    | adam fused | 2.00 | 1.50-3.00 | 14.0 | 1.00 | 100% | 80 | 8 | 2.0 KB |
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from typing import Any

__all__ = ["device_name", "extras_table", "format_bytes", "header", "load_average", "table"]

_COLUMNS = ["implementation", "median ms", "min-max ms", "GB/s", "x fused Adam", "B/s vs fused Adam", "% floor",
            "state B/param", "peak extra"]


def table(result: dict[str, Any]) -> str:
    """One workload's markdown table (a row per implementation; one that did not run says why)."""
    head = f"{result['workload']} {result['dtype']}: {result['tensors']} tensors, {result['elements']:,} elements"
    cols = _COLUMNS
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
            opt("percent_of_floor", ".0f"), opt("state_bytes_per_param", ".3g"),
            "-" if peak is None else format_bytes(peak),
        ]) + " |")
    return "\n".join(lines)


def format_bytes(n: float) -> str:
    """``n`` bytes in B, KB, MB or GB (powers of 1024).

    Example:
        >>> format_bytes(512), format_bytes(3 * 1024 ** 2)
        ('512 B', '3.0 MB')
    """
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def extras_table(extras: dict[str, Any]) -> str:
    """The first-step and forward+backward tables of :func:`ftmlopt.bench.probes.extras`'s result."""
    lines = ["first step of a new process (1M float32 params; kernel compilation included; two processes)", "",
             "| optimizer | first step s | second step s | import+setup s |", "|---|---|---|---|"]
    lines += _run_rows(extras["first_step"], 3,
                       lambda r: f"{r['first_step_s']:.3f} | {r['second_step_s']:.4f} | {r['import_s']:.2f}")
    lines += ["", "forward+backward of a 4x1024 MLP (batch 256) between optimizer steps, fresh processes A B A B", "",
              "| optimizer | fwd+bwd ms (median) | torch threads before -> after |", "|---|---|---|"]
    lines += _run_rows(extras["forward_backward"], 2,
                       lambda r: f"{r['fwd_bwd_ms']:.1f} | {r['threads_before']} -> {r['threads_after']}")
    return "\n".join(lines)


def _run_rows(runs: dict[str, list[dict[str, Any]]], columns: int, cells: Callable[[dict[str, Any]], str]) -> list[str]:
    """A table row per run, ``| kind | cells(run) |``; a failed run's error fills the first of its ``columns``."""
    return [f"| {kind} | error: {r['error']} |" + " |" * (columns - 1) if "error" in r else f"| {kind} | {cells(r)} |"
            for kind, kind_runs in runs.items() for r in kind_runs]


def header(report: dict[str, Any]) -> str:
    """The lines printed above the tables, from the report's ``command``, ``device_name``, ``threads``,
    ``torch`` and load averages."""
    return (f"{report['command']}\n{report['device_name']}, {report['threads']} threads, torch {report['torch']}, "
            f"load average {report['load_average_before']} before, {report['load_average_after']} after\n")


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (rounded to 0.01), or None where the platform has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not available on this platform
        return None


def device_name(device: str) -> str:
    """The GPU's name for a CUDA device, else the CPU model from ``/proc/cpuinfo`` (or ``platform``)."""
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
