"""ftmlopt.optax against the MXNet-exact NumPy operator, plus the optax conventions it must follow.

Parity is measured per tensor as ``max|actual - expected| / max|expected|``: FTML's ``z`` (hence
``w = -z/d``) is a difference of nearly equal terms for some elements, and XLA fuses ``a*b + c``
into one FMA under ``jax.jit``, so an element near zero can differ from MXNet's twice-rounded
value by an error that is one ulp of the *terms* but large relative to the element itself.
"""

from __future__ import annotations

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ftmlopt.core.functional
import ftmlopt.optax
from ftmlopt import ftml_update
from ftmlopt.optax import FTMLCompactState, FTMLState, ftml, ftml_direct

N = 64
STEPS = 30


def rel_err(actual, expected) -> float:
    """Tensor-wise relative error: max abs difference over the largest expected magnitude."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    scale = np.max(np.abs(expected))
    return float(np.max(np.abs(actual - expected)) / (scale if scale > 0 else 1.0))


def snapshot(a: np.ndarray) -> jax.Array:
    """A JAX array of a private copy of ``a``.

    ``jnp.asarray`` may alias a NumPy buffer on CPU and JAX runs asynchronously, so an array that
    ``ftml_update`` later updates in place must not be handed to JAX directly.
    """
    return jnp.asarray(np.array(a, copy=True))


def problem(dtype, steps=STEPS, n=N, seed=0):
    rng = np.random.default_rng(seed)
    w0 = rng.standard_normal(n).astype(dtype)
    grads = rng.standard_normal((steps, n)).astype(dtype)
    return w0, grads


# (optax kwargs, ftml_update kwargs); lr/b1/b2/eps are exact in float32 so fp64 parity is meaningful.
CASES = {
    "plain": ({}, {}),
    "wd": ({"weight_decay": 0.03125}, {"wd": 0.03125}),
    "clip": ({"clip_gradient": 0.5}, {"clip_grad": 0.5}),
    "wd+clip": ({"weight_decay": 0.25, "clip_gradient": 0.75}, {"wd": 0.25, "clip_grad": 0.75}),
}
HYPER = {"learning_rate": 0.125, "b1": 0.5, "b2": 0.875, "eps": 2.0**-20}
MX_HYPER = {"lr": 0.125, "beta1": 0.5, "beta2": 0.875, "epsilon": 2.0**-20}


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_parity_per_step_from_same_state(case):
    """Each step starts from MXNet's state; new weight and d, v, z agree within 1e-6."""
    okw, mkw = CASES[case]
    w0, grads = problem(np.float32)
    tx = ftml(**HYPER, **okw)
    update = jax.jit(tx.update)
    w, d, v, z = w0.copy(), np.zeros_like(w0), np.zeros_like(w0), np.zeros_like(w0)
    for t in range(1, STEPS + 1):
        state = FTMLState(jnp.int32(t - 1), snapshot(d), snapshot(v), snapshot(z))
        updates, state = update(jnp.asarray(grads[t - 1]), state, snapshot(w))
        new = optax.apply_updates(snapshot(w), updates)
        ftml_update(w, grads[t - 1], d, v, z, t=t, out=w, **MX_HYPER, **mkw)
        assert int(state.count) == t
        for name, got, want in (("w", new, w), ("d", state.d, d), ("v", state.v, v), ("z", state.z, z)):
            assert rel_err(got, want) <= 1e-6, (case, t, name, rel_err(got, want))


@pytest.mark.parametrize("case", ["plain", "wd+clip"])
def test_fp32_trajectory_parity(case):
    """Free-running trajectories (errors may accumulate) stay within 1e-5 over 100 steps."""
    okw, mkw = CASES[case]
    w0, grads = problem(np.float32, steps=100)
    tx = ftml(**HYPER, **okw)
    update = jax.jit(tx.update)
    params = {"w": jnp.asarray(w0)}
    state = tx.init(params)
    w, d, v, z = w0.copy(), np.zeros_like(w0), np.zeros_like(w0), np.zeros_like(w0)
    for t in range(1, 101):
        updates, state = update({"w": jnp.asarray(grads[t - 1])}, state, params)
        params = optax.apply_updates(params, updates)
        ftml_update(w, grads[t - 1], d, v, z, t=t, out=w, **MX_HYPER, **mkw)
        assert rel_err(params["w"], w) <= 1e-5, (t, rel_err(params["w"], w))
        assert rel_err(state.z["w"], z) <= 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_fp64_trajectory_parity(case):
    """float64 (x64 enabled): the whole free-running trajectory within 1e-12, states included."""
    okw, mkw = CASES[case]
    w0, grads = problem(np.float64)
    with jax.enable_x64(True):
        tx = ftml_direct(**HYPER, **okw)
        step = jax.jit(tx.step)
        params = jnp.asarray(w0)
        state = tx.init(params)
        assert params.dtype == jnp.float64 and state.z.dtype == jnp.float64
        w, d, v, z = w0.copy(), np.zeros_like(w0), np.zeros_like(w0), np.zeros_like(w0)
        for t in range(1, STEPS + 1):
            params, state = step(jnp.asarray(grads[t - 1]), state, params)
            ftml_update(w, grads[t - 1], d, v, z, t=t, out=w, **MX_HYPER, **mkw)
            for got, want in ((params, w), (state.d, d), (state.v, v), (state.z, z)):
                assert rel_err(got, want) <= 1e-12, (t, rel_err(got, want))


def test_direct_form_sets_weight_to_minus_z_over_d():
    """The direct form returns -z/d itself; apply_updates(p, n - p) agrees to within rounding."""
    w0, grads = problem(np.float32)
    direct = jax.jit(ftml_direct(**HYPER).step)
    tx = ftml(**HYPER)
    update = jax.jit(tx.update)
    p_direct = p_tx = jnp.asarray(w0)
    s_direct = s_tx = tx.init(p_tx)
    for t in range(STEPS):
        g = jnp.asarray(grads[t])
        p_direct, s_direct = direct(g, s_direct, p_direct)
        np.testing.assert_array_equal(np.asarray(p_direct), -np.asarray(s_direct.z) / np.asarray(s_direct.d))
        updates, s_tx = update(g, s_tx, p_tx)
        p_tx = optax.apply_updates(p_tx, updates)
        assert rel_err(p_tx, p_direct) <= 1e-6


def test_compact_form_matches_numpy_formula_and_full_form():
    """Compact form against the closed form in NumPy float64, and against the full form (Theorem 1)."""
    w0, grads = problem(np.float64)
    lr, b1, b2, eps, wd, c = 0.125, 0.5, 0.875, 2.0**-20, 0.0625, 1.5
    with jax.enable_x64(True):
        compact = jax.jit(ftml_direct(lr, b1, b2, eps, wd, c, compact=True).step)
        full = jax.jit(ftml_direct(lr, b1, b2, eps, wd, c).step)
        pc = pf = jnp.asarray(w0)
        sc = ftml_direct(compact=True).init(pc)
        sf = ftml_direct().init(pf)
        assert isinstance(sc, FTMLCompactState) and set(sc._fields) == {"count", "v"}
        w, v = w0.copy(), np.zeros_like(w0)
        for t in range(1, STEPS + 1):
            pc, sc = compact(jnp.asarray(grads[t - 1]), sc, pc)
            pf, sf = full(jnp.asarray(grads[t - 1]), sf, pf)
            gp = np.clip(grads[t - 1] + wd * w, -c, c)
            v = b2 * v + (1 - b2) * gp**2
            w = w - lr * (1 - b1) / (1 - b1**t) * gp / (np.sqrt(v / (1 - b2**t)) + eps)
            assert rel_err(pc, w) <= 1e-12
            assert rel_err(sc.v, v) <= 1e-12
            assert rel_err(pf, pc) <= 1e-9  # same rule in exact arithmetic; rounding accumulates differently


def test_schedule_is_evaluated_at_count_before_the_step():
    w0, grads = problem(np.float32)
    schedule = optax.exponential_decay(0.25, transition_steps=1, decay_rate=0.5)
    tx = ftml(schedule, b1=0.5, b2=0.875, eps=2.0**-20)
    update = jax.jit(tx.update)
    params = jnp.asarray(w0)
    state = tx.init(params)
    w, d, v, z = w0.copy(), np.zeros_like(w0), np.zeros_like(w0), np.zeros_like(w0)
    for t in range(1, 11):
        updates, state = update(jnp.asarray(grads[t - 1]), state, params)
        params = optax.apply_updates(params, updates)
        lr_t = 0.25 * 0.5 ** (t - 1)  # exact powers of two
        ftml_update(w, grads[t - 1], d, v, z, lr=lr_t, t=t, beta1=0.5, beta2=0.875, epsilon=2.0**-20, out=w)
        assert rel_err(params, w) <= 1e-5
        assert rel_err(state.d, d) <= 1e-5


def test_inject_hyperparams_matches_plain_and_lr_can_change_without_recompiling():
    w0, grads = problem(np.float32)
    params = {"w": jnp.asarray(w0)}
    plain = ftml(learning_rate=0.125, clip_gradient=0.5)
    injected = optax.inject_hyperparams(ftml)(learning_rate=0.125, clip_gradient=0.5)
    up_plain, up_inj = jax.jit(plain.update), jax.jit(injected.update)
    s_plain, s_inj = plain.init(params), injected.init(params)
    g = {"w": jnp.asarray(grads[0])}
    u_plain, s_plain = up_plain(g, s_plain, params)
    u_inj, s_inj = up_inj(g, s_inj, params)
    np.testing.assert_allclose(u_inj["w"], u_plain["w"], rtol=1e-6, atol=1e-7)
    for a, b in zip(jax.tree.leaves(s_inj.inner_state), jax.tree.leaves(s_plain)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # Change the learning rate in the state: the next step must use it, with no new compilation.
    s_inj.hyperparams["learning_rate"] = jnp.asarray(0.0625, jnp.float32)
    p1 = optax.apply_updates(params, u_inj)
    u2, s_inj = up_inj({"w": jnp.asarray(grads[1])}, s_inj, p1)
    assert up_inj._cache_size() == 1
    ref = ftml(learning_rate=0.0625, clip_gradient=0.5)
    u_ref, _ = ref.update({"w": jnp.asarray(grads[1])}, s_plain, p1)
    np.testing.assert_allclose(u2["w"], u_ref["w"], rtol=1e-5, atol=1e-6)


def test_chain_after_clip_by_global_norm_equals_clipping_by_hand():
    w0, grads = problem(np.float32)
    chained = optax.chain(optax.clip_by_global_norm(1.0), ftml(**HYPER))
    alone = ftml(**HYPER)
    params = jnp.asarray(w0)
    s_chain, s_alone = chained.init(params), alone.init(params)
    g = jnp.asarray(grads[0])
    g_clipped = g / jnp.linalg.norm(g)  # the norm is > 1 for 64 standard normals
    assert float(jnp.linalg.norm(g)) > 1.0
    u_chain, _ = jax.jit(chained.update)(g, s_chain, params)
    u_alone, _ = jax.jit(alone.update)(g_clipped, s_alone, params)
    np.testing.assert_allclose(u_chain, u_alone, rtol=1e-6, atol=1e-7)


def test_pytrees_are_handled_leaf_by_leaf_and_no_recompilation():
    rng = np.random.default_rng(1)
    params = {
        "dense": {"kernel": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32), "bias": jnp.zeros(4)},
        "scale": jnp.asarray(1.5, jnp.float32),
        "stack": [jnp.asarray(rng.standard_normal(2), jnp.float32), (jnp.ones((2, 2)),)],
    }
    tx = ftml(**HYPER)
    state = tx.init(params)
    assert state.count.dtype == jnp.int32 and state.count.shape == ()
    for tree in (state.d, state.v, state.z):
        assert jax.tree.structure(tree) == jax.tree.structure(params)
        assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(params)))
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    update = jax.jit(tx.update)
    for _ in range(2):
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert update._cache_size() == 1
    # each leaf behaves as if it were alone (checked against the NumPy operator)
    w = np.asarray(rng.standard_normal(2), np.float32)
    leaf_tx = ftml(**HYPER)
    leaf_state = leaf_tx.init(jnp.asarray(w))
    u, _ = leaf_tx.update(jnp.full(2, 0.5, jnp.float32), leaf_state, jnp.asarray(w))
    d, v, z = np.zeros(2, np.float32), np.zeros(2, np.float32), np.zeros(2, np.float32)
    expected = ftml_update(w, np.full(2, 0.5, np.float32), d, v, z, t=1, **MX_HYPER)
    assert rel_err(np.asarray(w) + np.asarray(u), expected) <= 1e-6


def test_extra_args_are_ignored():
    tx = ftml()
    p = jnp.ones(3)
    u1, _ = tx.update(p, tx.init(p), p)
    u2, _ = tx.update(p, tx.init(p), p, value=jnp.asarray(1.0), unknown_kwarg="x")
    np.testing.assert_array_equal(u1, u2)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_computes_in_float32_and_keeps_float32_state(dtype):
    w0, grads = problem(np.float32, steps=5)
    params = jnp.asarray(w0).astype(dtype)
    tx = ftml(**HYPER)
    state = tx.init(params)
    assert {leaf.dtype for leaf in (state.d, state.v, state.z)} == {jnp.dtype(jnp.float32)}
    update = jax.jit(tx.update)
    for t in range(1, 6):
        g = jnp.asarray(grads[t - 1]).astype(dtype)
        # reference: float32 operator from the same (float32) state, weight rounded once
        w32 = np.asarray(params.astype(jnp.float32))
        d, v, z = (np.array(x) for x in (state.d, state.v, state.z))
        expected = ftml_update(w32, np.asarray(g.astype(jnp.float32)), d, v, z, t=t, **MX_HYPER)
        updates, state = update(g, state, params)
        assert updates.dtype == dtype
        params = optax.apply_updates(params, updates)
        assert params.dtype == dtype
        assert rel_err(state.z, z) <= 1e-6 and rel_err(state.v, v) <= 1e-6
        # one rounding to the half type (8 or 11 significant bits), plus the p + (n - p) addition
        assert rel_err(params.astype(jnp.float32), expected) <= 2.0 ** -(7 if dtype == jnp.bfloat16 else 10)


def test_direct_form_in_bfloat16_is_float32_result_rounded_once():
    w0, grads = problem(np.float32, steps=3)
    opt = ftml_direct(**HYPER)
    params = jnp.asarray(w0).astype(jnp.bfloat16)
    state = opt.init(params)
    for t in range(1, 4):
        w32 = np.asarray(params.astype(jnp.float32))
        d, v, z = (np.array(x) for x in (state.d, state.v, state.z))
        g = jnp.asarray(grads[t - 1]).astype(jnp.bfloat16)
        expected = ftml_update(w32, np.asarray(g.astype(jnp.float32)), d, v, z, t=t, **MX_HYPER)
        params, state = opt.step(g, state, params)  # eager: op by op, no FMA contraction
        rounded = np.asarray(jnp.asarray(expected).astype(jnp.bfloat16).astype(jnp.float32))
        got = np.asarray(params.astype(jnp.float32))
        # equal, or one bfloat16 ulp apart where the float32 value sat on a rounding boundary
        assert np.all(np.abs(got - rounded) <= np.abs(rounded) * 2.0**-7)
        assert np.mean(got == rounded) > 0.9


def test_state_dtypes_are_stable_under_jit_and_cond():
    params = {"a": jnp.ones(3, jnp.bfloat16), "b": jnp.ones(2, jnp.float32)}
    tx = ftml()
    state = tx.init(params)

    @jax.jit
    def maybe_step(flag, state):
        def do(s):
            return tx.update(params, s, params)[1]

        return jax.lax.cond(flag, do, lambda s: s, state)

    new = maybe_step(True, state)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), new) == jax.tree.map(lambda x: (x.shape, x.dtype), state)


def test_converges_on_a_quadratic():
    target = jnp.asarray([1.0, -2.0, 3.0])
    tx = ftml(learning_rate=0.05)

    def loss(p):
        return jnp.sum((p - target) ** 2)

    @jax.jit
    def train_step(p, s):
        updates, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, updates), s

    p = jnp.zeros(3)
    s = tx.init(p)
    for _ in range(1000):
        p, s = train_step(p, s)
    np.testing.assert_allclose(p, target, atol=2e-2)


def test_update_without_params_raises():
    tx = ftml()
    p = jnp.ones(2)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(p, tx.init(p))


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"learning_rate": 0.0}, ValueError, "learning_rate"),
        ({"learning_rate": float("nan")}, ValueError, "learning_rate"),
        ({"learning_rate": "0.1"}, TypeError, "learning_rate"),
        ({"b1": 1.0}, ValueError, "b1"),
        ({"b2": -0.1}, ValueError, "b2"),
        ({"eps": -1e-8}, ValueError, "eps"),
        ({"weight_decay": -0.5}, ValueError, "weight_decay"),
        ({"weight_decay": float("inf")}, ValueError, "weight_decay"),
        ({"clip_gradient": 0.0}, ValueError, "clip_gradient"),
        ({"clip_gradient": -1.0}, ValueError, "clip_gradient"),
        ({"clip_gradient": float("inf")}, ValueError, "clip_gradient"),
        ({"clip_gradient": "1"}, TypeError, "clip_gradient"),
        ({"compact": 1}, TypeError, "compact"),
    ],
)
@pytest.mark.parametrize("factory", [ftml, ftml_direct])
def test_bad_arguments_are_rejected_by_name(factory, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        factory(**kwargs)


def test_integer_parameters_are_rejected():
    with pytest.raises(TypeError, match="int32"):
        ftml().init({"w": jnp.ones(2, jnp.int32)})


@pytest.mark.parametrize("module", [ftmlopt.optax, ftmlopt.core.functional])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_matches_the_torch_front_end_fp32_per_step():
    """optax and ftmlopt.torch.FTML, both started from MXNet's state at every step, agree within 1e-6."""
    import torch

    from ftmlopt.torch import FTML as TorchFTML

    w0, grads = problem(np.float32)
    okw, mkw = CASES["wd+clip"]
    update = jax.jit(ftml(**HYPER, **okw).update)
    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = TorchFTML([p], lr=0.125, betas=(0.5, 0.875), eps=2.0**-20, weight_decay=0.25, clip_gradient=0.75)
    w, d, v, z = w0.copy(), np.zeros_like(w0), np.zeros_like(w0), np.zeros_like(w0)
    for t in range(1, STEPS + 1):
        if t > 1:  # the torch optimizer creates its state on the first step
            with torch.no_grad():
                p.copy_(torch.from_numpy(w))
                for key, ref in (("d", d), ("v", v), ("z", z)):
                    opt.state[p][key].copy_(torch.from_numpy(ref))
        state = FTMLState(jnp.int32(t - 1), snapshot(d), snapshot(v), snapshot(z))
        updates, state = update(jnp.asarray(grads[t - 1]), state, snapshot(w))
        new = optax.apply_updates(snapshot(w), updates)
        p.grad = torch.from_numpy(grads[t - 1].copy())
        opt.step()
        ftml_update(w, grads[t - 1], d, v, z, t=t, out=w, **MX_HYPER, **mkw)
        assert rel_err(new, p.detach().numpy()) <= 1e-6, t
        for key, mine in (("d", state.d), ("v", state.v), ("z", state.z)):
            assert rel_err(mine, opt.state[p][key].numpy()) <= 1e-6, (t, key)


def test_matches_the_torch_front_end_fp64_trajectory():
    import torch

    from ftmlopt.torch import FTML as TorchFTML

    w0, grads = problem(np.float64)
    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = TorchFTML([p], lr=0.125, betas=(0.5, 0.875), eps=2.0**-20, weight_decay=0.25, clip_gradient=0.75)
    with jax.enable_x64(True):
        tx = ftml(**HYPER, weight_decay=0.25, clip_gradient=0.75)
        update = jax.jit(tx.update)
        params = jnp.asarray(w0)
        state = tx.init(params)
        for t in range(STEPS):
            updates, state = update(jnp.asarray(grads[t]), state, params)
            params = optax.apply_updates(params, updates)
            p.grad = torch.from_numpy(grads[t].copy())
            opt.step()
            assert rel_err(params, p.detach().numpy()) <= 1e-12, t
            assert rel_err(state.z, opt.state[p]["z"].numpy()) <= 1e-12, t
