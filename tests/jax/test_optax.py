"""ftmlopt.optax: both forms against the MXNet-exact NumPy operator and the NumPy closed form, the
measured problems of the old front end, and the optax conventions it must follow.

Parity is measured per tensor as ``max|actual - expected| / max|expected|``: FTML's ``z`` is a
difference of nearly equal terms for some elements, and XLA fuses ``a*b + c`` into one FMA under
``jax.jit``, so an element near zero can differ from MXNet's twice-rounded value by an error that is
one ulp of the *terms* but large relative to the element itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftmlopt import ftml_update
from ftmlopt.optax import FTMLChainState, FTMLCompactState, FTMLState, ftml, ftml_direct

N = 64
STEPS = 30


def rel_err(actual, expected) -> float:
    """Tensor-wise relative error: max abs difference over the largest expected magnitude."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    scale = np.max(np.abs(expected))
    return float(np.max(np.abs(actual - expected)) / (scale if scale > 0 else 1.0))


def snapshot(a: np.ndarray) -> jax.Array:
    """A JAX array of a private copy of ``a`` (``ftml_update`` later writes into ``a`` in place)."""
    return jnp.asarray(np.array(a, copy=True))


def problem(dtype, steps=STEPS, n=N, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(n).astype(dtype), rng.standard_normal((steps, n)).astype(dtype)


# (optax kwargs, ftml_update kwargs); lr/b1/b2/eps are exact in float32 so fp64 parity is meaningful.
CASES = {
    "plain": ({}, {}),
    "wd": ({"weight_decay": 0.03125}, {"wd": 0.03125}),
    "clip": ({"clip_gradient": 0.5}, {"clip_grad": 0.5}),
    "wd+clip": ({"weight_decay": 0.25, "clip_gradient": 0.75}, {"wd": 0.25, "clip_grad": 0.75}),
}
HYPER = {"learning_rate": 0.125, "b1": 0.5, "b2": 0.875, "eps": 2.0**-20}
MX_HYPER = {"lr": 0.125, "beta1": 0.5, "beta2": 0.875, "epsilon": 2.0**-20}

#: The three ways to run FTML: the default (compact) transformation, MXNet's form, the direct form.
FORMS = ["compact", "mxnet", "direct"]


def stepper(form: str, **kwargs):
    """``(init, step)`` with ``step(grads, state, params) -> (params, state)`` for a form."""
    if form == "direct":
        opt = ftml_direct(**kwargs)
        return opt.init, opt.step
    tx = ftml(compact=form == "compact", **kwargs)

    def step(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return tx.init, step


def numpy_compact(w, grads, lrs, b1, b2, eps, wd=0.0, decoupled=False, clip=None):
    """The compact rule in NumPy float64, written out from the paper (reference for every form)."""
    w = np.array(w, np.float64)
    v = np.zeros_like(w)
    out = []
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        g = np.asarray(g, np.float64)
        if decoupled:
            w = w * (1 - lr * wd)
        else:
            g = g + wd * w
        if clip is not None:
            g = np.clip(g, -clip, clip)
        v = b2 * v + (1 - b2) * g * g
        w = w - lr * (1 - b1) / (1 - b1**t) * g / (np.sqrt(v / (1 - b2**t)) + eps)
        out.append((w.copy(), v.copy()))
    return out


# ============================================================================ MXNet form vs ftml_update
@pytest.mark.parametrize("case", list(CASES))
def test_mxnet_form_per_step_parity_from_the_same_state(case):
    """Each step starts from MXNet's state; new weight and d, v, z agree within 1e-6 (float32)."""
    okw, mkw = CASES[case]
    w0, grads = problem(np.float32)
    update = jax.jit(ftml(**HYPER, **okw, compact=False).update)
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
def test_mxnet_form_fp32_trajectory_parity(case):
    """Free-running float32 trajectories (errors may accumulate) stay within 1e-5 over 100 steps."""
    okw, mkw = CASES[case]
    w0, grads = problem(np.float32, steps=100)
    tx = ftml(**HYPER, **okw, compact=False)
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
def test_mxnet_form_fp64_trajectory_parity(case):
    """float64 (x64 enabled): the whole free-running trajectory within 1e-12, states included."""
    okw, mkw = CASES[case]
    w0, grads = problem(np.float64)
    with jax.enable_x64(True):
        opt = ftml_direct(**HYPER, **okw, compact=False)
        step = jax.jit(opt.step)
        params = jnp.asarray(w0)
        state = opt.init(params)
        assert params.dtype == jnp.float64 and state.z.dtype == jnp.float64
        w, d, v, z = w0.copy(), np.zeros_like(w0), np.zeros_like(w0), np.zeros_like(w0)
        for t in range(1, STEPS + 1):
            params, state = step(jnp.asarray(grads[t - 1]), state, params)
            ftml_update(w, grads[t - 1], d, v, z, t=t, out=w, **MX_HYPER, **mkw)
            for got, want in ((params, w), (state.d, d), (state.v, v), (state.z, z)):
                assert rel_err(got, want) <= 1e-12, (t, rel_err(got, want))


# ============================================================================ the compact form (default)
def test_compact_is_the_default_and_stores_v_only():
    params = {"w": jnp.ones(3)}
    direct = ftml_direct().init(params)
    assert isinstance(direct, FTMLCompactState) and direct._fields == ("count", "v")
    chained = ftml().init(params)  # optax's chain around scale_by_ftml: one v, no d or z
    assert isinstance(chained, FTMLChainState) and chained.ftml._fields == ("count", "v")
    assert [type(s).__name__ for s in chained.inner] == ["ScaleByFTMLState", "EmptyState"]
    assert isinstance(ftml(compact=False).init(params), FTMLState)


@pytest.mark.parametrize("case", list(CASES))
def test_every_form_matches_the_numpy_closed_form_fp64(case):
    """All three forms against the compact rule written out in NumPy float64 (Theorem 1 for MXNet's)."""
    okw, _ = CASES[case]
    w0, grads = problem(np.float64)
    ref = numpy_compact(
        w0, grads, [0.125] * STEPS, 0.5, 0.875, 2.0**-20, wd=okw.get("weight_decay", 0.0), clip=okw.get("clip_gradient")
    )
    with jax.enable_x64(True):
        for form in FORMS:
            init, step = stepper(form, **HYPER, **okw)
            step = jax.jit(step)
            params = jnp.asarray(w0)
            state = init(params)
            for t in range(STEPS):
                params, state = step(jnp.asarray(grads[t]), state, params)
                assert rel_err(params, ref[t][0]) <= 1e-12, (form, t, rel_err(params, ref[t][0]))
                assert rel_err(state.v, ref[t][1]) <= 1e-12, (form, t)


@pytest.mark.parametrize("form", FORMS)
def test_direct_form_and_update_form_give_the_same_weights(form):
    """``apply_updates(p, n - p)`` agrees with the direct form's ``n`` to within rounding."""
    w0, grads = problem(np.float32)
    direct = jax.jit(ftml_direct(**HYPER, compact=form != "mxnet").step)
    tx = ftml(**HYPER, compact=form != "mxnet")
    update = jax.jit(tx.update)
    p_direct = p_tx = jnp.asarray(w0)
    s_direct, s_tx = ftml_direct(**HYPER, compact=form != "mxnet").init(p_tx), tx.init(p_tx)
    for t in range(STEPS):
        g = jnp.asarray(grads[t])
        p_direct, s_direct = direct(g, s_direct, p_direct)
        updates, s_tx = update(g, s_tx, p_tx)
        p_tx = optax.apply_updates(p_tx, updates)
        assert rel_err(p_tx, p_direct) <= 1e-6
    if form == "mxnet":  # w = -z/d, up to the rounding of z = -(w d)
        assert rel_err(-np.asarray(s_direct.z) / np.asarray(s_direct.d), p_direct) <= 1e-6


@pytest.mark.parametrize("form", FORMS)
def test_schedule_is_evaluated_at_count_before_the_step(form):
    w0, grads = problem(np.float64, steps=10)
    schedule = optax.exponential_decay(0.25, transition_steps=1, decay_rate=0.5)
    ref = numpy_compact(w0, grads, [0.25 * 0.5**t for t in range(10)], 0.5, 0.875, 2.0**-20)
    with jax.enable_x64(True):
        init, step = stepper(form, learning_rate=schedule, b1=0.5, b2=0.875, eps=2.0**-20)
        step = jax.jit(step)
        params = jnp.asarray(w0)
        state = init(params)
        for t in range(10):
            params, state = step(jnp.asarray(grads[t]), state, params)
            assert int(state.count) == t + 1
            assert rel_err(params, ref[t][0]) <= 1e-12


# ============================================================================ measured problems
@pytest.mark.parametrize("form", FORMS)
def test_warmup_from_zero_is_no_step_then_trains(form):
    """linear_schedule(0, 1e-2, 10): the first step (lr 0) leaves the weights, counts, takes g into v;
    the old front end made the weights NaN at once (MXNet form: d = (1 - b1^t)/lr is infinite)."""
    w0, grads = problem(np.float32, steps=12)
    schedule = optax.linear_schedule(0.0, 1e-2, 10)
    init, step = stepper(form, learning_rate=schedule)
    step = jax.jit(step)
    params = jnp.asarray(w0)
    state = init(params)
    params, state = step(jnp.asarray(grads[0]), state, params)
    np.testing.assert_array_equal(params, w0)
    assert int(state.count) == 1
    one_minus_b2 = 1.0 - np.float64(np.float32(0.999))  # betas are taken in the compute dtype
    np.testing.assert_allclose(state.v, one_minus_b2 * grads[0].astype(np.float64) ** 2, rtol=1e-6)
    if form == "mxnet":  # d and z kept (zeros), so z = -d w still holds
        assert not np.any(np.asarray(state.d)) and not np.any(np.asarray(state.z))
    for t in range(1, 12):
        params, state = step(jnp.asarray(grads[t]), state, params)
    lrs = [float(schedule(t)) for t in range(12)]
    ref = numpy_compact(w0, grads, lrs, float(np.float32(0.6)), float(np.float32(0.999)), 1e-8)
    assert np.all(np.isfinite(np.asarray(params)))
    assert rel_err(params, ref[-1][0]) <= 1e-6
    assert rel_err(state.v, ref[-1][1]) <= 1e-5


@pytest.mark.parametrize("form", FORMS)
def test_constant_zero_learning_rate_never_moves_the_weights(form):
    w0, grads = problem(np.float32, steps=5)
    init, step = stepper(form, learning_rate=0.0)
    params = jnp.asarray(w0)
    state = init(params)
    for t in range(5):
        params, state = step(jnp.asarray(grads[t]), state, params)
    np.testing.assert_array_equal(params, w0)
    assert int(state.count) == 5 and np.all(np.isfinite(np.asarray(state.v)))


@pytest.mark.parametrize("compact", [True, False])
def test_inject_hyperparams_on_bfloat16_params_refuses_half_hyperparameters(compact):
    """optax casts injected hyper-parameters to the params' dtype: b2 = 0.999 becomes 1.0 in bfloat16,
    which made every weight NaN. FTML now says so; with hyperparam_dtype=float32 it trains."""
    params = {"w": jnp.asarray([1.0, -2.0, 0.5], jnp.bfloat16)}
    grads = {"w": jnp.asarray([0.5, 0.25, -1.0], jnp.bfloat16)}
    with pytest.raises(TypeError, match="hyperparam_dtype"):
        optax.inject_hyperparams(ftml)(learning_rate=0.01, compact=compact).init(params)
    injected = optax.inject_hyperparams(ftml, hyperparam_dtype=jnp.float32)(learning_rate=0.01, compact=compact)
    plain = ftml(learning_rate=0.01, compact=compact)
    u_inj, _ = jax.jit(injected.update)(grads, injected.init(params), params)
    u_plain, _ = jax.jit(plain.update)(grads, plain.init(params), params)
    # the compact form's update is in the compute dtype (apply_updates rounds w + u once)
    assert u_inj["w"].dtype == (jnp.float32 if compact else jnp.bfloat16)
    assert optax.apply_updates(params, u_inj)["w"].dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(u_inj["w"], np.float32)))
    np.testing.assert_array_equal(np.asarray(u_inj["w"], np.float32), np.asarray(u_plain["w"], np.float32))


@pytest.mark.parametrize("form", FORMS)
def test_decoupled_weight_decay_matches_the_numpy_rule_fp64(form):
    """decoupled_weight_decay: w <- w (1 - lr wd) before the step (z too in MXNet's form)."""
    w0, grads = problem(np.float64)
    ref = numpy_compact(w0, grads, [0.125] * STEPS, 0.5, 0.875, 2.0**-20, wd=0.25, decoupled=True, clip=0.75)
    with jax.enable_x64(True):
        init, step = stepper(form, **HYPER, weight_decay=0.25, decoupled_weight_decay=True, clip_gradient=0.75)
        step = jax.jit(step)
        params = jnp.asarray(w0)
        state = init(params)
        for t in range(STEPS):
            params, state = step(jnp.asarray(grads[t]), state, params)
            assert rel_err(params, ref[t][0]) <= 1e-12, (t, rel_err(params, ref[t][0]))
    # and it is not the coupled decay
    coupled = numpy_compact(w0, grads, [0.125] * STEPS, 0.5, 0.875, 2.0**-20, wd=0.25, clip=0.75)
    assert rel_err(params, coupled[-1][0]) > 1e-3


def test_decoupled_decay_with_zero_gradient_is_exactly_the_decay():
    params = jnp.asarray([1.0, -2.0])
    for compact in (True, False):
        opt = ftml_direct(learning_rate=0.1, weight_decay=0.5, decoupled_weight_decay=True, compact=compact)
        new, _ = opt.step(jnp.zeros(2), opt.init(params), params)
        np.testing.assert_allclose(new, [0.95, -1.9], rtol=1e-6)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("target", [[1.0, -1.0, 1.0], [0.7, -1.3, 2.1]])
def test_jitted_parabola_settles_on_the_minimum(form, target):
    """lr 0.3 for 3000 steps under jit. MXNet's evaluation order left an oscillation of a few percent
    (|w - w*| 0.02 after 3000 steps for [1, -1, 1]); the stable order and the compact form stay on it."""
    target = jnp.asarray(target, jnp.float32)
    init, step = stepper(form, learning_rate=0.3)

    def loss(p):
        return jnp.sum((p - target) ** 2)

    @jax.jit
    def run(p):
        def body(carry, _):
            p, s = carry
            return step(jax.grad(loss)(p), s, p), None

        (p, _), _ = jax.lax.scan(body, (p, init(p)), None, length=3000)
        return p

    final = run(jnp.zeros(3))
    assert np.max(np.abs(np.asarray(final) - np.asarray(target))) <= 1e-6, final


# ============================================================================ dtypes
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_computes_in_float32_and_keeps_float32_state(form, dtype):
    w0, grads = problem(np.float32, steps=5)
    init, step = stepper(form, **HYPER)
    step = jax.jit(step)
    params = jnp.asarray(w0).astype(dtype)
    state = init(params)
    assert {leaf.dtype for leaf in jax.tree.leaves(state)[1:]} == {jnp.dtype(jnp.float32)}
    for t in range(5):
        params, state = step(jnp.asarray(grads[t]).astype(dtype), state, params)
        assert params.dtype == dtype
    assert {leaf.dtype for leaf in jax.tree.leaves(state)[1:]} == {jnp.dtype(jnp.float32)}
    # the float32 reference from the same start, rounded to the half type only at the end
    ref = numpy_compact(np.asarray(jnp.asarray(w0).astype(dtype), np.float32), grads.astype(dtype), [0.125] * 5,
                        0.5, 0.875, 2.0**-20)
    assert rel_err(np.asarray(params, np.float32), ref[-1][0]) <= 5 * 2.0 ** -(7 if dtype == jnp.bfloat16 else 10)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_step_is_the_float32_step_rounded_once(form, dtype):
    w0, grads = problem(np.float32, steps=4)
    init, step = stepper(form, **HYPER)
    params = jnp.asarray(w0).astype(dtype)
    state = init(params)
    for t in range(4):
        g = jnp.asarray(grads[t]).astype(dtype)
        # the float32 step from the same (float32) state and the same weight, eagerly
        expected, expected_state = step(g.astype(jnp.float32), state, params.astype(jnp.float32))
        before = np.asarray(params, np.float32)
        params, state = step(g, state, params)
        rounded = np.asarray(expected.astype(dtype), np.float32)
        got = np.asarray(params, np.float32)
        ulp = 2.0 ** -(7 if dtype == jnp.bfloat16 else 10)
        if form == "direct":  # the float32 result rounded once (one ulp where it sat on a boundary)
            assert np.all(np.abs(got - rounded) <= np.abs(rounded) * ulp), t
            assert np.mean(got == rounded) > 0.9
        else:  # optax adds an update of the param's dtype: p + (n - p) rounds at the scale of p
            assert np.all(np.abs(got - rounded) <= np.maximum(np.abs(rounded), np.abs(before)) * ulp), t
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(expected_state)):
            assert rel_err(a, b) <= 1e-6


@pytest.mark.parametrize("form", FORMS)
def test_float16_zero_gradient_is_no_nan(form):
    """epsilon 1e-8 is 0 in float16; the step is computed in float32, so a zero gradient moves nothing."""
    init, step = stepper(form, learning_rate=0.01)
    params = jnp.asarray([1.0, -2.0, 0.0], jnp.float16)
    state = init(params)
    for _ in range(3):
        params, state = step(jnp.zeros(3, jnp.float16), state, params)
    np.testing.assert_array_equal(np.asarray(params, np.float32), [1.0, -2.0, 0.0])


@pytest.mark.parametrize("form", FORMS)
def test_explicit_state_dtype(form):
    """state_dtype overrides the default (float32 for half params, the params' dtype otherwise)."""
    w0, grads = problem(np.float32, steps=3)
    init, step = stepper(form, **HYPER, state_dtype=jnp.bfloat16)
    init32, step32 = stepper(form, **HYPER)
    params = p32 = jnp.asarray(w0)
    state, s32 = init(params), init32(p32)
    assert {leaf.dtype for leaf in jax.tree.leaves(state)[1:]} == {jnp.dtype(jnp.bfloat16)}
    params, state = step(jnp.asarray(grads[0]), state, params)
    p32, s32 = step32(jnp.asarray(grads[0]), s32, p32)
    assert params.dtype == jnp.float32 and state.v.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(state.v), np.asarray(s32.v.astype(jnp.bfloat16)))
    # bfloat16 params may keep bfloat16 state (optax's convention) when asked; "float32" by name works too
    for requested, expected in (("bfloat16", jnp.bfloat16), ("float32", jnp.float32)):
        init_b, _ = stepper(form, state_dtype=requested)
        assert init_b(jnp.ones(2, jnp.bfloat16)).v.dtype == expected


@pytest.mark.parametrize("form", FORMS)
def test_dtypes_are_preserved_per_leaf(form):
    with jax.enable_x64(True):
        params = {
            "bf16": jnp.ones(3, jnp.bfloat16),
            "f16": jnp.ones(3, jnp.float16),
            "f32": jnp.ones(3, jnp.float32),
            "f64": jnp.ones(3, jnp.float64),
        }
        init, step = stepper(form, learning_rate=0.1)
        state = init(params)
        new, state = jax.jit(step)(jax.tree.map(lambda p: p * 0.5, params), state, params)
        assert jax.tree.map(lambda x: x.dtype, new) == jax.tree.map(lambda x: x.dtype, params)
        assert state.v["f64"].dtype == jnp.float64 and state.v["bf16"].dtype == jnp.float32
        assert state.v["f16"].dtype == jnp.float32 and state.v["f32"].dtype == jnp.float32


# ============================================================================ optax battery
@pytest.mark.parametrize("form", FORMS)
def test_parabola_under_jit_compiles_once(form):
    target = jnp.asarray([1.0, -2.0, 3.0])
    init, step = stepper(form, learning_rate=0.05)

    def loss(p):
        return jnp.sum((p - target) ** 2)

    @jax.jit
    def train_step(p, s):
        return step(jax.grad(loss)(p), s, p)

    p = jnp.zeros(3)
    s = init(p)
    for _ in range(600):
        p, s = train_step(p, s)
    assert train_step._cache_size() == 1
    np.testing.assert_allclose(p, target, atol=1e-3)


@pytest.mark.parametrize("form", FORMS)
def test_rosenbrock_under_jit(form):
    def rosenbrock(p):
        return (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2

    init, step = stepper(form, learning_rate=optax.cosine_decay_schedule(0.05, 4000))

    @jax.jit
    def run(p):
        def body(carry, _):
            p, s = carry
            return step(jax.grad(rosenbrock)(p), s, p), None

        (p, _), _ = jax.lax.scan(body, (p, init(p)), None, length=4000)
        return p

    p = run(jnp.asarray([-1.2, 1.0]))
    assert float(rosenbrock(p)) < 1e-3 and np.max(np.abs(np.asarray(p) - 1.0)) < 0.05, p
    assert run._cache_size() == 1


@pytest.mark.parametrize("compact", [True, False])
def test_inject_hyperparams_matches_plain_and_lr_can_change_without_recompiling(compact):
    w0, grads = problem(np.float32)
    params = {"w": jnp.asarray(w0)}
    plain = ftml(learning_rate=0.125, clip_gradient=0.5, compact=compact)
    injected = optax.inject_hyperparams(ftml)(learning_rate=0.125, clip_gradient=0.5, compact=compact)
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
    ref = ftml(learning_rate=0.0625, clip_gradient=0.5, compact=compact)
    u_ref, _ = ref.update({"w": jnp.asarray(grads[1])}, s_plain, p1)
    np.testing.assert_allclose(u2["w"], u_ref["w"], rtol=1e-5, atol=1e-6)
    # lr 0 injected: no step, no NaN
    s_inj.hyperparams["learning_rate"] = jnp.asarray(0.0, jnp.float32)
    u3, s_inj = up_inj({"w": jnp.asarray(grads[2])}, s_inj, p1)
    assert not np.any(np.asarray(u3["w"])) and up_inj._cache_size() == 1


@pytest.mark.parametrize("form", FORMS)
def test_shape_dtype_and_state_survive_lax_cond(form):
    params = {"a": jnp.ones(3, jnp.bfloat16), "b": jnp.ones((2, 2), jnp.float32)}
    init, step = stepper(form, learning_rate=0.1)
    state = init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)

    @jax.jit
    def maybe_step(flag, params, state):
        return jax.lax.cond(flag, lambda p, s: step(grads, s, p), lambda p, s: (p, s), params, state)

    def spec(tree):
        return jax.tree.map(lambda x: (x.shape, x.dtype), tree)

    p_yes, s_yes = maybe_step(True, params, state)
    p_no, s_no = maybe_step(False, params, state)
    assert spec((p_yes, s_yes)) == spec((params, state)) == spec((p_no, s_no))
    assert int(s_yes.count) == 1 and int(s_no.count) == 0
    direct_p, _ = step(grads, state, params)
    for a, b in zip(jax.tree.leaves(p_yes), jax.tree.leaves(direct_p)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6)


@pytest.mark.parametrize("compact", [True, False])
def test_multisteps_applies_one_step_on_the_mean_gradient(compact):
    w0, grads = problem(np.float32, steps=6)
    tx = optax.MultiSteps(ftml(**HYPER, compact=compact), every_k_schedule=3)
    single = ftml(**HYPER, compact=compact)
    update = jax.jit(tx.update)
    params, ref = jnp.asarray(w0), jnp.asarray(w0)
    state, s_ref = tx.init(params), single.init(ref)
    for k in range(2):
        for i in range(3):
            updates, state = update(jnp.asarray(grads[3 * k + i]), state, params)
            if i < 2:
                assert not np.any(np.asarray(updates))
            params = optax.apply_updates(params, updates)
        u_ref, s_ref = single.update(jnp.asarray(grads[3 * k : 3 * k + 3].mean(0)), s_ref, ref)
        ref = optax.apply_updates(ref, u_ref)
        assert rel_err(params, ref) <= 1e-6
    assert int(state.inner_opt_state.count) == 2 and update._cache_size() == 1


def test_schedule_free_wraps_the_compact_form():
    """optax.contrib.schedule_free hands the base optimizer its y sequence, not the weights the base
    last produced: that suits the compact form (its step does not depend on w) and it converges."""
    target = jnp.asarray([1.0, -2.0, 3.0])
    tx = optax.contrib.schedule_free(ftml(learning_rate=0.1), learning_rate=0.1)

    def loss(p):
        return jnp.sum((p - target) ** 2)

    @jax.jit
    def train_step(p, s):
        updates, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, updates), s

    p = jnp.zeros(3)
    s = tx.init(p)
    for _ in range(2000):
        p, s = train_step(p, s)
    x = optax.contrib.schedule_free_eval_params(s, p)
    np.testing.assert_allclose(x, target, atol=1e-3)
    assert train_step._cache_size() == 1


@pytest.mark.parametrize("compact", [True, False])
def test_reduce_on_plateau_scales_ftml_updates(compact):
    """chain(ftml, reduce_on_plateau): FTML ignores the ``value`` extra argument; after a plateau its
    updates come out scaled by the factor."""
    w0, grads = problem(np.float32, steps=4)
    tx = optax.chain(ftml(**HYPER, compact=compact), optax.contrib.reduce_on_plateau(factor=0.5, patience=1))
    alone = ftml(**HYPER, compact=compact)
    params = ref = jnp.asarray(w0)
    state, s_ref = tx.init(params), alone.init(ref)
    update = jax.jit(tx.update)
    for t in range(4):
        updates, state = update(jnp.asarray(grads[t]), state, params, value=jnp.asarray(1.0))  # a flat loss
        u_ref, s_ref = alone.update(jnp.asarray(grads[t]), s_ref, params)
        scale = float(state[1].scale)
        np.testing.assert_allclose(updates, scale * u_ref, rtol=1e-6, atol=1e-7)
        params = optax.apply_updates(params, updates)
    assert scale < 1.0


def test_chain_after_clip_by_global_norm_equals_clipping_by_hand():
    w0, grads = problem(np.float32)
    chained = optax.chain(optax.clip_by_global_norm(1.0), ftml(**HYPER))
    alone = ftml(**HYPER)
    params = jnp.asarray(w0)
    g = jnp.asarray(grads[0])
    assert float(jnp.linalg.norm(g)) > 1.0  # so the clip acts
    u_chain, _ = jax.jit(chained.update)(g, chained.init(params), params)
    u_alone, _ = jax.jit(alone.update)(g / jnp.linalg.norm(g), alone.init(params), params)
    np.testing.assert_allclose(u_chain, u_alone, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("compact", [True, False])
def test_pytrees_are_handled_leaf_by_leaf(compact):
    rng = np.random.default_rng(1)
    params = {
        "dense": {"kernel": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32), "bias": jnp.zeros(4)},
        "scale": jnp.asarray(1.5, jnp.float32),
        "stack": [jnp.asarray(rng.standard_normal(2), jnp.float32), (jnp.ones((2, 2)),)],
    }
    tx = ftml(**HYPER, compact=compact)
    state = tx.init(params)
    assert state.count.dtype == jnp.int32 and state.count.shape == ()
    for tree in (state.v,) if compact else (state.d, state.v, state.z):
        assert jax.tree.structure(tree) == jax.tree.structure(params)
        assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(params)))
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    updates, _ = jax.jit(tx.update)(grads, state, params)
    for leaf_p, leaf_u in zip(jax.tree.leaves(params), jax.tree.leaves(updates)):
        alone = ftml(**HYPER, compact=compact)
        u, _ = alone.update(jnp.full_like(leaf_p, 0.5), alone.init(leaf_p), leaf_p)
        np.testing.assert_allclose(leaf_u, u, rtol=1e-6)


def test_extra_args_are_ignored():
    tx = ftml()
    p = jnp.ones(3)
    u1, _ = tx.update(p, tx.init(p), p)
    u2, _ = tx.update(p, tx.init(p), p, value=jnp.asarray(1.0), unknown_kwarg="x")
    np.testing.assert_array_equal(u1, u2)


def test_update_without_params_raises_where_the_weights_are_needed():
    """The MXNet form sets each weight from its state and the weight; the compact form needs the
    weights only for a weight decay (tests/jax/test_optax_chain.py)."""
    p = jnp.ones(2)
    tx = ftml(compact=False)
    with pytest.raises(ValueError, match=r"compact=False\) \(MXNet's form\) and ftml_direct need params"):
        tx.update(p, tx.init(p))
    tx = ftml()
    u, _ = tx.update(p, tx.init(p))
    assert np.all(np.asarray(u) < 0)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"learning_rate": -1e-3}, ValueError, "Invalid learning_rate: -0.001"),
        ({"learning_rate": float("nan")}, ValueError, "learning_rate"),
        ({"learning_rate": "0.1"}, TypeError, "learning_rate"),
        ({"b1": 1.0}, ValueError, "Invalid b1: 1.0"),
        ({"b2": -0.1}, ValueError, "b2"),
        ({"eps": -1e-8}, ValueError, "eps"),
        ({"weight_decay": -0.5}, ValueError, "weight_decay"),
        ({"weight_decay": float("inf")}, ValueError, "weight_decay"),
        ({"clip_gradient": 0.0}, ValueError, "clip_gradient"),
        ({"clip_gradient": float("inf")}, ValueError, "clip_gradient"),
        ({"clip_gradient": "1"}, TypeError, "clip_gradient"),
        ({"compact": 1}, TypeError, "compact"),
        ({"decoupled_weight_decay": "yes"}, TypeError, "decoupled_weight_decay"),
        ({"state_dtype": jnp.int32}, TypeError, "state_dtype"),
        ({"b2": jnp.asarray(0.999, jnp.bfloat16)}, TypeError, "b2"),
    ],
)
@pytest.mark.parametrize("factory", [ftml, ftml_direct])
def test_bad_arguments_are_rejected_by_name(factory, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        factory(**kwargs)


def test_integer_parameters_are_rejected():
    with pytest.raises(TypeError, match="int32"):
        ftml().init({"w": jnp.ones(2, jnp.int32)})


# ============================================================================ against ftmlopt.torch
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("compact", [True, False])
def test_matches_the_torch_front_end_fp64_trajectory(compact, decoupled):
    import torch

    from ftmlopt.torch import FTML as TorchFTML

    w0, grads = problem(np.float64)
    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = TorchFTML(
        [p],
        lr=0.125,
        betas=(0.5, 0.875),
        eps=2.0**-20,
        weight_decay=0.25,
        clip_gradient=0.75,
        decoupled_weight_decay=decoupled,
        compact=compact,
    )
    with jax.enable_x64(True):
        tx = ftml(**HYPER, weight_decay=0.25, clip_gradient=0.75, decoupled_weight_decay=decoupled, compact=compact)
        update = jax.jit(tx.update)
        params = jnp.asarray(w0)
        state = tx.init(params)
        for t in range(STEPS):
            updates, state = update(jnp.asarray(grads[t]), state, params)
            params = optax.apply_updates(params, updates)
            p.grad = torch.from_numpy(grads[t].copy())
            opt.step()
            assert rel_err(params, p.detach().numpy()) <= 1e-12, t
            assert rel_err(state.v, opt.state[p]["v"].numpy()) <= 1e-12, t


# ============================================================================ rule.mxnet_step(stable=True)
def test_stable_order_is_mxnets_step_and_pulls_an_outside_edit_back_alike():
    """The stable order (used by both front ends) against ftml_update in float64, an outside edit of
    the weights included: MXNet's z pulls it back through (d_t - b1 d) w; the residual r = z + d w
    must carry exactly that."""
    from ftmlopt import rule

    w0, grads = problem(np.float64)
    w, d, v, z = w0.copy(), np.zeros_like(w0), np.zeros_like(w0), np.zeros_like(w0)
    mw, md, mv, mz = w0.copy(), np.zeros_like(w0), np.zeros_like(w0), np.zeros_like(w0)
    for t in range(1, STEPS + 1):
        if t == 10:  # something else writes the weights
            w, mw = w + 0.25, mw + 0.25
        c = rule.constants(lr=0.125, t=t, beta1=0.5, beta2=0.875, eps=2.0**-20, weight_decay=0.25, clip=0.75)
        w, d, v, z = rule.mxnet_step(w, grads[t - 1], d, v, z, c, sqrt=np.sqrt, clip=np.clip, stable=True)
        ftml_update(mw, grads[t - 1], md, mv, mz, t=t, out=mw, **MX_HYPER, wd=0.25, clip_grad=0.75)
        for got, want in ((w, mw), (d, md), (v, mv), (z, mz)):
            assert rel_err(got, want) <= 1e-12, (t, rel_err(got, want))
