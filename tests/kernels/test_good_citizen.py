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
from ftmlopt.kernels import cpu
from ftmlopt.torch import FTML
seen = []
real_run = cpu.run
def spy(fn, ptrs, counts, coefs, k, threads):
    seen.append(threads)
    return real_run(fn, ptrs, counts, coefs, k, threads)
cpu.run = spy
gen = torch.Generator().manual_seed(0)
params = [torch.nn.Parameter(torch.randn(1 << 19, generator=gen)) for _ in range(2)]
for compact in (True, False):
    opt = FTML(params, lr=1e-3, fused=True, compact=compact)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
# the MXNet operator's path too (NumPy arrays, threads from torch since torch is loaded)
import numpy as np
from ftmlopt import ftml_update
w = np.ones(1 << 18, np.float32)
ftml_update(w, np.full_like(w, 0.5), *(np.zeros_like(w) for _ in range(3)), lr=0.1, t=1, out=w)
after = {"threads": torch.get_num_threads(), "interop": torch.get_num_interop_threads(), "env": dict(os.environ)}
workers = [t.name for t in threading.enumerate() if t.name.startswith("ftmlopt-cpu")]
print(json.dumps({"before": before, "after": after, "seen": seen, "workers": workers,
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
    # workers are the extra threads of the step (the calling thread is one): never more
    assert len(out["workers"]) <= threads - 1
    if threads > 1:
        assert out["workers"], "a 1M-element step with several threads should use the worker pool"
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
