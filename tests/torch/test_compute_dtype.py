"""Every torch path computes in ``rule.compute_dtype(param dtype, state dtype)``, step by step, bit for bit.

The for-loop (``foreach=False``), foreach and the fused CPU kernel are each stepped a few times with a
changing learning rate; before every step the path's own weights and state are read, one step of
:func:`ftmlopt.rule.compact_step` / :func:`ftmlopt.rule.mxnet_step` is evaluated on them in NumPy in
the decided compute dtype (the constants cast once with :meth:`ftmlopt.rule.Constants.cast`), and
the path's new weights and state must equal that step rounded to the stored dtypes, bit for bit.

Bit-exact is the right bar here: every path evaluates the rule's operations in the rule's order in
IEEE arithmetic of the compute dtype (``+ - * /`` correctly rounded, no FMA contraction, each
constant rounded once to the compute dtype), and NumPy does the same. The one primitive that is not
the same is ``sqrt``, which the rule takes as an argument: the fused kernel uses LLVM's correctly
rounded ``sqrt`` (NumPy's ``np.sqrt``), while torch's CPU ``torch.sqrt`` is not correctly rounded
(measured with torch 2.13 on an AVX-512 CPU: 1 ulp off for about 17% of float32 inputs and 1.3% of
float64 inputs). So the rule is handed ``np.sqrt`` for the fused path and torch's own ``sqrt`` (applied
to an array of the same shape, in the compute dtype) for the for-loop and foreach paths; every other
operation is NumPy's, and the comparison stays bit for bit.

The cases are the ones where the paths used to disagree: float32 params with float64 state (all
paths now compute in float64; the for-loop and foreach used to compute in float32), float32 params
with float32 state, and bfloat16 params with their default (float32) state, computed in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from ftmlopt import rule
from ftmlopt.kernels import cpu
from ftmlopt.torch import FTML

PATHS: dict[str, dict[str, Any]] = {
    "forloop": {"foreach": False, "fused": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}
#: (param dtype, requested state_dtype, expected state dtype, expected compute dtype)
CASES = {
    "f32-param-f64-state": (torch.float32, torch.float64, torch.float64, "float64"),
    "f32-param-f32-state": (torch.float32, torch.float32, torch.float32, "float32"),
    "bf16-param-default-state": (torch.bfloat16, None, torch.float32, "float32"),
}
OPTIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "coupled_wd-clip-maximize": {"weight_decay": 0.1, "clip_gradient": 0.05, "maximize": True},
    "decoupled_wd": {"weight_decay": 0.1, "decoupled_weight_decay": True},
}
LRS = (0.1, 0.03, 0.3, 0.05)
BETA1, BETA2, EPS = 0.6, 0.999, 1e-8


def _torch_sqrt(a: np.ndarray) -> np.ndarray:
    """torch's CPU ``sqrt`` (what the for-loop and foreach paths call) on a NumPy array, in its own dtype."""
    return torch.sqrt(torch.from_numpy(np.array(a))).numpy()


SQRT: dict[str, Callable[[np.ndarray], np.ndarray]] = {"forloop": _torch_sqrt, "foreach": _torch_sqrt,
                                                       "fused": np.sqrt}


def _rule_step(form: str, ct: str, w: np.ndarray, g: np.ndarray, state: dict[str, np.ndarray], *, lr: float,
               t: int, opts: dict[str, Any], sqrt: Callable[[np.ndarray], np.ndarray],
               ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One step of the rule in NumPy, every array and constant in the compute dtype ``ct``."""
    c = rule.constants(lr, t, BETA1, BETA2, EPS, weight_decay=opts.get("weight_decay", 0.0),
                       decoupled=opts.get("decoupled_weight_decay", False), clip=opts.get("clip_gradient"),
                       maximize=opts.get("maximize", False))
    dt = np.dtype(ct).type
    c = c.cast(dt)
    w, g = w.astype(ct), g.astype(ct)
    if form == "compact":
        new_w, v = rule.compact_step(w, g, state["v"].astype(ct), c, sqrt=sqrt, clip=np.clip)
        return new_w, {"v": v}
    new_w, d, v, z = rule.mxnet_step(w, g, state["d"].astype(ct), state["v"].astype(ct), state["z"].astype(ct), c,
                                     sqrt=sqrt, clip=np.clip)
    return new_w, {"d": d, "v": v, "z": z}


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor's values as float64 NumPy (exact for every dtype here)."""
    return t.detach().to(torch.float64).numpy().copy()


def _stored(x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """The reference result rounded to a stored dtype (round to nearest even, as every path stores)."""
    return torch.from_numpy(np.array(x)).to(dtype)  # np.array keeps a 0-d result 0-d


@pytest.mark.parametrize("opt_name", list(OPTIONS))
@pytest.mark.parametrize("form", ["compact", "mxnet"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("path", list(PATHS))
def test_every_path_computes_in_the_decided_dtype(path: str, case: str, form: str, opt_name: str) -> None:
    param_dtype, requested, state_dtype, ct = CASES[case]
    assert rule.compute_dtype(param_dtype, state_dtype) == ct  # the decision under test
    if path == "fused":
        assert cpu.AVAILABLE, "the fused CPU path needs llvmlite (ftmlopt[cpu]), which the test extras install"
    opts = OPTIONS[opt_name]
    gen = torch.Generator().manual_seed(sorted(CASES).index(case) * 10 + (form == "mxnet"))
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen).to(param_dtype)) for shape in [(5, 3), (7,), ()]]
    opt = FTML(params, lr=LRS[0], betas=(BETA1, BETA2), eps=EPS, compact=form == "compact", state_dtype=requested,
               **opts, **PATHS[path])
    for k, lr in enumerate(LRS, start=1):
        opt.param_groups[0]["lr"] = lr
        expected = []
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(param_dtype)
            st = opt.state[p]
            before = {key: _numpy(st[key]) for key in st if key != "step"} if st else None
            if before is None:  # first step: the state starts at zero
                before = {key: np.zeros(p.shape) for key in (("v",) if form == "compact" else ("d", "v", "z"))}
            expected.append(_rule_step(form, ct, _numpy(p), _numpy(p.grad), before, lr=lr, t=k, opts=opts,
                                       sqrt=SQRT[path]))
        opt.step()
        for i, (p, (new_w, new_state)) in enumerate(zip(params, expected)):
            st = opt.state[p]
            where = f"{path}, {case}, {form}, {opt_name}, step {k}, param {i}"
            assert float(st["step"]) == k, where
            assert p.dtype == param_dtype and torch.equal(p.detach(), _stored(new_w, param_dtype)), where
            for key, value in new_state.items():
                assert st[key].dtype == state_dtype, (where, key)
                assert torch.equal(st[key], _stored(value, state_dtype)), (where, key)
