"""The one reference runs on NumPy, torch and jax.numpy and gives the same bits on each.

The codes, scales and weights of a few steps on torch tensors and JAX arrays (eager) are
compared with NumPy's, bit for bit for the state (float32: every operation is a correctly rounded
IEEE operation, in the same order, on each library); the weights (from the rule with the library's
own sqrt and division) and the state under ``jax.jit`` (fused multiply-adds) within one ulp.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from ftmlopt import lowbit, rule

SHAPE = (37, 131)  # 4847 elements: 38 blocks, the last partial; odd, so the last 4-bit byte is half full


def _numpy_run(bits: int, rounding: str, steps: int = 4) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    w = rng.standard_normal(SHAPE).astype(np.float32)
    codes, scales = lowbit.zeros_state(w.size, bits)
    out = []
    for t in range(1, steps + 1):
        g = (rng.standard_normal(SHAPE) * 10.0 ** rng.uniform(-4, 1, SHAPE)).astype(np.float32)
        c = rule.constants(0.01, t, 0.6, 0.999, 1e-8).cast(np.float32)
        w, codes, scales = lowbit.compact_step(w, g, codes, scales, c, bits=bits, seed=3, step=t,
                                               rounding=rounding)  # type: ignore[arg-type]
        out.append((w, codes, scales, g))
    return out


def _start(bits: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
@pytest.mark.parametrize("bits", [8, 4])
def test_torch_matches_numpy_bit_for_bit(bits: int, rounding: str) -> None:
    import torch

    ref = _numpy_run(bits, rounding)
    w = torch.from_numpy(_start(bits))
    codes, scales = (torch.from_numpy(a) for a in lowbit.zeros_state(w.numel(), bits))
    for t, (rw, rcodes, rscales, g) in enumerate(ref, start=1):
        c = rule.constants(0.01, t, 0.6, 0.999, 1e-8)
        w, codes, scales = lowbit.compact_step(w, torch.from_numpy(g), codes, scales, c, bits=bits, seed=3,
                                               step=t, rounding=rounding)  # type: ignore[arg-type]
        assert codes.dtype == torch.uint8 and scales.dtype == torch.float32
        assert np.array_equal(codes.numpy(), rcodes) and np.array_equal(scales.numpy(), rscales)
        # the weights come from rule.compact_step with torch.sqrt, which on CPU is not correctly rounded
        # (one ulp off for ~1 in 5 inputs); the state is bit for bit (lowbit takes a correctly rounded root)
        np.testing.assert_allclose(w.numpy(), rw, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", [8, 4])
def test_jax_matches_numpy_bit_for_bit(bits: int) -> None:
    import jax.numpy as jnp

    ref = _numpy_run(bits, "stochastic")
    w = jnp.asarray(_start(bits))
    codes, scales = (jnp.asarray(a) for a in lowbit.zeros_state(w.size, bits))
    for t, (rw, rcodes, rscales, g) in enumerate(ref, start=1):
        c = rule.constants(0.01, t, 0.6, 0.999, 1e-8).cast(jnp.float32)
        w, codes, scales = lowbit.compact_step(w, jnp.asarray(g), codes, scales, c, bits=bits, seed=3, step=t)
        assert codes.dtype == jnp.uint8 and scales.dtype == jnp.float32
        assert np.array_equal(np.asarray(codes), rcodes) and np.array_equal(np.asarray(scales), rscales)
        # the weights come from rule.compact_step, whose divisions by a scalar XLA turns into
        # multiplications by a reciprocal; the state is bit for bit (lowbit divides element by element)
        np.testing.assert_allclose(np.asarray(w), rw, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", [8, 4])
def test_jax_jit_matches_numpy_step_by_step(bits: int) -> None:
    """Under jit XLA contracts ``v * b2 + g2 * (1 - b2)`` into a fused multiply-add, so ``v`` may differ in its
    last bit: from the same state, the scales agree to one float32 ulp and a code moves by at most one."""
    import jax
    import jax.numpy as jnp

    def step(w: Any, g: Any, codes: Any, scales: Any, t: int) -> Any:
        c = rule.constants(0.01, t, 0.6, 0.999, 1e-8).cast(jnp.float32)
        return lowbit.compact_step(w, g, codes, scales, c, bits=bits, seed=3, step=t)

    fn = jax.jit(step, static_argnums=4)
    ref = _numpy_run(bits, "stochastic")
    w, (codes, scales) = _start(bits), lowbit.zeros_state(SHAPE[0] * SHAPE[1], bits)
    moved = 0
    for t, (rw, rcodes, rscales, g) in enumerate(ref, start=1):
        jw, jcodes, jscales = (np.asarray(a) for a in fn(w, g, codes, scales, t))
        np.testing.assert_allclose(jscales, rscales, rtol=2.4e-7, atol=0)  # two float32 ulps (XLA's fused ops)
        q, rq = (lowbit.unpack4(x, w.size, lowbit.ops_for(x)) if bits == 4 else x.astype(np.int32)
                 for x in (jcodes, rcodes))
        assert np.abs(q - rq).max() <= 1
        moved += int(np.count_nonzero(q != rq))
        np.testing.assert_allclose(jw, rw, rtol=1e-6, atol=1e-7)
        w, codes, scales = rw, rcodes, rscales
    assert moved <= 0.01 * len(ref) * w.size


def test_torch_random_bits_match_numpy_over_the_whole_uint32_range() -> None:
    """torch holds uint32 in int64 and splits the products; keys near 2**32 exercise the top bits."""
    import torch

    n_ops, t_ops = lowbit.ops_for(np.zeros(1)), lowbit.ops_for(torch.zeros(1))
    for key in (0, 1, 2**31, 2**32 - 1, lowbit.step_key(2**32 - 1, 2**31)):
        for bits in (8, 4):
            a = lowbit.random_bits(70_000, key, bits, n_ops)
            b = lowbit.random_bits(70_000, key, bits, t_ops)
            assert b.dtype == torch.int32 and np.array_equal(a, b.numpy())


def test_traced_step_key_is_the_host_key() -> None:
    """Under jax.jit the step count is traced: its key, computed in uint32 on the device, is the host's."""
    import jax
    import jax.numpy as jnp
    import torch

    j_ops, t_ops, n_ops = (lowbit.ops_for(x) for x in (jnp.zeros(1), torch.zeros(1), np.zeros(1)))
    fn = jax.jit(lambda step: lowbit.traced_step_key(2**32 - 5, step, j_ops))
    for seed, step in ((0, 1), (7, 123456), (2**32 - 5, 2**31 - 1)):
        host = lowbit.step_key(seed, step)
        assert int(lowbit.traced_step_key(seed, jnp.int32(step), j_ops)) == host
        assert int(lowbit.traced_step_key(seed, torch.tensor(step), t_ops)) == host
        assert int(lowbit.traced_step_key(seed, np.int32(step), n_ops)) == host
    assert int(fn(jnp.int32(99))) == lowbit.step_key(2**32 - 5, 99)


def test_jax_jit_with_a_traced_step_gives_the_static_steps_codes() -> None:
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(1)
    v = jnp.asarray((rng.lognormal(0, 2, SHAPE) ** 2).astype(np.float32))
    traced = jax.jit(lambda v, t: lowbit.quantize(v, 4, seed=3, step=t))
    for t in (1, 2, 1000):
        codes, scales = traced(v, jnp.int32(t))
        ref_codes, ref_scales = lowbit.quantize(np.asarray(v), 4, seed=3, step=t)
        assert np.array_equal(np.asarray(codes), ref_codes) and np.array_equal(np.asarray(scales), ref_scales)
