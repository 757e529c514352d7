"""Measurements that need a new interpreter each: the first fused step, and forward+backward between steps.

* :func:`first_step`: a process that imports torch and ftmlopt, builds one optimizer over 1M float32
  parameters (FTML with float, 8-bit or 4-bit state, or Adam) and times its first step (kernel
  compilation included) and its second.
* :func:`forward_backward`: a 4x1024 MLP (batch 256) trained with fused FTML (compact) or fused Adam;
  the median forward+backward time between optimizer steps, and torch's thread count before and
  after (an optimizer must not change it).

:func:`fresh` runs one probe in a new interpreter and returns the JSON it prints; :func:`extras` is
the ``ftmlopt bench`` section made of them (two first-step processes per optimizer, then A B A B
forward+backward processes). The child runs this file by path (``python .../probes.py PROBE ARGS``),
not with ``-m``: ``-m`` would import the ``ftmlopt`` package (NumPy included) before the probe's clock
starts, and the ``import+setup`` column counts that import. To add a probe, write a function taking
string arguments and returning a JSON-able dict, and add it to :data:`PROBES`.

Example:
    >>> sorted(PROBES)
    ['first-step', 'forward-backward']
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["PROBES", "extras", "first_step", "forward_backward", "fresh"]

#: the optimizers a probe builds, by the name the tables show
KINDS = ("ftml fused compact", "ftml fused", "ftml fused 8-bit", "ftml fused 4-bit", "adam fused")


def _set_threads(torch: Any, threads: str) -> None:
    if int(threads):
        torch.set_num_threads(int(threads))


def first_step(kind: str, threads: str) -> dict[str, Any]:
    """First and second step of optimizer ``kind`` over 1M params in this (new) process, and its import time."""
    t0 = time.perf_counter()
    import torch

    _set_threads(torch, threads)
    from ftmlopt.torch import FTML

    p = torch.nn.Parameter(torch.randn(1 << 20))
    p.grad = torch.randn(1 << 20)
    bits = int(kind.split()[-1].removesuffix("-bit")) if kind.endswith("-bit") else 32
    opt = (torch.optim.Adam([p], fused=True) if kind == "adam fused"
           else FTML([p], fused=True, compact=kind != "ftml fused", state_bits=bits))
    t1 = time.perf_counter()
    opt.step()
    t2 = time.perf_counter()
    opt.step()
    t3 = time.perf_counter()
    return {"first_step_s": t2 - t1, "second_step_s": t3 - t2, "import_s": t1 - t0}


def forward_backward(kind: str, threads: str, steps: str) -> dict[str, Any]:
    """Median forward+backward ms of a 4x1024 MLP between ``kind`` steps (the first two excluded)."""
    import torch

    _set_threads(torch, threads)
    before = torch.get_num_threads()
    from ftmlopt.torch import FTML

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[m for _ in range(4) for m in (torch.nn.Linear(1024, 1024), torch.nn.ReLU())])
    x = torch.randn(256, 1024)
    opt = (torch.optim.Adam(model.parameters(), lr=1e-4, fused=True) if kind == "adam fused"
           else FTML(model.parameters(), lr=1e-4, fused=True, compact=True))
    times = []
    for i in range(int(steps)):
        t0 = time.perf_counter()
        model(x).square().mean().backward()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad()
        if i >= 2:
            times.append(t1 - t0)
    return {"fwd_bwd_ms": 1e3 * statistics.median(times), "threads_before": before,
            "threads_after": torch.get_num_threads()}


#: the probes a child process can run, by name
PROBES: dict[str, Callable[..., dict[str, Any]]] = {"first-step": first_step, "forward-backward": forward_backward}


def fresh(probe: str, *argv: str) -> dict[str, Any]:
    """Run ``probe`` with ``argv`` in a new interpreter; its dict, or ``{"error": last stderr line}``."""
    env = dict(os.environ)
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    res = subprocess.run([sys.executable, os.path.abspath(__file__), probe, *argv], capture_output=True, text=True,
                         env=env, timeout=600)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"}
    parsed: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return parsed


def extras(threads: int) -> dict[str, Any]:
    """First fused step of new processes, and forward+backward after fused FTML vs fused Adam steps."""
    n = str(threads)
    first = {kind: [fresh("first-step", kind, n) for _ in range(2)] for kind in KINDS}
    fwd: dict[str, list[dict[str, Any]]] = {"adam fused": [], "ftml fused compact": []}
    for _ in range(2):  # alternate fresh processes: A B A B
        for kind in fwd:
            fwd[kind].append(fresh("forward-backward", kind, n, "12"))
    return {"first_step": first, "forward_backward": fwd}


def _main(argv: list[str]) -> int:
    if not argv or argv[0] not in PROBES:
        print(f"usage: probes.py {{{','.join(PROBES)}}} ARGS...", file=sys.stderr)
        return 2
    print(json.dumps(PROBES[argv[0]](*argv[1:])))
    return 0


if __name__ == "__main__":
    # Run by path, Python puts this file's folder first on sys.path: drop it, so that the bench's
    # module names (timing, report, ...) cannot shadow anything torch imports.
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        del sys.path[0]
    sys.exit(_main(sys.argv[1:]))
