"""The Triton kernel, run by Triton's interpreter on CPU tensors, against the readable reference.

``TRITON_INTERPRET=1`` is set before the kernel is first defined (``triton_cuda._build`` runs on
first use), so these tests need triton installed but no GPU. Sizes are small: the interpreter
executes every program in Python.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from _ftml_torch_reference import HYPER, OPTIONS, Pair, _grads, _make

from ftmlopt.kernels import triton_cuda

SHAPES = [(), (0,), (1,), (7,), (3, 5), (5000,)]  # 5,000 > one 4,096-element chunk


@pytest.fixture(autouse=True)
def _interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    assert triton_cuda.AVAILABLE, "triton is part of the test install"
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _triton_fused(lists, opts, *, grad_scale, found_inf):
    params, grads, ds, vs, zs, steps = lists
    tensors = [params, grads, vs] if opts.compact else [params, grads, ds, vs, zs]
    triton_cuda.multi_tensor_step(tensors, steps, opts, grad_scale=grad_scale, found_inf=found_inf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("opt_index", [1, 2, 3])
def test_triton_matches_reference_every_step(dtype, compact, opt_index) -> None:
    gen = torch.Generator().manual_seed(10 * opt_index + compact)
    pair = Pair(_make(SHAPES, dtype, None, gen, transpose_every=2), compact=compact, fused=_triton_fused)
    kw = {**HYPER, **OPTIONS[opt_index]}
    for k in range(1, 4):
        idx = [0, 1, 3, 5] if k == 2 else None  # some params without a gradient: steps differ per tensor
        pair.step(_grads(pair.fused_p, gen), idx, **kw)
        pair.check(dtype, f"step {k}")


def test_triton_bf16_params_with_fp32_state() -> None:
    gen = torch.Generator().manual_seed(21)
    pair = Pair(_make([(4, 6), (9,)], torch.bfloat16, None, gen), compact=False, state_dtype=torch.float32,
                fused=_triton_fused)
    for k in range(2):
        pair.step(_grads(pair.fused_p, gen), **HYPER, **OPTIONS[1])
        pair.check(torch.bfloat16, f"step {k}")


def test_triton_tensor_lr_grad_scale_and_found_inf() -> None:
    gen = torch.Generator().manual_seed(23)
    pair = Pair(_make([(11,), (2, 3)], torch.float32, None, gen), compact=False, fused=_triton_fused)
    kw = {**HYPER, **OPTIONS[1]}
    grads = _grads(pair.fused_p, gen, scale=64.0)
    # the kernel takes a 0-dim float64 tensor lr, the reference the float
    fg, rg = pair.step(grads, grad_scale=64.0, **{**kw, "lr": torch.tensor(kw["lr"], dtype=torch.float64)})
    pair.check(torch.float32)
    for f, r in zip(fg, rg):
        torch.testing.assert_close(f, r)  # unscaled gradient written back
    before = [t.clone() for t in itertools.chain(pair.fused_p, pair.vs, pair.ds, pair.zs, pair.steps)]
    pair.step(_grads(pair.fused_p, gen), found_inf=torch.tensor(1.0), **kw)
    for b, a in zip(before, itertools.chain(pair.fused_p, pair.vs, pair.ds, pair.zs, pair.steps)):
        assert torch.equal(b, a)


def test_triton_op_is_registered_for_torch_compile() -> None:
    triton_cuda._build()
    op = torch.ops.ftmlopt.ftml_multi_tensor_.default
    schema = str(op._schema)
    assert "Tensor(a0!)[] params" in schema and "Tensor(a4!)[] zs" in schema  # declared mutations


_COMPILE_SCRIPT = """
import re
from ftmlopt.kernels import triton_cuda
ALL = dict(MAXIMIZE=True, COUPLED_WD=True, DECOUPLED_WD=True, HAS_CLIP=True, HAS_SCALE=True, HAS_FOUND_INF=True)
for p, s, flags in (("fp32", "fp32", {}), ("bf16", "fp32", dict(ALL, ALIGNED=True)),
                    ("fp16", "fp16", dict(ALL, COMPACT=True, ALIGNED=True)), ("fp64", "fp64", dict(ALIGNED=True))):
    ptx = triton_cuda.compile_ptx(90, p, s, **flags)
    print(p, s, flags.get("ALIGNED", False), len(re.findall(r"ld\\.global[.a-z0-9]*\\.v[24]", ptx)))
"""


def test_kernel_compiles_for_sm90_without_a_gpu() -> None:
    """The real compiler (not the interpreter) accepts the kernel; aligned chunks get vector loads."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line.split() for line in res.stdout.strip().splitlines()]
    assert len(lines) == 4
    for p, s, aligned, n_vector in lines:
        assert (int(n_vector) > 0) == (aligned == "True"), (p, s, aligned, n_vector)
