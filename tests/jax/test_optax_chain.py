"""ftmlopt.optax built the optax way: ``scale_by_ftml`` and ``ftml`` as a chain of optax pieces.

The reference is ``ftml_direct``: the rule (:func:`ftmlopt.rule.compact_step`) evaluated exactly as
the monolithic ``ftml`` of before did (it still is that code), returning the rule's own weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftmlopt.optax import FTMLChainState, ScaleByFTMLState, from_compact_state, ftml, ftml_direct, scale_by_ftml

N = 32
STEPS = 12
POW2 = {"learning_rate": 0.125, "b1": 0.5, "b2": 0.875, "eps": 2.0**-20}  # lr a power of two
OPTIONS = {
    "plain": {},
    "coupled_wd": {"weight_decay": 0.25},
    "clip": {"clip_gradient": 0.75},
    "coupled_wd+clip": {"weight_decay": 0.25, "clip_gradient": 0.75},
    "decoupled_wd": {"weight_decay": 0.25, "decoupled_weight_decay": True},
    "decoupled_wd+clip": {"weight_decay": 0.25, "decoupled_weight_decay": True, "clip_gradient": 0.75},
}


def problem(dtype, steps=STEPS, n=N, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(n).astype(dtype), rng.standard_normal((steps, n)).astype(dtype)


def ulps(a, b, *terms) -> float:
    """Largest difference between a and b in units of the last place of b's dtype, at the magnitude
    of the largest of b and ``terms`` per element (a rounding is relative to the terms it adds: an
    element that cancels to near zero carries the ulps of the weight and step it came from)."""
    a, b = np.asarray(a), np.asarray(b)
    scale = np.max([np.abs(np.asarray(x, b.dtype)) for x in (b, *terms)], axis=0)
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)) / np.spacing(scale)))


def run_chain(tx, w0, grads, *, with_params=True):
    update = jax.jit(tx.update)
    params, state, out = jnp.asarray(w0), tx.init(jnp.asarray(w0)), []
    for g in grads:
        updates, state = update(jnp.asarray(g), state, params) if with_params else update(jnp.asarray(g), state)
        params = optax.apply_updates(params, updates)
        out.append((np.asarray(params), np.asarray(state.v)))
    return out


def run_direct(opt, w0, grads):
    step = jax.jit(opt.step)
    params, state, out = jnp.asarray(w0), opt.init(jnp.asarray(w0)), []
    for g in grads:
        params, state = step(jnp.asarray(g), state, params)
        out.append((np.asarray(params), np.asarray(state.v)))
    return out


# ============================================================================ same numbers as before
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", [c for c in OPTIONS if "decoupled" not in c])
def test_chain_is_bit_identical_to_the_rule_when_lr_is_a_power_of_two(case, dtype):
    """Without decoupled decay the chain computes the same products as the rule, with ``lr`` moved
    out of the step size: multiplying by a power of two is exact, so the weights and ``v`` are the
    rule's (``ftml_direct``, the former implementation) bit for bit, step after step."""
    w0, grads = problem(dtype)
    with jax.enable_x64(dtype == np.float64):
        chain = run_chain(ftml(**POW2, **OPTIONS[case]), w0, grads)
        direct = run_direct(ftml_direct(**POW2, **OPTIONS[case]), w0, grads)
    for t, ((w, v), (w_ref, v_ref)) in enumerate(zip(chain, direct)):
        assert w.dtype == dtype
        np.testing.assert_array_equal(w, w_ref, err_msg=f"{case} step {t}")
        np.testing.assert_array_equal(v, v_ref, err_msg=f"{case} step {t}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", list(OPTIONS))
def test_chain_follows_the_rule_within_rounding_for_any_lr(case, dtype):
    """lr 0.1 and the defaults' betas: the chain rounds ``lr * dir`` where the rule rounds
    ``lr (1-b1)/(1-b1^t)``, and decoupled decay is ``-lr (dir + wd w)`` against the rule's factor
    ``w (1 - lr wd)``. Each step from the rule's own weights then differs by a few ulps at most;
    ``v`` (which sees neither) is identical."""
    kwargs = {"learning_rate": 0.1, **OPTIONS[case]}
    w0, grads = problem(dtype)
    with jax.enable_x64(dtype == np.float64):
        tx, direct = ftml(**kwargs), ftml_direct(**kwargs)
        update, step = jax.jit(tx.update), jax.jit(direct.step)
        params = jnp.asarray(w0)
        s_chain, s_direct = tx.init(params), direct.init(params)
        for t in range(STEPS):
            g = jnp.asarray(grads[t])
            updates, s_chain = update(g, s_chain, params)
            mine = optax.apply_updates(params, updates)
            before = params
            params, s_direct = step(g, s_direct, params)
            err = ulps(mine, params, before, updates)
            assert err <= 4, (case, t, err)
            np.testing.assert_array_equal(s_chain.v, s_direct.v)
            assert int(s_chain.count) == int(s_direct.count) == t + 1


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_chain_rounds_the_float32_step_once(dtype):
    """The direction comes out in float32 for half gradients, so ``apply_updates`` rounds
    ``w + update`` once, as the rule does: the weights are the rule's to one ulp of the half type."""
    w0, grads = problem(np.float32)
    kwargs = {"learning_rate": 0.1, "weight_decay": 0.125, "clip_gradient": 1.0}
    tx, direct = ftml(**kwargs), ftml_direct(**kwargs)
    params = jnp.asarray(w0).astype(dtype)
    s_chain, s_direct = tx.init(params), direct.init(params)
    assert s_chain.v.dtype == jnp.float32
    for t in range(STEPS):
        g = jnp.asarray(grads[t]).astype(dtype)
        updates, s_chain = tx.update(g, s_chain, params)
        assert updates.dtype == jnp.float32
        mine = optax.apply_updates(params, updates)
        before = np.abs(np.asarray(params, np.float32))
        params, s_direct = direct.step(g, s_direct, params)
        assert mine.dtype == dtype
        # within one ulp of the half type at the magnitude of the old weight or the new one (the
        # float32 step itself differs by a float32 rounding, which can tip the half rounding)
        ulp = 2.0**-7 if dtype == jnp.bfloat16 else 2.0**-10
        mine32, ref32 = np.asarray(mine, np.float32), np.asarray(params, np.float32)
        assert np.all(np.abs(mine32 - ref32) <= ulp * np.maximum(before, np.abs(ref32))), t


# ============================================================================ params only where needed
def test_update_needs_no_params_without_weight_decay():
    w0, grads = problem(np.float32)
    kwargs = {"learning_rate": 0.1, "clip_gradient": 0.5}
    without = run_chain(ftml(**kwargs), w0, grads, with_params=False)
    direct = run_direct(ftml_direct(**kwargs), w0, grads)
    for (w, v), (w_ref, v_ref) in zip(without, direct):
        np.testing.assert_allclose(w, w_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(v, v_ref)
    tx = scale_by_ftml()
    direction, state = tx.update(jnp.asarray(grads[0]), tx.init(jnp.asarray(w0)))
    assert isinstance(state, ScaleByFTMLState) and int(state.count) == 1 and direction.shape == w0.shape


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"weight_decay": 0.1}, r"ftml with weight_decay=0.1 needs params .*tx.update\(grads, state, params\)"),
        ({"weight_decay": 0.1, "decoupled_weight_decay": True}, "decoupled_weight_decay=True needs params"),
        ({"compact": False}, r"compact=False\) \(MXNet's form\) .* need params"),
    ],
)
def test_update_without_params_names_the_option_that_needs_them(kwargs, pattern):
    tx = ftml(**kwargs)
    p = jnp.ones(2)
    with pytest.raises(ValueError, match=pattern):
        tx.update(p, tx.init(p))


def test_old_state_fields_still_read_and_state_is_checked():
    params = {"w": jnp.ones(3)}
    tx = ftml(0.1)
    state = tx.init(params)
    assert isinstance(state, FTMLChainState) and isinstance(state.ftml, ScaleByFTMLState)
    assert state.count.dtype == jnp.int32 and int(state.count) == 0
    assert jax.tree.structure(state.v) == jax.tree.structure(params)
    _, state = tx.update({"w": jnp.ones(3)}, state)
    assert int(state.count) == 1 and float(state.v["w"][0]) > 0
    with pytest.raises(TypeError, match="FTMLChainState"):
        tx.update({"w": jnp.ones(3)}, ftml(0.1, compact=False).init(params), params)
    with pytest.raises(TypeError, match="ScaleByFTMLState"):
        scale_by_ftml().update({"w": jnp.ones(3)}, state)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"b1": 1.0}, ValueError, "Invalid b1: 1.0"),
        ({"b2": -0.5}, ValueError, "Invalid b2: -0.5"),
        ({"eps": -1.0}, ValueError, "Invalid eps: -1.0"),
        ({"b2": "0.9"}, TypeError, "b2"),
        ({"state_dtype": jnp.int32}, TypeError, "Invalid state_dtype"),
        ({"b2": jnp.asarray(0.999, jnp.bfloat16)}, TypeError, "hyperparam_dtype=jnp.float32"),
    ],
)
def test_scale_by_ftml_rejects_bad_arguments_by_name(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        scale_by_ftml(**kwargs)


def test_mask_with_compact_false_is_refused():
    with pytest.raises(ValueError, match="Invalid mask"):
        ftml(compact=False, weight_decay=0.1, mask={"w": True})


# ============================================================================ optax's mask
@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("callable_mask", [False, True])
def test_mask_decays_only_the_masked_leaves(decoupled, callable_mask):
    """adamw's meaning: the weight decay acts where the mask is True; the other leaves step as with
    no decay at all (coupled L2 masked alike)."""
    w0, grads = problem(np.float32)
    params = {"kernel": jnp.asarray(w0), "bias": jnp.asarray(w0[::-1].copy())}
    mask_tree = {"kernel": True, "bias": False}

    def mask_fn(p):
        assert jax.tree.structure(p) == jax.tree.structure(params)  # optax calls it with the params
        return mask_tree

    mask = mask_fn if callable_mask else mask_tree
    kwargs = {"learning_rate": 0.1, "weight_decay": 0.25, "decoupled_weight_decay": decoupled}
    masked, decayed, plain = ftml(**kwargs, mask=mask), ftml(**kwargs), ftml(0.1)
    states = [tx.init(params) for tx in (masked, decayed, plain)]
    p_m, p_d, p_p = params, params, params
    for t in range(5):
        g = {"kernel": jnp.asarray(grads[t]), "bias": jnp.asarray(grads[t][::-1].copy())}
        u_m, states[0] = masked.update(g, states[0], p_m)
        u_d, states[1] = decayed.update(g, states[1], p_d)
        u_p, states[2] = plain.update(g, states[2], p_p)
        p_m, p_d, p_p = (optax.apply_updates(p, u) for p, u in ((p_m, u_m), (p_d, u_d), (p_p, u_p)))
        np.testing.assert_array_equal(p_m["kernel"], p_d["kernel"])
        np.testing.assert_array_equal(p_m["bias"], p_p["bias"])
    assert not np.array_equal(p_d["bias"], p_p["bias"])  # the decay does act where not masked out


# ============================================================================ compositions
def test_scale_by_ftml_then_scale_by_learning_rate_is_ftml():
    w0, grads = problem(np.float32)
    mine = optax.chain(scale_by_ftml(b1=0.5, b2=0.875, eps=2.0**-20), optax.scale_by_learning_rate(0.125))
    update = jax.jit(mine.update)
    ref = ftml(**POW2)
    ref_update = jax.jit(ref.update)
    state, r_state = mine.init(jnp.asarray(w0)), ref.init(jnp.asarray(w0))
    for t in range(STEPS):
        u, state = update(jnp.asarray(grads[t]), state)
        u_ref, r_state = ref_update(jnp.asarray(grads[t]), r_state)
        np.testing.assert_array_equal(u, u_ref)
        np.testing.assert_array_equal(state[0].v, r_state.v)


def test_direction_sign_and_value_by_hand():
    """One step by hand: v = (1-b2) g^2, v_hat = g^2, out = (1-b1)/(1-b1) g / (|g| + eps) = sign(g)
    (for eps 0), the direction of increase, as scale_by_adam's; a zero gradient gives 0 (eps > 0)."""
    tx = scale_by_ftml(b1=0.6, b2=0.999, eps=0.0)
    g = jnp.asarray([0.5, -2.0])
    out, state = tx.update(g, tx.init(g))
    np.testing.assert_allclose(out, [1.0, -1.0], rtol=1e-6)
    zero, _ = scale_by_ftml().update(jnp.zeros(2), scale_by_ftml().init(g))
    np.testing.assert_array_equal(zero, [0.0, 0.0])
    one_minus_b2 = np.float64(1 - np.float32(0.999))  # b2 taken in the compute dtype (float32)
    np.testing.assert_allclose(state.v, one_minus_b2 * np.asarray(g, np.float64) ** 2, rtol=1e-6)
    out2, _ = tx.update(g, state)  # t = 2: (1-b1)/(1-b1^2) g / (sqrt(v2/(1-b2^2)) + 0) = g/|g| / 1.6
    np.testing.assert_allclose(out2, np.array([1.0, -1.0]) / 1.6, rtol=1e-5)


def test_composes_with_clip_by_global_norm():
    _, grads = problem(np.float32)
    g = jnp.asarray(grads[0])
    assert float(jnp.linalg.norm(g)) > 1.0  # so the clip acts
    tx = optax.chain(optax.clip_by_global_norm(1.0), scale_by_ftml(), optax.scale_by_learning_rate(0.1))
    ref = optax.chain(scale_by_ftml(), optax.scale_by_learning_rate(0.1))
    u, _ = jax.jit(tx.update)(g, tx.init(g))
    u_ref, _ = jax.jit(ref.update)(g / jnp.linalg.norm(g), ref.init(g))
    np.testing.assert_allclose(u, u_ref, rtol=1e-6, atol=1e-7)


def test_composes_with_inject_hyperparams_and_the_betas_can_change_without_recompiling():
    w0, grads = problem(np.float32)
    injected = optax.inject_hyperparams(scale_by_ftml)(b1=0.6, b2=0.999)
    update = jax.jit(injected.update)
    state = injected.init(jnp.asarray(w0))
    plain, p_state = scale_by_ftml(b1=0.6, b2=0.999), scale_by_ftml().init(jnp.asarray(w0))
    u, state = update(jnp.asarray(grads[0]), state)
    u_ref, p_state = plain.update(jnp.asarray(grads[0]), p_state)
    np.testing.assert_allclose(u, u_ref, rtol=1e-6)
    state.hyperparams["b1"] = jnp.asarray(0.9, jnp.float32)
    u2, state = update(jnp.asarray(grads[1]), state)
    u2_ref, _ = scale_by_ftml(b1=0.9, b2=0.999).update(jnp.asarray(grads[1]), p_state)
    np.testing.assert_allclose(u2, u2_ref, rtol=1e-6)
    assert update._cache_size() == 1
    # ftml itself under inject_hyperparams: lr and weight decay injected, no params needed for lr only
    inj = optax.inject_hyperparams(ftml)(learning_rate=0.1)
    u3, _ = jax.jit(inj.update)(jnp.asarray(grads[0]), inj.init(jnp.asarray(w0)))
    u3_ref, _ = ftml(0.1).update(jnp.asarray(grads[0]), ftml(0.1).init(jnp.asarray(w0)))
    np.testing.assert_allclose(u3, u3_ref, rtol=1e-6)


def test_composes_with_multisteps():
    w0, grads = problem(np.float32, steps=6)
    inner = optax.chain(scale_by_ftml(), optax.scale_by_learning_rate(0.1))
    tx = optax.MultiSteps(inner, every_k_schedule=3)
    update = jax.jit(tx.update)
    params, ref = jnp.asarray(w0), jnp.asarray(w0)
    state, r_state = tx.init(params), inner.init(ref)
    for k in range(2):
        for i in range(3):
            updates, state = update(jnp.asarray(grads[3 * k + i]), state)
            params = optax.apply_updates(params, updates)
        u_ref, r_state = inner.update(jnp.asarray(grads[3 * k : 3 * k + 3].mean(0)), r_state)
        ref = optax.apply_updates(ref, u_ref)
        # MultiSteps averages the three gradients in its own order (a running mean), not as .mean(0):
        # the two trajectories differ by float32 rounding, up to an ulp or two of |w| ~ 1 (atol)
        np.testing.assert_allclose(params, ref, rtol=1e-6, atol=2.5e-7)
    assert int(state.inner_opt_state[0].count) == 2


def test_composes_with_multi_transform():
    """FTML on the kernels, SGD on the biases: each part steps as it would alone."""
    w0, grads = problem(np.float32)
    params = {"kernel": jnp.asarray(w0), "bias": jnp.zeros(3)}
    labels = {"kernel": "ftml", "bias": "sgd"}
    inner = {"ftml": ftml(0.1, weight_decay=0.01, decoupled_weight_decay=True), "sgd": optax.sgd(0.5)}
    tx = optax.multi_transform(inner, labels)
    alone = ftml(0.1, weight_decay=0.01, decoupled_weight_decay=True)
    state, a_state = tx.init(params), alone.init(params["kernel"])
    kernel = params["kernel"]
    update, alone_update = jax.jit(tx.update), jax.jit(alone.update)  # both jitted: the same fusion
    for t in range(4):
        g = {"kernel": jnp.asarray(grads[t]), "bias": jnp.ones(3)}
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
        u, a_state = alone_update(g["kernel"], a_state, kernel)
        kernel = optax.apply_updates(kernel, u)
        np.testing.assert_array_equal(params["kernel"], kernel)
    np.testing.assert_allclose(params["bias"], -2.0 * np.ones(3))


@pytest.mark.parametrize("schedule", [False, True])
def test_an_old_compact_state_is_named_and_converts_to_go_on_where_it_was(schedule):
    """An FTMLCompactState (the old ftml's state, e.g. from a checkpoint) is refused with the fix
    named; converted, the chain continues the run exactly as the rule does (lr a power of two)."""
    w0, grads = problem(np.float32)
    lr = optax.exponential_decay(0.125, 1, 0.5) if schedule else 0.125
    kwargs = {**POW2, "learning_rate": lr, "weight_decay": 0.25}
    direct, tx = ftml_direct(**kwargs), ftml(**kwargs)
    params = jnp.asarray(w0)
    old = direct.init(params)
    for t in range(3):
        params, old = direct.step(jnp.asarray(grads[t]), old, params)
    with pytest.raises(TypeError, match=r"from_compact_state\(tx.init\(params\), state\)"):
        tx.update(jnp.asarray(grads[3]), old, params)
    state = from_compact_state(tx.init(params), old)
    assert int(state.count) == 3
    p_chain = params
    for t in range(3, 6):
        updates, state = tx.update(jnp.asarray(grads[t]), state, p_chain)
        p_chain = optax.apply_updates(p_chain, updates)
        params, old = direct.step(jnp.asarray(grads[t]), old, params)
        np.testing.assert_allclose(p_chain, params, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(state.v, old.v)
    with pytest.raises(TypeError, match="FTMLChainState and an FTMLCompactState"):
        from_compact_state(old, old)


def test_float64_state_makes_the_direction_float64():
    """rule.compute_dtype: float32 gradients with a float64 v are computed in float64 (x64 on)."""
    w0, grads = problem(np.float32)
    with jax.enable_x64(True):
        tx = scale_by_ftml(b1=0.5, b2=0.875, eps=2.0**-20, state_dtype=jnp.float64)
        state = tx.init(jnp.asarray(w0))
        v = np.zeros(N)
        for t in range(1, 6):
            g = np.asarray(grads[t - 1], np.float64)
            out, state = tx.update(jnp.asarray(grads[t - 1]), state)
            v = 0.875 * v + 0.125 * g * g
            want = 0.5 / (1 - 0.5**t) * g / (np.sqrt(v / (1 - 0.875**t)) + 2.0**-20)
            assert out.dtype == jnp.float64 and state.v.dtype == jnp.float64
            np.testing.assert_allclose(state.v, v, rtol=1e-13)
            np.testing.assert_allclose(out, want, rtol=1e-12)
