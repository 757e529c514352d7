"""Soak: 100,000 FTML steps on small tensors, the for-loop and the fused paths side by side.

What is measured (and asserted):

* drift: ``ftmlopt.torch.FTML`` with ``fused=True`` (the compiled CPU kernel) against the readable for-loop
  (``foreach=False, fused=False``), both float32, stepping a noisy quadratic in lockstep, each with
  the gradient of its own weights. The two differ by rounding only (the kernel evaluates the same
  formula in another order of float32 operations); on a contracting objective those differences
  must stay at rounding level instead of accumulating: at every 10,000-step checkpoint the weights
  agree within ``DRIFT_RTOL`` (relative to the weights' scale) and the state (``v``; MXNet form:
  ``d``, ``v``, ``z``) within ``STATE_RTOL`` (element-wise relative). Both forms: the compact default
  and ``compact=False``. The same runs in float64 (10,000 steps) must agree within 1e-12.
* the MXNet operator: the NumPy kernel and the compiled kernel of :func:`ftmlopt.ftml_update`
  (both in MXNet's order of operations) stay bit-identical for ``OPERATOR_STEPS`` steps.
* memory: no growth. The resident set size after the last step is within ``RSS_SLACK`` of its value
  after the first 10,000 steps, and ``tracemalloc`` sees less than ``TRACED_SLACK`` bytes of new
  Python allocations over 20,000 further steps.

The kernels' thread pool is limited to one thread here: the tensors are tiny and the point is the
arithmetic and the memory, not the parallel speed-up (on a loaded 2-core machine the pool's
synchronisation costs more than the work).
"""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import Iterator

import numpy as np
import pytest
import torch

import ftmlopt
from ftmlopt.torch import FTML

STEPS = 100_000
CHECK_EVERY = 10_000
#: documented float32 tolerance between the fused and the for-loop paths (see docs/distributed.md)
DRIFT_RTOL = 1e-5
STATE_RTOL = 1e-4
RSS_SLACK = 16 * 2**20
TRACED_SLACK = 256 * 2**10
TRACED_STEPS = 5_000
OPERATOR_STEPS = 30_000

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # the CPU kernels use torch.get_num_threads() threads at each step
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)


def _rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _problem(dtype: torch.dtype, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2026)
    target = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    noise = (0.3 * torch.randn(512, n, generator=gen, dtype=torch.float64)).to(dtype)
    return target, noise


def _pair(dtype: torch.dtype, compact: bool) -> tuple[list[torch.nn.Parameter], list[FTML], list[torch.Tensor]]:
    params = [torch.nn.Parameter(torch.zeros(16, dtype=dtype)) for _ in range(2)]
    opts = [FTML([params[0]], lr=0.01, weight_decay=1e-4, compact=compact, foreach=False, fused=False),
            FTML([params[1]], lr=0.01, weight_decay=1e-4, compact=compact, fused=True)]
    grads = [torch.empty(16, dtype=dtype) for _ in params]
    for p, g in zip(params, grads):
        p.grad = g
    return params, opts, grads


def _run(params, opts, grads, target, noise, first: int, last: int) -> None:
    for i in range(first, last):
        row = noise[i & 511]
        for p, o, g in zip(params, opts, grads):
            torch.sub(p.detach(), target, out=g)  # gradient of 0.5 |w - target|^2, plus noise
            g.add_(row)
            o.step()


def _drift(params, opts) -> tuple[float, dict[str, float]]:
    loop, fused = params
    scale = loop.detach().abs().max().item()
    w_err = (fused.detach() - loop.detach()).abs().max().item() / scale
    s_loop, s_fused = opts[0].state[loop], opts[1].state[fused]
    state_err = {}
    assert sorted(s_loop) == sorted(s_fused)
    for k in sorted(set(s_loop) - {"step"}):
        a, b = s_fused[k].double(), s_loop[k].double()
        state_err[k] = ((a - b).abs() / b.abs().clamp_min(1e-30)).max().item()
    assert s_loop["step"].item() == s_fused["step"].item()
    return w_err, state_err


@pytest.mark.parametrize("compact", [True, False], ids=["compact", "mxnet"])
def test_fused_and_forloop_do_not_drift_and_memory_stays_flat(compact: bool) -> None:
    target, noise = _problem(torch.float32)
    params, opts, grads = _pair(torch.float32, compact)
    history = []
    rss_start = None
    for first in range(0, STEPS, CHECK_EVERY):
        _run(params, opts, grads, target, noise, first, first + CHECK_EVERY)
        w_err, s_err = _drift(params, opts)
        history.append((first + CHECK_EVERY, w_err, s_err))
        assert w_err <= DRIFT_RTOL, history
        assert max(s_err.values()) <= STATE_RTOL, history
        if rss_start is None:
            rss_start = _rss()
    assert opts[0].state[params[0]]["step"].item() == STEPS
    # The run converged to the noisy optimum (the comparison is not between two frozen runs).
    assert (params[0].detach() - target).abs().max().item() < 1.0
    rss_growth = _rss() - rss_start
    assert rss_growth < RSS_SLACK, f"RSS grew by {rss_growth / 2**20:.1f} MiB over {STEPS - CHECK_EVERY} steps"

    tracemalloc.start()
    try:
        _run(params, opts, grads, target, noise, 0, 1_000)  # warm caches before the baseline
        base, _ = tracemalloc.get_traced_memory()
        _run(params, opts, grads, target, noise, 0, TRACED_STEPS)
        now, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert now - base < TRACED_SLACK, f"Python allocations grew by {now - base} bytes over {TRACED_STEPS} steps"
    print(f"drift history (step, w rel err, state rel err): {history}; RSS growth {rss_growth} B; "
          f"traced growth {now - base} B")


@pytest.mark.parametrize("compact", [True, False], ids=["compact", "mxnet"])
def test_float64_paths_agree_to_1e_12(compact: bool) -> None:
    target, noise = _problem(torch.float64)
    params, opts, grads = _pair(torch.float64, compact)
    _run(params, opts, grads, target, noise, 0, 10_000)
    w_err, s_err = _drift(params, opts)
    print(f"float64 after 10,000 steps: w rel err {w_err:.3e}, state rel err {s_err}")
    assert w_err <= 1e-12 and max(s_err.values()) <= 1e-10, (w_err, s_err)


def test_operator_numpy_and_compiled_kernels_stay_bit_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    from ftmlopt.mxnet import _kernel
    from ftmlopt.mxnet import operator as op

    assert _kernel.AVAILABLE
    rng = np.random.default_rng(7)
    target = rng.normal(size=16).astype(np.float32)
    noise = (0.3 * rng.normal(size=(512, 16))).astype(np.float32)
    runs = {}
    for name, kernel in (("numpy", op._numpy_kernel), ("compiled", _kernel.operator_kernel)):
        monkeypatch.setattr(op, "_select_kernel", lambda arrays, k=kernel: k)
        w, d, v, z = (np.zeros(16, np.float32) for _ in range(4))
        g = np.empty(16, np.float32)
        for t in range(1, OPERATOR_STEPS + 1):
            np.subtract(w, target, out=g)
            g += noise[t & 511]
            ftmlopt.ftml_update(w, g, d, v, z, lr=0.01, t=t, wd=1e-4, clip_grad=2.0, out=w)
        runs[name] = (w, d, v, z)
    for a, b in zip(runs["numpy"], runs["compiled"]):
        assert a.tobytes() == b.tobytes()
    assert np.abs(runs["numpy"][0] - target).max() < 1.0
