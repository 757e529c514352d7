"""The fused CPU step leaves the process's thread settings alone and uses torch's thread count.

Each case runs in a fresh interpreter, because thread settings are process-wide and an earlier
test (or torch's own start-up) would otherwise decide the outcome.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_SCRIPT = r"""
import json, os, sys, threading
import torch
setting = sys.argv[1]
if setting != "none":
    torch.set_num_threads(int(setting))
# torch's own optimizer machinery sets a few things on its first step (TORCHINDUCTOR_CACHE_DIR):
# take one torch.optim.Adam step first, so that what follows compares FTML's effect alone
_w = torch.nn.Parameter(torch.ones(4)); _w.grad = torch.ones(4); torch.optim.Adam([_w]).step()
before = {"threads": torch.get_num_threads(), "interop": torch.get_num_interop_threads(), "env": dict(os.environ)}
# torch's OpenMP team: the threads a parallel ATen op adds to this fresh process
tasks_before_op = set(os.listdir("/proc/self/task"))
(torch.randn(1 << 22) * 2).sum()
tasks_before = set(os.listdir("/proc/self/task"))
import numpy as np
from ftmlopt.kernels import cpu
from ftmlopt.torch import FTML
seen, traces, optimizer_calls = [], [], []
real_run, real_prepared = cpu.run, cpu.Prepared.__call__
def spy(fn, ptrs, counts, coefs, k, threads):
    seen.append(threads)
    trace = np.full(3 * threads, -1, np.int64)
    real_run(fn, ptrs, counts, coefs, k, threads, trace=trace)
    traces.append(trace.reshape(threads, 3).tolist())
def spy_prepared(self, threads):  # the optimizer's fused step calls a prepared kernel call
    optimizer_calls.append(threads)
    seen.append(threads)
    trace = np.full(3 * threads, -1, np.int64)
    real_prepared(self, threads, trace=trace)
    traces.append(trace.reshape(threads, 3).tolist())
cpu.run = spy
cpu.Prepared.__call__ = spy_prepared
gen = torch.Generator().manual_seed(0)
params = [torch.nn.Parameter(torch.randn(1 << 19, generator=gen)) for _ in range(2)]
for compact in (True, False):
    opt = FTML(params, lr=1e-3, fused=True, compact=compact)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
# the MXNet operator's path too (NumPy arrays, threads from torch since torch is loaded)
from ftmlopt import ftml_update
w = np.ones(1 << 18, np.float32)
ftml_update(w, np.full_like(w, 0.5), *(np.zeros_like(w) for _ in range(3)), lr=0.1, t=1, out=w)
after = {"threads": torch.get_num_threads(), "interop": torch.get_num_interop_threads(), "env": dict(os.environ)}
workers = [t.name for t in threading.enumerate() if t.name.startswith("ftmlopt-cpu")]
print(json.dumps({"before": before, "after": after, "seen": seen, "workers": workers, "traces": traces,
                  "optimizer_calls": optimizer_calls,
                  "team": sorted(map(int, tasks_before - tasks_before_op)), "main": threading.get_native_id(),
                  "new_tasks": sorted(set(os.listdir("/proc/self/task")) - tasks_before),
                  "aten_openmp": "ATen parallel backend: OpenMP" in torch.__config__.parallel_info(),
                  "libgomp": any("/libgomp" in line for line in open("/proc/self/maps")),
                  "numba_loaded": "numba" in sys.modules, "finite": all(bool(p.isfinite().all()) for p in params)}))
"""


def _run(setting: str, omp: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if omp is not None:
        env["OMP_NUM_THREADS"] = omp
    res = subprocess.run([sys.executable, "-c", _SCRIPT, setting], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("setting", "omp", "expected"),
    [("none", None, None), ("none", "1", 1), ("1", None, 1), ("2", None, 2), ("3", "1", 3)],
)
def test_fused_step_keeps_thread_settings_and_uses_torchs_count(setting, omp, expected) -> None:
    out = _run(setting, omp)
    before, after = out["before"], out["after"]
    assert after == before  # torch's intra-op and inter-op counts and the environment are untouched
    if expected is not None:
        assert before["threads"] == expected
    threads = before["threads"]
    assert out["seen"] and all(n == threads for n in out["seen"]), out["seen"]
    assert len(out["optimizer_calls"]) == 6, out["optimizer_calls"]  # 2 forms x 3 steps, each traced
    on_team = out["aten_openmp"] and out["libgomp"]  # torch's wheels: ATen on GNU libgomp
    if threads == 1:
        # one thread: the calling thread alone, no team entered, no thread started
        assert all(row[0] == -1 for trace in out["traces"] for row in trace), out["traces"]
        assert out["new_tasks"] == [] and out["workers"] == []
    elif on_team:
        # every multi-threaded step ran on torch's OpenMP team: member 0 is the calling thread, the
        # others are exactly the threads a parallel ATen op had started; no thread of our own exists
        assert len(out["team"]) == threads - 1, out["team"]
        for trace in out["traces"]:
            assert [row[:2] for row in trace] == [[i, threads] for i in range(threads)], trace
            assert trace[0][2] == out["main"]
            assert sorted(row[2] for row in trace[1:]) == out["team"], (trace, out["team"])
        assert out["new_tasks"] == [] and out["workers"] == []
    else:
        # another runtime: the private pool, never more workers than the extra threads of a step
        assert 1 <= len(out["workers"]) <= threads - 1
    assert not out["numba_loaded"]  # no Numba threading layer (OpenMP) is started by the fused path
    assert out["finite"]


def test_a_forked_child_steps_with_its_own_workers() -> None:
    code = r"""
import os, sys, torch
torch.set_num_threads(2)
from ftmlopt.torch import FTML
p = torch.nn.Parameter(torch.randn(1 << 19)); p.grad = torch.randn(1 << 19)
opt = FTML([p], fused=True)
opt.step()  # the parent's worker pool exists now
pid = os.fork()
if pid == 0:
    opt.step()  # would wait forever on the parent's (absent) worker threads
    import numpy as np  # (not a torch op: torch's own OpenMP regions are not fork-safe)
    os._exit(0 if bool(np.isfinite(p.detach().numpy()).all()) else 3)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "0"
