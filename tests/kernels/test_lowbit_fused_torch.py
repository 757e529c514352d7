"""The fused low-bit step for torch tensors: the Triton kernel (interpreter) and the registered op, against
:mod:`ftmlopt.lowbit`, step by step with their own state; torch's conventions; ``torch.compile``; bad input.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ftmlopt import lowbit, rule
from ftmlopt.kernels import triton_lowbit
from ftmlopt.torch._fused_lowbit import fused_ftml_lowbit, step_lowbit

HYPER = dict(beta1=0.6, beta2=0.999, eps=1e-8)
OPTIONS = [dict(), dict(weight_decay=0.05, clip=0.5), dict(weight_decay=0.01, decoupled=True, maximize=True)]


def _grad(gen: torch.Generator, shape: tuple[int, ...], t: int) -> torch.Tensor:
    g = torch.randn(shape, generator=gen, dtype=torch.float64) * 10.0 ** (6 * torch.rand(shape, generator=gen) - 4)
    return (g * (0.01 if t > 2 else 1.0)).to(torch.float32)


def _reference(w, g, q, s, c, *, bits, seed, t, rounding="stochastic"):
    """The NumPy reference on a float32/float64 param (half params: in float32, rounded once by the caller)."""
    ct = np.float64 if w.dtype == torch.float64 else np.float32
    w_new, q_new, s_new = lowbit.compact_step(
        w.to(torch.float64 if ct == np.float64 else torch.float32).reshape(-1).numpy(),
        g.to(w.dtype if ct == np.float64 else torch.float32).reshape(-1).numpy(), q.numpy(), s.numpy(),
        c.cast(ct) if ct == np.float32 else c, bits=bits, seed=seed, step=t, rounding=rounding)
    return torch.from_numpy(w_new).reshape(w.shape).to(w.dtype), torch.from_numpy(q_new), torch.from_numpy(s_new)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).contiguous().view(torch.uint8),
                                                                      b.reshape(-1).contiguous().view(torch.uint8))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("opt", range(len(OPTIONS)))
def test_triton_interpreter_matches_the_reference_bit_for_bit(bits, rounding, dtype, opt, monkeypatch) -> None:
    assert triton_lowbit.AVAILABLE, "triton is part of the test install"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    gen = torch.Generator().manual_seed(bits + 3 * opt)
    shapes = [(1,), (5,), (3, 43), (1500,)]  # < 1 block, odd, a partial block, two programs of blocks
    ws = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    state = [lowbit.zeros_state(w.numel(), bits, ops=lowbit.ops_for(w)) for w in ws]
    qs, ss = [q for q, _ in state], [s for _, s in state]
    ref = [[w.clone(), q.clone(), s.clone()] for w, q, s in zip(ws, qs, ss)]
    for t in range(1, 4):
        gs = [_grad(gen, s, t).to(dtype) for s in shapes]
        c = rule.constants(1e-2, t, **HYPER, **OPTIONS[opt])
        for i, g in enumerate(gs):
            ref[i] = list(_reference(ref[i][0], g, ref[i][1], ref[i][2], c, bits=bits, seed=i, t=t, rounding=rounding))
        triton_lowbit.step(ws, gs, qs, ss, list(range(len(ws))), [t] * len(ws), [c] * len(ws), bits=bits,
                           rounding=rounding)
        for i in range(len(ws)):
            for got, want in zip((ws[i], qs[i], ss[i]), ref[i]):
                assert _same(got, want), (i, t)


@pytest.mark.parametrize("bits", [8, 4])
def test_triton_interpreter_matches_the_reference_on_non_finite_blocks(bits, monkeypatch) -> None:
    """v overflowing to inf (scale inf, ``rho = 1 / inf = 0``) and a NaN gradient (scale NaN, ``rho = 1``)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    n = 3 * lowbit.BLOCK
    w = torch.linspace(-1.0, 1.0, n)
    g = torch.linspace(0.5, -0.5, n)
    g[5], g[130] = 1e30, float("nan")
    q, s = lowbit.zeros_state(n, bits, ops=lowbit.ops_for(w))
    c = rule.constants(1e-2, 1, **HYPER)
    want = _reference(w.clone(), g, q.clone(), s.clone(), c, bits=bits, seed=3, t=1)
    triton_lowbit.step([w], [g], [q], [s], [3], [1], [c], bits=bits, rounding="stochastic")
    assert torch.isinf(want[2][0]) and torch.isnan(want[2][1])
    for got, ref in zip((w, q, s), want):
        assert _same(got, ref)


@pytest.mark.parametrize("bits", [8, 4])
def test_registered_op_follows_torch_conventions_and_the_reference(bits) -> None:
    """Steps counted per tensor (one tensor skips a step), grad_scale divides and is written back, found_inf
    changes nothing, a non-contiguous param is stepped in its row-major order."""
    gen = torch.Generator().manual_seed(bits)
    ws = [torch.randn(5000, generator=gen), torch.randn(130, 70, generator=gen).t(), torch.randn(4097, generator=gen)]
    assert not ws[1].is_contiguous()
    state = [lowbit.zeros_state(w.numel(), bits, ops=lowbit.ops_for(w)) for w in ws]
    qs, ss = [q for q, _ in state], [s for _, s in state]
    steps = [torch.zeros(()) for _ in ws]
    seeds = [11, 12, 2**32 - 1]
    ref = [[w.clone(), q.clone(), s.clone()] for w, q, s in zip(ws, qs, ss)]
    kw = dict(lr=0.01, beta1=0.6, beta2=0.999, eps=1e-8, weight_decay=0.02, clip_gradient=0.7,
              decoupled_weight_decay=False, maximize=True, bits=bits, rounding="stochastic")
    for k in range(1, 5):
        idx = [0, 2] if k == 2 else [0, 1, 2]  # param 1 has no gradient at step 2: its count falls behind
        scale = torch.tensor(64.0)
        gs = [_grad(gen, ws[i].shape, k) * 64.0 for i in idx]
        unscaled = [g / scale for g in gs]
        for g, i in zip(unscaled, idx):
            t = int(steps[i]) + 1
            c = rule.constants(0.01, t, **HYPER, weight_decay=0.02, clip=0.7, maximize=True)
            ref[i] = list(_reference(ref[i][0], g, ref[i][1], ref[i][2], c, bits=bits, seed=seeds[i], t=t))
        fused_ftml_lowbit([ws[i] for i in idx], gs, [qs[i] for i in idx], [ss[i] for i in idx],
                          [seeds[i] for i in idx], [steps[i] for i in idx], grad_scale=scale, found_inf=None, **kw)
        assert all(_same(g, u) for g, u in zip(gs, unscaled))  # the unscaled gradient is written back
        for i in range(len(ws)):
            for got, want in zip((ws[i], qs[i], ss[i]), ref[i]):
                assert _same(got, want), (i, k)
    assert [float(s) for s in steps] == [4.0, 3.0, 4.0]
    before = [t.clone() for t in (*ws, *qs, *ss, *steps)]
    fused_ftml_lowbit(ws, [torch.randn(w.shape, generator=gen) for w in ws], qs, ss, seeds, steps,
                      grad_scale=None, found_inf=torch.ones(()), **kw)
    assert all(_same(a, b) for a, b in zip(before, (*ws, *qs, *ss, *steps)))


def _functional(ws, gs, qs, ss, steps) -> None:
    fused_ftml_lowbit(ws, gs, qs, ss, [3, 4], steps, grad_scale=None, found_inf=None, lr=0.01, beta1=0.6,
                      beta2=0.999, eps=1e-8, weight_decay=0.0, clip_gradient=None, decoupled_weight_decay=False,
                      maximize=False, bits=4, rounding="stochastic")


def test_compiled_step_is_one_registered_op_and_equals_eager() -> None:
    gen = torch.Generator().manual_seed(9)
    ws = [torch.randn(4100, generator=gen), torch.randn(4097, generator=gen)]
    lists = [ws, [torch.randn(w.shape, generator=gen) for w in ws]]
    state = [lowbit.zeros_state(w.numel(), 4, ops=lowbit.ops_for(w)) for w in ws]
    lists += [[q for q, _ in state], [s for _, s in state], [torch.zeros(()) for _ in ws]]
    twin = [[t.clone() for t in lst] for lst in lists]
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(_functional, backend=backend, fullgraph=True)
    for _ in range(3):
        compiled(*lists)
        _functional(*twin)
    assert all(_same(a, b) for x, y in zip(lists, twin) for a, b in zip(x, y))
    assert float(lists[4][0]) == 3.0
    calls = [n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert calls == [torch.ops.ftmlopt.fused_ftml_lowbit_.default]


def test_bad_input_is_refused_before_anything_changes() -> None:
    w, g = torch.ones(5000), torch.ones(5000)
    q, s = lowbit.zeros_state(5000, 8, ops=lowbit.ops_for(w))
    c = rule.constants(0.1, 1, **HYPER)
    cases = [
        (dict(codes=[torch.zeros(2500, dtype=torch.uint8)]), "codes must be a contiguous uint8 tensor of 5000"),
        (dict(scales=[torch.zeros(39)]), "scales must be a contiguous float32 tensor of 40"),
        (dict(seeds=[2**32]), "Invalid seed"),
        (dict(steps=[0]), "Invalid step"),
        (dict(grads=[]), "grads has 0 entries, params has 1"),
        (dict(bits=6), "Invalid state_bits: 6"),
        (dict(rounding="down"), "Invalid rounding"),
        (dict(constants=[rule.constants(0.1, 1, **HYPER, grad_scale=2.0)]), "grad_scale"),
    ]
    for change, message in cases:
        args = dict(params=[w], grads=[g], codes=[q], scales=[s], seeds=[0], steps=[1], constants=c, bits=8)
        args.update(change)
        with pytest.raises(ValueError, match=message):
            step_lowbit(**args)
    ws = [torch.ones(5000), torch.ones(5000)]
    state = [lowbit.zeros_state(5000, 8, ops=lowbit.ops_for(w)) for w in ws]
    with pytest.raises(ValueError, match="may differ only in their step"):
        step_lowbit(ws, [g, g], [x for x, _ in state], [y for _, y in state], [0, 1], [1, 2],
                    [c, rule.constants(0.1, 2, beta1=0.6, beta2=0.99, eps=1e-8)], bits=8)
    assert (w == 1).all() and (q == 0).all() and (s == 0).all() and all((x == 1).all() for x in ws)


_COMPILE_SCRIPT = """
from ftmlopt.kernels import triton_lowbit
ALL = dict(MAXIMIZE=True, COUPLED_WD=True, DECOUPLED_WD=True, HAS_CLIP=True, HAS_SCALE=True)
for bits, param, flags in ((8, "float32", {}), (4, "bfloat16", ALL), (8, "float64", ALL), (4, "float16", {})):
    ptx = triton_lowbit.compile_ptx(bits, param, **flags)
    ops = ("div.rn.f32", "sqrt.rn.f32", "div.rn.f64", "fma.rn.f32", "fma.rn.f64", "div.full", "approx")
    print(bits, param, *(ptx.count(op) for op in ops))
"""


def test_kernel_compiles_for_sm90_with_correctly_rounded_float32_and_no_fma() -> None:
    """The real compiler (not the interpreter) accepts every variant; float32 math is div.rn/sqrt.rn, uncontracted."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line.split() for line in res.stdout.strip().splitlines()]
    assert [r[:2] for r in rows] == [["8", "float32"], ["4", "bfloat16"], ["8", "float64"], ["4", "float16"]]
    for bits, param, div_rn, sqrt_rn, div_rn64, fma, fma64, div_full, approx in rows:
        assert int(fma) == int(fma64) == int(div_full) == int(approx) == 0, (bits, param)
        # the encoding is float32 for every param dtype (u = sqrt(float32(v)), the scale, u / scale); the
        # rule's divisions are float64 for float64 params
        assert int(div_rn) > 0 and int(sqrt_rn) > 0, (bits, param)
        assert (int(div_rn64) > 0) == (param == "float64"), (bits, param)


# ---------------------------------------------------------------------------- the CPU group plan cache
@pytest.mark.parametrize("bits", [8, 4])
def test_cpu_plan_follows_new_gradients_keys_and_hyper_parameters(bits) -> None:
    """The same params stepped again with new gradient tensors (kept alive: new addresses), new step
    keys and a changing lr (the decoupled decay factor lives in ``k``): bit for bit the reference."""
    from ftmlopt.torch import _fused_lowbit

    gen = torch.Generator().manual_seed(40 + bits)
    shapes = [(70_000,), (4097,)]  # more than one piece, and a partial block
    ws = [torch.randn(s, generator=gen) for s in shapes]
    state = [lowbit.zeros_state(w.numel(), bits, ops=lowbit.ops_for(w)) for w in ws]
    qs, ss = [q for q, _ in state], [s for _, s in state]
    ref = [[w.clone(), q.clone(), s.clone()] for w, q, s in zip(ws, qs, ss)]
    kept, plans = [], None
    for t, lr in enumerate([1e-2, 1e-2, 3e-3, 3e-2], start=1):
        gs = [_grad(gen, s, t) for s in shapes]
        kept.append(gs)
        c = rule.constants(lr, t, **HYPER, weight_decay=0.1, decoupled=True)
        for i, g in enumerate(gs):
            ref[i] = list(_reference(ref[i][0], g, ref[i][1], ref[i][2], c, bits=bits, seed=5 + i, t=t))
        step_lowbit(ws, [g.clone() for g in gs], qs, ss, [5, 6], [t, t], c, bits=bits)
        for i in range(len(ws)):
            for got, want in zip((ws[i], qs[i], ss[i]), ref[i]):
                assert _same(got, want), (i, t)
        if t == 1:
            plans = dict(_fused_lowbit._PLANS)
    assert dict(_fused_lowbit._PLANS) == plans  # one plan served every step


def test_cpu_plan_is_not_reused_for_another_size_at_the_same_address() -> None:
    gen = torch.Generator().manual_seed(44)
    w = torch.randn(8192, generator=gen)
    q, s = lowbit.zeros_state(8192, 8, ops=lowbit.ops_for(w))
    c = rule.constants(1e-2, 1, **HYPER)
    step_lowbit([w], [torch.ones(8192)], [q], [s], [0], [1], c, bits=8)
    tail = w[4096:].clone(), q[4096:].clone(), s[32:].clone()
    # the first half: the same addresses, half the elements; the second half must not move
    step_lowbit([w[:4096]], [torch.ones(4096)], [q[:4096]], [s[:32]], [0], [2], rule.constants(1e-2, 2, **HYPER),
                bits=8)
    assert all(_same(a, b) for a, b in zip((w[4096:], q[4096:], s[32:]), tail))
