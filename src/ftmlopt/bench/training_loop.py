r"""The optimizer step timed inside a training loop: the number a user sees.

A step timed alone runs on cores nobody else is using. In training it follows a backward pass,
whose ATen OpenMP threads keep spinning on the cores for a while after each op, so a kernel that
brings threads of its own competes with them. This measurement puts a forward and a backward pass
of an MLP (``depth`` x ``Linear(width, width)`` with ReLU, ``batch`` rows, MSE loss: 4 x 2048 x
2048 is 16.8M parameters, the size of the isolated ``16m`` workload) between steps and times only
``optimizer.step()``. Each implementation trains its own copy of the same model on the same
batch; every round runs each implementation once, in alternating order (A B C, C B A, ...), and
the per-round ratio to ``torch.optim.Adam(fused=True)`` is reported as a median.

Example:
    >>> from ftmlopt.bench import training_loop
    >>> res = training_loop.measure(rounds=2, warmup=1, width=8, depth=2, batch=4)
    >>> sorted(res["rows"]) == sorted(training_loop.IMPLEMENTATIONS)
    True
    >>> res["rows"]["adam fused"]["x_fused_adam"]
    1.0
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["IMPLEMENTATIONS", "POOL", "from_args", "measure", "table"]

#: what is timed, by name: FTML's default (compact) and three-state fused steps, and the reference
IMPLEMENTATIONS = ("ftml fused compact", "ftml fused", "adam fused")


#: not run by default: the default step on the kernels' private thread pool instead of torch's
#: OpenMP team (how the kernels ran before they shared the team), to compare the two in one run
POOL = "ftml fused compact pool"


class _OnPool:
    """An optimizer whose steps run the CPU kernels on their private pool (torch's team hidden meanwhile)."""

    def __init__(self, opt: Any) -> None:
        self.opt = opt

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        from ftmlopt.kernels import omp_team

        team = omp_team.team
        omp_team.team = lambda: None
        try:
            self.opt.step()
        finally:
            omp_team.team = team


def _optimizer(name: str, params: Any) -> Any:
    import torch

    from ftmlopt.torch import FTML

    if name == "adam fused":
        return torch.optim.Adam(params, lr=1e-4, fused=True)
    if name in ("ftml fused compact", "ftml fused"):
        return FTML(params, lr=1e-4, fused=True, compact=name.endswith("compact"))
    if name == POOL:
        return _OnPool(FTML(params, lr=1e-4, fused=True, compact=True))
    raise ValueError(f"unknown implementation {name!r}; known: {', '.join((*IMPLEMENTATIONS, POOL))}")


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not available on this platform
        return None


def measure(
    rounds: int = 10, warmup: int = 2, *, width: int = 2048, depth: int = 4, batch: int = 32,
    implementations: Sequence[str] = IMPLEMENTATIONS, seed: int = 0,
) -> dict[str, Any]:
    """Time ``optimizer.step()`` between forward/backward passes, implementations interleaved.

    Returns a dict: per implementation (``rows``) the median, min and max step time in ms, the
    median per-round ratio to fused Adam (``x_fused_adam``) and the median forward+backward time;
    plus the settings, torch's thread count before and after, the load average before and after,
    and where the fused CPU kernels ran (``ftmlopt.kernels.cpu.backend()``).
    """
    import torch

    from ftmlopt.kernels import cpu

    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got {rounds} and {warmup}")
    if min(width, depth, batch) < 1:
        raise ValueError(f"width, depth and batch must be >= 1, got {width}, {depth}, {batch}")
    names = list(implementations)
    if "adam fused" not in names:
        names.append("adam fused")
    threads_before = torch.get_num_threads()
    load_before = _load()
    gen = torch.Generator().manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    template = torch.nn.Sequential(*layers[:-1])
    with torch.no_grad():
        for p in template.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / width ** 0.5)
    x = torch.randn(batch, width, generator=gen)
    y = torch.randn(batch, width, generator=gen)
    runs: dict[str, tuple[torch.nn.Module, Any]] = {}
    for name in names:
        model = torch.nn.Sequential(*[torch.nn.Linear(width, width) if isinstance(m, torch.nn.Linear)
                                      else torch.nn.ReLU() for m in template])
        model.load_state_dict(template.state_dict())
        runs[name] = (model, _optimizer(name, model.parameters()))

    def one(name: str) -> tuple[float, float]:
        model, opt = runs[name]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        torch.nn.functional.mse_loss(model(x), y).backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        return t2 - t1, t1 - t0

    step_ms: dict[str, list[float]] = {n: [] for n in names}
    fwd_ms: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        order: list[str] = names if r % 2 == 0 else names[::-1]
        for name in order:
            step, fwd = one(name)
            if r >= warmup:
                step_ms[name].append(1e3 * step)
                fwd_ms[name].append(1e3 * fwd)
    ref = step_ms["adam fused"]
    rows = {
        name: {
            "median_ms": statistics.median(step_ms[name]), "min_ms": min(step_ms[name]),
            "max_ms": max(step_ms[name]),
            "x_fused_adam": statistics.median(a / b for a, b in zip(step_ms[name], ref)),
            "fwd_bwd_ms": statistics.median(fwd_ms[name]), "step_ms": step_ms[name],
        }
        for name in names
    }
    return {
        "model": f"{depth} x Linear({width}, {width}), batch {batch}",
        "parameters": sum(p.numel() for p in template.parameters()),
        "rounds": rounds, "warmup": warmup, "threads_before": threads_before,
        "threads_after": torch.get_num_threads(), "kernel_threads": cpu.backend(),
        "load_average_before": load_before, "load_average_after": _load(), "rows": rows,
    }


def table(result: dict[str, Any]) -> str:
    """A markdown table of :func:`measure`'s result.

    Example:
        >>> from ftmlopt.bench import training_loop
        >>> print(training_loop.table(training_loop.measure(1, 0, width=4, depth=1, batch=2)).splitlines()[0])
        ... # doctest: +ELLIPSIS
        step inside a training loop (1 x Linear(4, 4), batch 2; 20 parameters; ...
    """
    lines = [
        f"step inside a training loop ({result['model']}; {result['parameters']:,} parameters; forward+backward "
        f"between steps, only the step timed; {result['rounds']} rounds; kernels on {result['kernel_threads']}; "
        f"torch threads {result['threads_before']} -> {result['threads_after']}; load average "
        f"{result['load_average_before']} before, {result['load_average_after']} after)",
        "",
        "| implementation | median ms | min-max ms | x fused Adam | fwd+bwd ms |",
        "|---|---|---|---|---|",
    ]
    for name, row in result["rows"].items():
        lines.append(f"| {name} | {row['median_ms']:.2f} | {row['min_ms']:.2f}-{row['max_ms']:.2f} | "
                     f"{row['x_fused_adam']:.2f} | {row['fwd_bwd_ms']:.1f} |")
    return "\n".join(lines)


def from_args(args: Any) -> dict[str, Any] | None:
    """What ``ftmlopt bench`` calls: :func:`measure` with ``--training-loop`` rounds (None when 0 or not on CPU)."""
    rounds = int(getattr(args, "training_loop", 0) or 0)
    if rounds <= 0 or getattr(args, "device", "cpu") != "cpu" or getattr(args, "no_extras", False):
        return None
    return measure(rounds, warmup=min(2, max(0, int(getattr(args, "warmup", 2)))))

