"""The fused CPU kernels run on torch's own OpenMP team, and fall back to a private pool where they must.

Thread state is per process, so every case runs in a fresh interpreter. Where torch's ATen does
not run on GNU libgomp (another build of torch), the team cases are expected to report the pool.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ftmlopt.kernels import cpu

pytestmark = pytest.mark.skipif(not cpu.AVAILABLE, reason="the CPU kernels need llvmlite")

_ON_TEAM = r"""
import json, os, torch
on_team = ("ATen parallel backend: OpenMP" in torch.__config__.parallel_info()
           and any("/libgomp" in line for line in open("/proc/self/maps")))
"""


def _python(code: str, env: dict[str, str] | None = None, timeout: float = 240) -> dict:
    full_env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_THREAD_LIMIT")}
    full_env.update(env or {})
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                         timeout=timeout)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_a_child_forked_after_the_team_ran_falls_back_to_the_pool_and_finishes() -> None:
    # GNU libgomp is not fork-safe: the child's next parallel region would wait for the parent's
    # team threads, which do not exist in the child. The child must step anyway (on the pool).
    code = _ON_TEAM + r"""
import numpy as np
torch.set_num_threads(2)
from ftmlopt.kernels import cpu
from ftmlopt.torch import FTML
gen = torch.Generator().manual_seed(0)
p = torch.nn.Parameter(torch.randn(1 << 19, generator=gen)); p.grad = torch.randn(1 << 19, generator=gen)
opt = FTML([p], fused=True)
opt.step()  # on the team (torch's libgomp has threads now)
parent = cpu.backend()
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    child = cpu.backend()
    opt.step()
    os.write(w, json.dumps({"child": child, "finite": bool(np.isfinite(p.detach().numpy()).all())}).encode())
    os._exit(0)
_, status = os.waitpid(pid, 0)
got = json.loads(os.read(r, 1 << 16))
print(json.dumps({"on_team": on_team, "parent": parent, "status": os.waitstatus_to_exitcode(status), **got}))
"""
    out = _python(code, timeout=120)
    assert out["status"] == 0 and out["finite"]
    assert out["parent"] == ("openmp" if out["on_team"] else "pool")
    assert out["child"] == "pool"


def test_without_torch_the_operator_uses_the_private_pool_bit_for_bit() -> None:
    code = r"""
import json, sys, threading
import numpy as np
from ftmlopt import ftml_update
from ftmlopt.kernels import cpu
from ftmlopt.mxnet.operator import _numpy_kernel, prepare_scalars
rng = np.random.default_rng(0)
n = 1 << 18
w, g = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
states = [np.zeros(n, np.float32) for _ in range(3)]
ref = [a.copy() for a in (w, g, *states)]
out = ftml_update(w, g, *states, lr=0.1, t=1, out=w)
s = prepare_scalars(np.float32, 0.1, 1, 0.6, 0.999, 1e-8, 0.0, 1.0, -1.0)
want = _numpy_kernel(ref[0], ref[1], ref[2], ref[3], ref[4], None, s)
workers = [t.name for t in threading.enumerate() if t.name.startswith("ftmlopt-cpu")]
print(json.dumps({"torch": "torch" in sys.modules, "backend": cpu.backend(), "workers": len(workers),
                  "same": out.tobytes() == want.tobytes() and all(
                      a.tobytes() == b.tobytes() for a, b in zip(states, ref[2:]))}))
"""
    out = _python(code, env={"OMP_NUM_THREADS": "2"})
    assert out == {"torch": False, "backend": "pool", "workers": 1, "same": True}


def test_a_team_smaller_than_asked_still_steps_every_piece_once() -> None:
    # OMP_THREAD_LIMIT=2 caps any team at 2: asked for 3, the body splits by the 2 members it gets
    code = _ON_TEAM + r"""
import numpy as np
from ftmlopt import rule
from ftmlopt.kernels import cpu
rng = np.random.default_rng(1)
sizes = [70_000, 1, 200_003, 65_536, 9]
ws = [rng.standard_normal(n) for n in sizes]
gs = [rng.standard_normal(n) for n in sizes]
vs = [np.abs(rng.standard_normal(n)) for n in sizes]
want = [(w.copy(), v.copy()) for w, v in zip(ws, vs)]
c = rule.constants(0.01, 3, 0.6, 0.999, 1e-8, weight_decay=0.01)
trace = np.full(9, -1, np.int64)
real = cpu.run
cpu.run = lambda *a: real(*a, trace=trace)
cpu.step_arrays(ws, gs, vs, c, compact=True, threads=3)
same = True
for (w0, v0), g, w, v in zip(want, gs, ws, vs):
    w1, v1 = rule.compact_step(w0, g, v0, c, sqrt=np.sqrt, clip=np.clip)
    same &= w1.tobytes() == w.tobytes() and v1.tobytes() == v.tobytes()
print(json.dumps({"on_team": on_team, "trace": trace.reshape(3, 3)[:, :2].tolist(), "same": bool(same)}))
"""
    out = _python(code, env={"OMP_THREAD_LIMIT": "2"})
    assert out["same"]
    if out["on_team"]:
        assert out["trace"] == [[0, 2], [1, 2], [-1, -1]]
    else:
        assert out["trace"] == [[-1, -1]] * 3


def test_trace_buffer_too_small_is_refused_before_the_team_is_entered() -> None:
    from ftmlopt.kernels import omp_team

    never = omp_team.Team("unused", None, 0, 0, 0)  # refused before anything is called
    one = np.zeros(1, np.int64)
    with pytest.raises(ValueError, match=r"trace must be a contiguous int64 array of >= 6 entries"):
        omp_team.launch(never, None, one, one, one, one, 2, trace=np.zeros(5, np.int64))
