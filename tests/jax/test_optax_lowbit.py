"""``ftmlopt.optax.ftml(..., state_bits=8 | 4)`` and ``scale_by_ftml(state_bits=...)`` against :mod:`ftmlopt.lowbit`.

Eager, every operation is dispatched on its own, so the codes and scales are the NumPy reference's bit
for bit from the transformation's own previous state. Under ``jax.jit`` XLA fuses the second-moment
update into a multiply-add: codes then move by at most one (rarely) and scales by up to two ulps.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftmlopt import lowbit, rule
from ftmlopt.optax import QuantizedV, ScaleByFTMLState, ftml, scale_by_ftml

B1, B2, EPS = 0.6, 0.999, 1e-8
SHAPE = (37, 131)


def _grads(t: int) -> dict[str, jax.Array]:
    rng = np.random.default_rng(t)
    w = (rng.normal(size=SHAPE) * 10.0 ** rng.uniform(-3, 1, SHAPE)).astype(np.float32)
    return {"w": jnp.asarray(w), "b": jnp.asarray(rng.normal(size=50).astype(np.float32))}


def _unpack(codes: np.ndarray, bits: int, n: int) -> np.ndarray:
    return codes.astype(np.int32) if bits == 8 else lowbit.unpack4(codes, n, lowbit.ops_for(codes))


def _ftml_state(state: Any) -> ScaleByFTMLState:
    return state if isinstance(state, ScaleByFTMLState) else state.ftml


@pytest.mark.parametrize("bits", [8, 4])
def test_scale_by_ftml_is_the_reference_direction_eagerly(bits: int) -> None:
    tx = scale_by_ftml(B1, B2, EPS, state_bits=bits)
    params = {"w": jnp.zeros(SHAPE), "b": jnp.zeros(50)}
    state = tx.init(params)
    assert isinstance(state.v["w"], QuantizedV) and not isinstance(state.v["b"], QuantizedV)
    assert state.v["w"].codes.dtype == jnp.uint8 and state.v["w"].scales.dtype == jnp.float32
    for t in range(1, 5):
        g = _grads(t)
        prev = (np.asarray(state.v["w"].codes), np.asarray(state.v["w"].scales))
        direction, state = tx.update(g, state)
        # scale_by_ftml takes the betas in the compute dtype (as b**t is): 1 - b2 in float32
        c = rule.constants(1.0, t, np.float32(B1), np.float32(B2), EPS).cast(np.float32)
        # leaf index of "w" in the tree: dict keys sorted, "b" (0) then "w" (1)
        moved, codes, scales = lowbit.compact_step(np.zeros(SHAPE, np.float32), np.asarray(g["w"]), *prev, c,
                                                   bits=bits, seed=1, step=t)
        assert np.array_equal(np.asarray(state.v["w"].codes), codes)
        assert np.array_equal(np.asarray(state.v["w"].scales), scales)
        # float32 direction: XLA lowers the division and sqrt differently across jax versions (a few
        # dozen ulps apart on jax 0.4.30, the floor); the codes and scales above are bit for bit
        np.testing.assert_allclose(np.asarray(direction["w"]), -moved, rtol=1e-5, atol=1e-12)
        assert int(state.count) == t


@pytest.mark.parametrize("bits", [8, 4])
def test_ftml_chain_under_jit_tracks_the_reference(bits: int) -> None:
    """The whole chain (coupled L2, clip, schedule) jitted: step by step from its own state, codes within one."""
    lrs = jnp.asarray([0.1, 0.03, 0.0, 0.05], jnp.float32)
    tx = ftml(lambda count: lrs[count], B1, B2, EPS, weight_decay=0.01, clip_gradient=2.0, state_bits=bits)
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)), "b": jnp.zeros(50)}
    state = tx.init(params)

    @jax.jit
    def step(g: Any, s: Any, p: Any) -> Any:
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    for t in range(1, 5):
        g = _grads(t)
        q = _ftml_state(state).v["w"]
        prev = (np.asarray(params["w"]), np.asarray(q.codes), np.asarray(q.scales))
        params, state = step(g, state, params)
        lr = float(lrs[t - 1])
        c = rule.constants(lr, t, np.float32(B1), np.float32(B2), EPS, weight_decay=0.01, clip=2.0).cast(np.float32)
        w_ref, codes_ref, scales_ref = lowbit.compact_step(prev[0], np.asarray(g["w"]), prev[1], prev[2], c,
                                                           bits=bits, seed=1, step=t)
        q = _ftml_state(state).v["w"]
        np.testing.assert_allclose(np.asarray(q.scales), scales_ref, rtol=2.5e-7, atol=0)  # two ulps
        moved = _unpack(np.asarray(q.codes), bits, w_ref.size) - _unpack(codes_ref, bits, w_ref.size)
        assert np.abs(moved).max() <= 1 and np.count_nonzero(moved) <= 0.01 * w_ref.size
        # one float32 ulp of the largest weights (|w| ~ 2-4) apart on jax 0.4.30, whose XLA fuses differently
        np.testing.assert_allclose(np.asarray(params["w"]), w_ref, rtol=2e-6, atol=4.8e-7)
        if lr == 0:
            assert np.array_equal(np.asarray(params["w"]), prev[0])


@pytest.mark.parametrize("bits, limit", [(8, 1.05), (4, 0.55)])
def test_state_bytes_per_param(bits: int, limit: float) -> None:
    state = ftml(0.01, state_bits=bits).init({"w": jnp.zeros((1024, 1024))})
    q = state.v["w"]
    assert (q.codes.nbytes + q.scales.nbytes) / 2**20 <= limit


def test_bad_state_bits_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^Invalid state_bits: 5$"):
        ftml(0.01, state_bits=5)
    with pytest.raises(ValueError, match=r"^Invalid state_bits: 5$"):
        scale_by_ftml(state_bits=5)
    with pytest.raises(ValueError, match="compact=False"):
        ftml(0.01, compact=False, state_bits=8)
    with pytest.raises(TypeError, match="state_bits"):
        ftml(0.01, state_bits=8.0)  # type: ignore[arg-type]


def test_resumed_from_a_flattened_state_is_bit_identical() -> None:
    tx = ftml(0.05, state_bits=4)
    params = {"w": jnp.ones(SHAPE), "b": jnp.ones(50)}
    step = jax.jit(lambda g, s, p: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))
    state = tx.init(params)
    for t in range(1, 4):
        params, state = step(_grads(t), state, params)
    leaves, treedef = jax.tree.flatten((params, state))
    saved = [np.asarray(x).copy() for x in leaves]  # a checkpoint: host arrays
    for t in range(4, 7):
        params, state = step(_grads(t), state, params)
    p2, s2 = jax.tree.unflatten(treedef, [jnp.asarray(x) for x in saved])
    for t in range(4, 7):
        p2, s2 = step(_grads(t), s2, p2)
    for a, b in zip(jax.tree.leaves((params, state)), jax.tree.leaves((p2, s2))):
        assert np.array_equal(np.asarray(a), np.asarray(b))
