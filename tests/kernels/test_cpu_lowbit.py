"""The fused low-bit CPU kernel against the reference :mod:`ftmlopt.lowbit`, step by step, state included.

The kernel performs the reference's operations in the reference's order (no fast-math, no FMA
contraction), so float32 and float64 weights, codes and scales are *bit-identical* to
``lowbit.compact_step`` run with NumPy, over several steps of each one's own state. Half-precision
params are held to the float32 reference rounded once to their dtype (round to nearest even), also
bit for bit. Sizes cover a partial last block, an odd count (a lone low nibble at 4 bits), less
than one block, and tensors cut into several pieces run on several threads.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ftmlopt import lowbit, rule
from ftmlopt.kernels import cpu, cpu_lowbit

SIZES = [1, 5, 127, 128, 129, 383, 4097, 2 * cpu_lowbit.CHUNK + 333]
HYPER = dict(beta1=0.6, beta2=0.999, eps=1e-8)
OPTIONS = [
    dict(),
    dict(weight_decay=0.05, clip=0.5),
    dict(weight_decay=0.01, decoupled=True, maximize=True),
    dict(grad_scale=0.125, clip=2.0),
]
LRS = (1e-2, 3e-3, 0.0, 0.5, 1e-2)  # an lr-0 step folds g into v and leaves w as it is


def _grads(rng: np.random.Generator, n: int, t: int, dtype: type) -> np.ndarray:
    """Gradients over six decades, whole blocks at zero (scale 0) and a drop by 100x after step 2."""
    g = rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 2, n)
    g[128:256] = 0.0  # a block that stays all zero: scale 0, codes 0
    if t > 2:
        g[256:] *= 0.01
    return g.astype(dtype)


def _reference_step(w, g, q, s, c, *, bits, seed, t, rounding, dtype):
    ct = np.float64 if dtype == np.float64 else np.float32
    cc = c.cast(ct) if ct == np.float32 else c
    return lowbit.compact_step(w, g, q, s, cc, bits=bits, seed=seed, step=t, rounding=rounding)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
@pytest.mark.parametrize("opt", range(len(OPTIONS)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernel_is_bit_identical_to_the_reference(bits, rounding, opt, dtype, monkeypatch) -> None:
    monkeypatch.setattr(cpu, "PARALLEL_MIN", 0)  # several threads even for the small tensors
    rng = np.random.default_rng(100 * bits + 10 * opt + (rounding == "nearest"))
    seeds = [int(x) for x in rng.integers(0, 2**32, len(SIZES))]
    got_w = [rng.standard_normal(n).astype(dtype) for n in SIZES]
    for w in got_w:
        w[128:256] = 0.0  # with zero gradients there, g' = 0 under weight decay too: a block at scale 0
    got_q, got_s = map(list, zip(*(lowbit.zeros_state(n, bits) for n in SIZES)))
    want = [[w.copy(), q.copy(), s.copy()] for w, q, s in zip(got_w, got_q, got_s)]
    for t, lr in enumerate(LRS, start=1):
        gs = [_grads(rng, n, t, dtype) for n in SIZES]
        c = rule.constants(lr, t, **HYPER, **OPTIONS[opt])
        for i, g in enumerate(gs):
            want[i] = list(_reference_step(*want[i][:1], g, *want[i][1:], c, bits=bits, seed=seeds[i], t=t,
                                           rounding=rounding, dtype=dtype))
        cpu_lowbit.step_arrays(got_w, gs, got_q, got_s, c, seeds=seeds, step=t, bits=bits, rounding=rounding,
                               threads=1 + t % 3)
        for i, n in enumerate(SIZES):
            for name, a, b in zip(("w", "codes", "scales"), (got_w[i], got_q[i], got_s[i]), want[i]):
                assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), (name, n, t)
    assert any(s[1] == 0 for s in got_s[4:]) and all((s > 0).any() for s in got_s)  # zero blocks were met


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("p_dtype", [torch.bfloat16, torch.float16])
def test_half_params_are_the_float32_reference_rounded_once(bits, p_dtype) -> None:
    """Half params are computed in float32 and rounded once; codes and scales are the float32 reference's."""
    name = str(p_dtype).split(".")[1]
    if name not in cpu.available_dtypes():
        pytest.skip(f"this CPU has no {name} kernels (float16 needs F16C)")  # pragma: no cover
    from ftmlopt.torch._fused_lowbit import step_lowbit

    rng = np.random.default_rng(bits)
    sizes = [7, 300, 70_001]
    ws = [torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(p_dtype) for n in sizes]
    codes, scales = map(list, zip(*(lowbit.zeros_state(n, bits, ops=lowbit.ops_for(ws[0])) for n in sizes)))
    ref = [[w.clone(), q.clone(), s.clone()] for w, q, s in zip(ws, codes, scales)]
    for t in range(1, 4):
        gs = [torch.from_numpy(_grads(rng, n, t, np.float32)).to(p_dtype) for n in sizes]
        c = rule.constants(1e-2, t, **HYPER, weight_decay=0.01, clip=1.0)
        for i, g in enumerate(gs):
            w, q, s = ref[i]
            nw, nq, ns = lowbit.compact_step(w.float().numpy(), g.float().numpy(), q.numpy(), s.numpy(),
                                             c.cast(np.float32), bits=bits, seed=i, step=t)
            ref[i] = [torch.from_numpy(nw).to(p_dtype), torch.from_numpy(nq), torch.from_numpy(ns)]
        step_lowbit(ws, gs, codes, scales, list(range(len(sizes))), [t] * len(sizes), c, bits=bits, threads=2)
        for i in range(len(sizes)):
            for got, want in zip((ws[i], codes[i], scales[i]), ref[i]):
                assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (i, t)


def test_pieces_are_whole_blocks() -> None:
    sizes = np.array([3 * cpu_lowbit.CHUNK + 1, 5, cpu_lowbit.CHUNK], dtype=np.int64)
    addresses = np.arange(12, dtype=np.int64).reshape(3, 4) * 1000
    ptrs, counts, _ = cpu_lowbit.make_pieces(addresses, sizes, np.array([7, 8, 9]), np.ones((3, 2)))
    assert counts.tolist() == [cpu_lowbit.CHUNK] * 3 + [1, 5, cpu_lowbit.CHUNK]
    assert (ptrs[:, 4] % cpu_lowbit.BLOCK == 0).all() and cpu_lowbit.CHUNK % cpu_lowbit.BLOCK == 0
    assert ptrs[:, 4].tolist() == [0, cpu_lowbit.CHUNK, 2 * cpu_lowbit.CHUNK, 3 * cpu_lowbit.CHUNK, 0, 0]
    assert ptrs[:, 5].tolist() == [7, 7, 7, 7, 8, 9] and (ptrs[:4, :4] == addresses[0]).all()


def test_bad_arrays_and_options_are_refused_before_anything_changes() -> None:
    w, g = np.ones(200, np.float32), np.ones(200, np.float32)
    q, s = lowbit.zeros_state(200, 4)
    c = rule.constants(0.1, 1, **HYPER)
    with pytest.raises(ValueError, match="codes must be 100"):
        cpu_lowbit.step_arrays([w], [g], [np.zeros(200, np.uint8)], [s], c, seeds=[0], step=1, bits=4)
    with pytest.raises(ValueError, match="scales must be 2"):
        cpu_lowbit.step_arrays([w], [g], [q], [np.zeros(1, np.float32)], c, seeds=[0], step=1, bits=4)
    with pytest.raises(ValueError, match="Invalid state_bits: 6"):
        cpu_lowbit.step_arrays([w], [g], [q], [s], c, seeds=[0], step=1, bits=6)
    with pytest.raises(ValueError, match="Invalid rounding"):
        cpu_lowbit.step_arrays([w], [g], [q], [s], c, seeds=[0], step=1, bits=4, rounding="up")
    assert (w == 1).all() and (q == 0).all() and (s == 0).all()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_non_finite_blocks_match_the_reference(bits: int, rounding: str) -> None:
    """A ``v`` that overflows to inf (scale inf: ``rho = 1 / inf = 0``) and a NaN gradient (scale NaN:
    ``rho = 1``): the kernel's weights, codes and scales are still the reference's bits."""
    n = 3 * lowbit.BLOCK
    w = np.linspace(-1.0, 1.0, n, dtype=np.float32)
    g = np.linspace(0.5, -0.5, n, dtype=np.float32)
    g[5] = 1e30  # g' * g' overflows: v = inf in block 0
    g[130] = np.nan  # block 1
    q, s = lowbit.zeros_state(n, bits)
    c = rule.constants(1e-2, 1, **HYPER)
    want = lowbit.compact_step(w.copy(), g, q.copy(), s.copy(), c.cast(np.float32), bits=bits, seed=3, step=1,
                               rounding=rounding)
    cpu_lowbit.step_arrays([w], [g], [q], [s], c, seeds=[3], step=1, bits=bits, rounding=rounding)
    assert np.isinf(want[2][0]) and np.isnan(want[2][1]) and np.isfinite(want[2][2])
    for name, a, b in zip(("w", "codes", "scales"), (w, q, s), want):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name
