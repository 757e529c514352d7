"""ftmlopt.keras.FTML on the backend named by KERAS_BACKEND.

Not collected directly (the name does not start with ``test_``): ``test_keras.py`` runs this file
once per backend in a subprocess, since Keras picks its backend once, at import.

Parity is tensor-wise, ``max|actual - expected| / max|expected|`` (see tests/jax/test_optax.py for
why element-wise relative error is not meaningful for FTML's ``z``).
"""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
from keras import ops

import ftmlopt.keras
from ftmlopt import ftml_update
from ftmlopt.keras import FTML

BACKEND = os.environ["KERAS_BACKEND"]
assert keras.backend.backend() == BACKEND

N = 48
STEPS = 25
HYPER = {"learning_rate": 0.125, "beta_1": 0.5, "beta_2": 0.875, "epsilon": 2.0**-20}
MX = {**HYPER, "compact": False}  # MXNet's three-state form, for parity with ftml_update
MX_HYPER = {"lr": 0.125, "beta1": 0.5, "beta2": 0.875, "epsilon": 2.0**-20}
CASES = {
    "plain": ({}, {}),
    "wd+clip": ({"coupled_weight_decay": 0.25, "clip_gradient": 0.75}, {"wd": 0.25, "clip_grad": 0.75}),
}


def rel_err(actual, expected) -> float:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    scale = np.max(np.abs(expected))
    return float(np.max(np.abs(actual - expected)) / (scale if scale > 0 else 1.0))


def numpy_of(x) -> np.ndarray:
    return np.array(ops.convert_to_numpy(x))


def problem(dtype, steps=STEPS, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(N).astype(dtype), rng.standard_normal((steps, N)).astype(dtype)


def states(opt, i=0):
    return numpy_of(opt._d[i]), numpy_of(opt._v[i]), numpy_of(opt._z[i])


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_parity_per_step_from_same_state(case):
    okw, mkw = CASES[case]
    w0, grads = problem(np.float32)
    var = keras.Variable(w0)
    opt = FTML(**MX, **okw)
    opt.build([var])
    w, d, v, z = w0.copy(), np.zeros_like(w0), np.zeros_like(w0), np.zeros_like(w0)
    for t in range(1, STEPS + 1):
        for mine, ref in zip((var, opt._d[0], opt._v[0], opt._z[0]), (w, d, v, z)):
            mine.assign(ref.copy())  # a private copy: ftml_update later writes into ref
        opt.apply([ops.convert_to_tensor(grads[t - 1])], [var])
        ftml_update(w, grads[t - 1], d, v, z, t=t, out=w, **MX_HYPER, **mkw)
        assert int(numpy_of(opt.iterations)) == t
        for name, got, want in zip("wdvz", (numpy_of(var), *states(opt)), (w, d, v, z)):
            assert rel_err(got, want) <= 1e-6, (case, t, name, rel_err(got, want))


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_trajectory_parity(case):
    okw, mkw = CASES[case]
    w0, grads = problem(np.float32, steps=100)
    var = keras.Variable(w0)
    opt = FTML(**MX, **okw)
    w, d, v, z = w0.copy(), np.zeros_like(w0), np.zeros_like(w0), np.zeros_like(w0)
    for t in range(1, 101):
        opt.apply([ops.convert_to_tensor(grads[t - 1])], [var])
        ftml_update(w, grads[t - 1], d, v, z, t=t, out=w, **MX_HYPER, **mkw)
        assert rel_err(numpy_of(var), w) <= 1e-5, (t, rel_err(numpy_of(var), w))


@pytest.mark.parametrize("case", list(CASES))
def test_fp64_trajectory_parity(case):
    okw, mkw = CASES[case]
    w0, grads = problem(np.float64)
    var = keras.Variable(w0, dtype="float64")
    opt = FTML(**MX, **okw)
    w, d, v, z = w0.copy(), np.zeros_like(w0), np.zeros_like(w0), np.zeros_like(w0)
    for t in range(1, STEPS + 1):
        opt.apply([ops.convert_to_tensor(grads[t - 1], dtype="float64")], [var])
        ftml_update(w, grads[t - 1], d, v, z, t=t, out=w, **MX_HYPER, **mkw)
        got = (numpy_of(var), *states(opt))
        assert got[0].dtype == np.float64 and got[3].dtype == np.float64
        for name, g, want in zip("wdvz", got, (w, d, v, z)):
            assert rel_err(g, want) <= 1e-12, (case, t, name, rel_err(g, want))


def test_keras_weight_decay_is_decoupled_and_scales_z_too():
    """Keras' weight_decay: w <- w - w*wd*lr (and z alike) before the step; excluded vars untouched."""
    w0, grads = problem(np.float32)
    wd = 0.0625
    a, b = keras.Variable(w0, name="kernel"), keras.Variable(w0, name="bias")
    opt = FTML(**MX, weight_decay=wd)
    opt.exclude_from_weight_decay(var_names=["bias"])
    ref = {name: [w0.copy(), np.zeros_like(w0), np.zeros_like(w0), np.zeros_like(w0)] for name in "ab"}
    f32 = np.float32
    for t in range(1, 11):
        opt.apply([ops.convert_to_tensor(grads[t - 1])] * 2, [a, b])
        w, d, v, z = ref["a"]
        w -= w * f32(wd) * f32(0.125)
        z -= z * f32(wd) * f32(0.125)
        for name in "ab":
            w, d, v, z = ref[name]
            ftml_update(w, grads[t - 1], d, v, z, t=t, out=w, **MX_HYPER)
        assert rel_err(numpy_of(a), ref["a"][0]) <= 1e-6
        assert rel_err(numpy_of(opt._z[0]), ref["a"][3]) <= 1e-6
        assert rel_err(numpy_of(b), ref["b"][0]) <= 1e-6
    # and the decay does act: the decayed kernel ends smaller than the excluded bias
    assert np.linalg.norm(numpy_of(a)) < np.linalg.norm(numpy_of(b))


def test_keras_clipvalue_acts_on_the_raw_gradient_before_coupled_decay():
    w0, grads = problem(np.float32)
    var = keras.Variable(w0)
    opt = FTML(**MX, clipvalue=0.5, coupled_weight_decay=0.25)
    w, d, v, z = w0.copy(), np.zeros_like(w0), np.zeros_like(w0), np.zeros_like(w0)
    for t in range(1, 6):
        opt.apply([ops.convert_to_tensor(grads[t - 1])], [var])
        g = np.clip(grads[t - 1], -0.5, 0.5)
        ftml_update(w, g, d, v, z, t=t, out=w, wd=0.25, **MX_HYPER)
        assert rel_err(numpy_of(var), w) <= 1e-6


def test_learning_rate_schedule_uses_iterations_before_the_step():
    w0, grads = problem(np.float32)
    schedule = keras.optimizers.schedules.ExponentialDecay(0.25, decay_steps=1, decay_rate=0.5)
    var = keras.Variable(w0)
    opt = FTML(schedule, beta_1=0.5, beta_2=0.875, epsilon=2.0**-20, compact=False)
    w, d, v, z = w0.copy(), np.zeros_like(w0), np.zeros_like(w0), np.zeros_like(w0)
    for t in range(1, 9):
        opt.apply([ops.convert_to_tensor(grads[t - 1])], [var])
        lr_t = 0.25 * 0.5 ** (t - 1)
        ftml_update(w, grads[t - 1], d, v, z, lr=lr_t, t=t, beta1=0.5, beta2=0.875, epsilon=2.0**-20, out=w)
        assert rel_err(numpy_of(var), w) <= 1e-6
        assert rel_err(numpy_of(opt._d[0]), d) <= 1e-6


@pytest.mark.parametrize("compact", [True, False])
def test_get_config_from_config_round_trip(compact):
    opt = FTML(
        compact=compact,
        state_dtype="float64",
        learning_rate=0.01,
        beta_1=0.7,
        beta_2=0.99,
        epsilon=1e-6,
        coupled_weight_decay=0.001,
        clip_gradient=2.0,
        weight_decay=0.004,
        clipnorm=1.0,
    )
    config = opt.get_config()
    assert config["coupled_weight_decay"] == 0.001 and config["clip_gradient"] == 2.0
    assert config["weight_decay"] == 0.004 and config["beta_1"] == 0.7
    assert config["compact"] is compact and config["state_dtype"] == "float64"
    clone = FTML.from_config(config)
    assert clone.get_config() == config
    generic = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(generic, FTML) and generic.get_config() == config


def _model_and_data():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x @ rng.normal(size=(4, 1))).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="tanh"), keras.layers.Dense(1)])
    return model, x, y


def test_fit_reduces_the_loss():
    model, x, y = _model_and_data()
    model.compile(optimizer=FTML(learning_rate=0.05, coupled_weight_decay=1e-4), loss="mse")
    history = model.fit(x, y, epochs=20, batch_size=16, verbose=0, shuffle=False)
    assert history.history["loss"][-1] < 0.5 * history.history["loss"][0]


@pytest.mark.parametrize("compact", [True, False])
def test_saved_model_resumes_with_the_same_optimizer_state(tmp_path, compact):
    model, x, y = _model_and_data()
    model.compile(optimizer=FTML(learning_rate=0.02, clip_gradient=1.0, compact=compact), loss="mse")
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, shuffle=False)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)  # no custom_objects: FTML is registered
    assert isinstance(loaded.optimizer, FTML)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    assert int(numpy_of(loaded.optimizer.iterations)) == 8
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(numpy_of(a), numpy_of(b))
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, shuffle=False)
    loaded.fit(x, y, epochs=1, batch_size=16, verbose=0, shuffle=False)
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _torch_ftml(w0):
    import torch

    from ftmlopt.torch import FTML as TorchFTML

    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = TorchFTML(
        [p], lr=0.125, betas=(0.5, 0.875), eps=2.0**-20, weight_decay=0.25, clip_gradient=0.75, compact=False
    )
    return torch, p, opt


def test_matches_the_torch_front_end_fp32_per_step():
    """Keras FTML and ftmlopt.torch.FTML, both started from MXNet's state each step: within 1e-6."""
    okw, mkw = CASES["wd+clip"]
    w0, grads = problem(np.float32)
    torch, p, topt = _torch_ftml(w0)
    var = keras.Variable(w0)
    opt = FTML(**MX, **okw)
    opt.build([var])
    w, d, v, z = w0.copy(), np.zeros_like(w0), np.zeros_like(w0), np.zeros_like(w0)
    for t in range(1, STEPS + 1):
        for mine, ref in zip((var, opt._d[0], opt._v[0], opt._z[0]), (w, d, v, z)):
            mine.assign(ref.copy())  # a private copy: ftml_update later writes into ref
        if t > 1:  # the torch optimizer creates its state on the first step
            with torch.no_grad():
                p.copy_(torch.from_numpy(w))
                for key, ref in (("d", d), ("v", v), ("z", z)):
                    topt.state[p][key].copy_(torch.from_numpy(ref))
        opt.apply([ops.convert_to_tensor(grads[t - 1])], [var])
        p.grad = torch.from_numpy(grads[t - 1].copy())
        topt.step()
        ftml_update(w, grads[t - 1], d, v, z, t=t, out=w, **MX_HYPER, **mkw)
        assert rel_err(numpy_of(var), p.detach().numpy()) <= 1e-6, t
        for key, mine in zip("dvz", states(opt)):
            assert rel_err(mine, topt.state[p][key].numpy()) <= 1e-6, (t, key)


def test_matches_the_torch_front_end_fp64_trajectory():
    okw, _ = CASES["wd+clip"]
    w0, grads = problem(np.float64)
    torch, p, topt = _torch_ftml(w0)
    var = keras.Variable(w0, dtype="float64")
    opt = FTML(**MX, **okw)
    for t in range(STEPS):
        opt.apply([ops.convert_to_tensor(grads[t], dtype="float64")], [var])
        p.grad = torch.from_numpy(grads[t].copy())
        topt.step()
        assert rel_err(numpy_of(var), p.detach().numpy()) <= 1e-12, t
        assert rel_err(numpy_of(opt._z[0]), topt.state[p]["z"].numpy()) <= 1e-12, t


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"learning_rate": -1.0}, ValueError, "Invalid learning_rate: -1.0"),
        ({"learning_rate": float("nan")}, ValueError, "learning_rate"),
        ({"beta_1": 1.0}, ValueError, "beta_1"),
        ({"beta_2": 1.5}, ValueError, "beta_2"),
        ({"beta_1": "0.5"}, TypeError, "beta_1"),
        ({"epsilon": -1.0}, ValueError, "epsilon"),
        ({"coupled_weight_decay": -0.1}, ValueError, "coupled_weight_decay"),
        ({"clip_gradient": 0.0}, ValueError, "clip_gradient"),
        ({"clip_gradient": float("inf")}, ValueError, "clip_gradient"),
        ({"clip_gradient": "1"}, TypeError, "clip_gradient"),
        ({"compact": 1}, TypeError, "compact"),
        ({"state_dtype": "int32"}, TypeError, "Invalid state_dtype"),
    ],
)
def test_bad_arguments_are_rejected_by_name(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        FTML(**kwargs)


def test_docstring_example():
    import doctest

    result = doctest.testmod(ftmlopt.keras)
    assert result.attempted > 0 and result.failed == 0


# ============================================================================ the compact form (default)
def numpy_compact(w, grads, lrs, b1, b2, eps, wd=0.0, clip=None):
    """The compact rule in NumPy float64, from the paper; betas as the compute dtype holds them."""
    w = np.array(w, np.float64)
    v = np.zeros_like(w)
    out = []
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        g = np.asarray(g, np.float64) + wd * w
        if clip is not None:
            g = np.clip(g, -clip, clip)
        v = b2 * v + (1 - b2) * g * g
        w = w - lr * (1 - b1) / (1 - b1**t) * g / (np.sqrt(v / (1 - b2**t)) + eps)
        out.append((w.copy(), v.copy()))
    return out


def test_compact_is_the_default_and_keeps_one_state_per_variable():
    var = keras.Variable(np.ones(3, "float32"))
    opt = FTML()
    opt.build([var])
    assert opt.compact is True and [v.shape for v in opt.variables if v.shape == (3,)] == [(3,)]
    assert not hasattr(opt, "_d") and numpy_of(opt._v[0]).shape == (3,)
    mx = FTML(compact=False)
    mx.build([var])
    assert len(mx._d) == len(mx._v) == len(mx._z) == 1


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("compact", [True, False])
def test_both_forms_follow_the_numpy_rule(case, compact):
    """Both forms against the compact rule written out in NumPy (Theorem 1 for MXNet's)."""
    okw, mkw = CASES[case]
    w0, grads = problem(np.float32)
    var = keras.Variable(w0)
    opt = FTML(**HYPER, **okw, compact=compact)
    wd, clip = mkw.get("wd", 0.0), mkw.get("clip_grad")
    ref = numpy_compact(w0, grads, [0.125] * STEPS, 0.5, 0.875, 2.0**-20, wd=wd, clip=clip)
    for t in range(STEPS):
        opt.apply([ops.convert_to_tensor(grads[t])], [var])
        assert rel_err(numpy_of(var), ref[t][0]) <= 1e-5, (t, rel_err(numpy_of(var), ref[t][0]))
        assert rel_err(numpy_of(opt._v[0]), ref[t][1]) <= 1e-5


# ============================================================================ measured problems
@pytest.mark.parametrize("compact", [True, False])
def test_cosine_warmup_from_zero_is_no_step_then_trains(compact):
    """CosineDecay(0.0, ..., warmup_target=1e-2): the old FTML's loss was NaN from the first step."""
    schedule = keras.optimizers.schedules.CosineDecay(0.0, 100, warmup_target=1e-2, warmup_steps=10)
    w0, grads = problem(np.float32, steps=12)
    var = keras.Variable(w0)
    opt = FTML(schedule, compact=compact)
    opt.apply([ops.convert_to_tensor(grads[0])], [var])
    np.testing.assert_array_equal(numpy_of(var), w0)
    assert int(numpy_of(opt.iterations)) == 1
    assert np.all(np.isfinite(numpy_of(opt._v[0]))) and np.any(numpy_of(opt._v[0]))
    for t in range(1, 12):
        opt.apply([ops.convert_to_tensor(grads[t])], [var])
    lrs = [float(numpy_of(schedule(t))) for t in range(12)]
    ref = numpy_compact(w0, grads, lrs, float(np.float32(0.6)), float(np.float32(0.999)), 1e-8)
    assert rel_err(numpy_of(var), ref[-1][0]) <= 1e-6
    model, x, y = _model_and_data()
    model.compile(optimizer=FTML(schedule, compact=compact), loss="mse")
    history = model.fit(x, y, epochs=3, batch_size=16, verbose=0, shuffle=False)
    assert np.all(np.isfinite(history.history["loss"])) and history.history["loss"][-1] < history.history["loss"][0]


@pytest.mark.parametrize("compact", [True, False])
def test_float16_variable_with_zero_gradient_stays_put(compact):
    """epsilon 1e-8 is 0 in float16: the old FTML divided 0 by 0. Steps run in float32 now."""
    var = keras.Variable(np.array([1.0, -2.0, 0.5], "float16"), dtype="float16")
    opt = FTML(0.01, compact=compact)
    for _ in range(3):
        opt.apply([ops.zeros(3, dtype="float16")], [var])
    np.testing.assert_array_equal(numpy_of(var), np.array([1.0, -2.0, 0.5], "float16"))
    assert {str(v.dtype) for v in opt.variables if v.shape == (3,)} == {"float32"}


@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_variable_step_is_the_float32_step_rounded_once(compact, dtype):
    w0, grads = problem(np.float32, steps=3)
    half = keras.Variable(w0, dtype=dtype)
    full = keras.Variable(numpy_of(half).astype("float32"))
    opt_h, opt_f = FTML(**HYPER, compact=compact), FTML(**HYPER, compact=compact)
    for t in range(3):
        g = ops.convert_to_tensor(grads[t], dtype=dtype)
        full.assign(ops.cast(half, "float32"))
        opt_h.apply([g], [half])
        opt_f.apply([ops.cast(g, "float32")], [full])
        np.testing.assert_array_equal(
            np.asarray(numpy_of(half), np.float32), np.asarray(numpy_of(ops.cast(full, dtype)), np.float32)
        )
        assert str(opt_h._v[0].dtype) == "float32"


@pytest.mark.parametrize("compact", [True, False])
def test_bfloat16_policy_fits(compact):
    """dtype policy "bfloat16": beta_2 = 0.999 rounded to 1.0 made the old FTML's loss NaN at step 1."""
    keras.config.set_dtype_policy("bfloat16")
    try:
        model, x, y = _model_and_data()
        model.compile(optimizer=FTML(0.02, compact=compact), loss="mse")
        history = model.fit(x, y, epochs=5, batch_size=16, verbose=0, shuffle=False)
        assert model.layers[0].kernel.dtype == "bfloat16"
    finally:
        keras.config.set_dtype_policy("float32")
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.mark.parametrize("compact", [True, False])
def test_explicit_state_dtype(compact):
    var = keras.Variable(np.ones(3, "float32"))
    opt = FTML(0.01, compact=compact, state_dtype="bfloat16")
    opt.apply([ops.ones(3)], [var])
    assert {str(v.dtype) for v in opt.variables if v.shape == (3,)} == {"bfloat16"}
    half = keras.Variable(np.ones(3, "float16"), dtype="float16")
    opt = FTML(0.01, compact=compact, state_dtype="float16")  # Keras' usual: state of the var's dtype
    opt.apply([ops.ones(3, dtype="float16")], [half])
    assert {str(v.dtype) for v in opt.variables if v.shape == (3,)} == {"float16"}


def test_default_names_are_numbered_as_keras_numbers_its_own():
    """FTML().name was always "ftml"; Keras numbers default names (adam, adam_1, ...), and two
    optimizers of one name share variable paths (a second one's state clobbers the first's in logs
    and checkpoints)."""
    a, b = FTML(), FTML()
    assert a.name != b.name and a.name.startswith("ftml") and b.name.startswith("ftml")
    assert FTML(name="mine").name == "mine"
    va, vb = keras.Variable(np.ones(2, "float32"), name="w"), keras.Variable(np.ones(2, "float32"), name="w")
    a.build([va])
    b.build([vb])
    assert not {v.path for v in a.variables} & {v.path for v in b.variables}


@pytest.mark.parametrize("compact", [True, False])
def test_embedding_model_fits_and_its_sparse_gradient_is_the_dense_one(compact):
    """TensorFlow hands an Embedding's gradient over as IndexedSlices; the old FTML failed on them."""
    rng = np.random.default_rng(0)
    table = rng.normal(size=(10, 4)).astype("float32")
    kernel = rng.normal(size=(4, 1)).astype("float32")
    x = rng.integers(0, 10, size=(16, 5)).astype("int32")
    y = rng.normal(size=(16, 1)).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(10, 4),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(1, trainable=False),
        ]
    )
    model.layers[0].embeddings.assign(table)
    model.layers[2].kernel.assign(kernel)
    model.compile(optimizer=FTML(0.05, compact=compact), loss="mse")
    model.train_on_batch(x, y)
    # d loss / d table by hand: loss = mean_i (mean_j table[x_ij] . kernel - y_i)^2
    err = table[x].mean(1) @ kernel - y  # (16, 1)
    grad = np.zeros_like(table, dtype=np.float64)
    for i in range(16):
        for j in range(5):
            grad[x[i, j]] += 2.0 / 16 * err[i, 0] * kernel[:, 0] / 5
    ref = numpy_compact(table, [grad], [0.05], float(np.float32(0.6)), float(np.float32(0.999)), 1e-8)
    assert rel_err(numpy_of(model.layers[0].embeddings), ref[0][0]) <= 1e-5
    history = model.fit(x, y, epochs=5, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


# ============================================================================ Keras' generic behaviours
@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("clip", ["clipnorm", "clipvalue", "global_clipnorm"])
def test_keras_clipping_acts_on_the_raw_gradient(compact, clip):
    w0, grads = problem(np.float32, steps=5)
    a, b = keras.Variable(w0[:24]), keras.Variable(w0[24:])
    opt = FTML(**HYPER, compact=compact, **{clip: 0.5})
    plain_a, plain_b = keras.Variable(w0[:24]), keras.Variable(w0[24:])
    plain = FTML(**HYPER, compact=compact)
    for t in range(5):
        ga, gb = grads[t][:24].astype(np.float64), grads[t][24:].astype(np.float64)
        if clip == "clipvalue":
            ca, cb = np.clip(ga, -0.5, 0.5), np.clip(gb, -0.5, 0.5)
        elif clip == "clipnorm":  # per tensor
            ca, cb = (g * min(1.0, 0.5 / np.linalg.norm(g)) for g in (ga, gb))
        else:
            norm = np.sqrt(np.sum(ga**2) + np.sum(gb**2))
            ca, cb = (g * min(1.0, 0.5 / norm) for g in (ga, gb))
        opt.apply([ops.convert_to_tensor(grads[t][:24]), ops.convert_to_tensor(grads[t][24:])], [a, b])
        plain.apply([ops.convert_to_tensor(ca.astype("float32")), ops.convert_to_tensor(cb.astype("float32"))],
                    [plain_a, plain_b])
        for got, want in ((a, plain_a), (b, plain_b)):
            assert rel_err(numpy_of(got), numpy_of(want)) <= 1e-6, (clip, t)


@pytest.mark.parametrize("compact", [True, False])
def test_ema_follows_keras_formula_and_swaps_in(compact):
    w0, grads = problem(np.float32, steps=6)
    var = keras.Variable(w0)
    opt = FTML(**HYPER, compact=compact, use_ema=True, ema_momentum=0.75)
    plain_var = keras.Variable(w0)
    plain = FTML(**HYPER, compact=compact)
    ema = None
    for t in range(6):
        opt.apply([ops.convert_to_tensor(grads[t])], [var])
        plain.apply([ops.convert_to_tensor(grads[t])], [plain_var])
        w = numpy_of(plain_var).astype(np.float64)
        ema = w if ema is None else 0.75 * ema + 0.25 * w
        assert rel_err(numpy_of(var), w) <= 1e-6  # EMA does not change the steps
    assert rel_err(numpy_of(opt._model_variables_moving_average[0]), ema) <= 1e-6
    opt.finalize_variable_values([var])  # the EMA swap
    assert rel_err(numpy_of(var), ema) <= 1e-6
    model, x, y = _model_and_data()
    model.compile(optimizer=FTML(0.05, compact=compact, use_ema=True), loss="mse")
    model.fit(x, y, epochs=2, verbose=0, callbacks=[keras.callbacks.SwapEMAWeights(swap_on_epoch=True)])
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


@pytest.mark.parametrize("compact", [True, False])
def test_gradient_accumulation_is_one_step_on_the_mean_gradient(compact):
    w0, grads = problem(np.float32, steps=6)
    var = keras.Variable(w0)
    opt = FTML(**HYPER, compact=compact, gradient_accumulation_steps=3)
    plain_var = keras.Variable(w0)
    plain = FTML(**HYPER, compact=compact)
    for k in range(2):
        for i in range(3):
            before = numpy_of(var)
            opt.apply([ops.convert_to_tensor(grads[3 * k + i])], [var])
            if i < 2:
                np.testing.assert_array_equal(numpy_of(var), before)
        plain.apply([ops.convert_to_tensor(grads[3 * k : 3 * k + 3].mean(0))], [plain_var])
        # t counts FTML steps (1, 2), not Keras' micro-steps (3, 6)
        assert rel_err(numpy_of(var), numpy_of(plain_var)) <= 1e-6, k
        assert rel_err(numpy_of(opt._v[0]), numpy_of(plain._v[0])) <= 1e-6


@pytest.mark.parametrize("compact", [True, False])
def test_loss_scale_optimizer_unscales_and_skips_non_finite_steps(compact):
    """LossScaleOptimizer(FTML) trains like FTML; a non-finite gradient skips the step, FTML's state
    untouched, and halves the scale (through train_on_batch: its eager apply is not for JAX)."""
    scaled, x, y = _model_and_data()
    plain = keras.models.clone_model(scaled)
    plain.set_weights(scaled.get_weights())
    scaled.compile(optimizer=keras.optimizers.LossScaleOptimizer(FTML(0.05, compact=compact)), loss="mse")
    plain.compile(optimizer=FTML(0.05, compact=compact), loss="mse")
    for i in range(4):
        scaled.train_on_batch(x[16 * i : 16 * i + 16], y[16 * i : 16 * i + 16])
        plain.train_on_batch(x[16 * i : 16 * i + 16], y[16 * i : 16 * i + 16])
    for a, b in zip(scaled.get_weights(), plain.get_weights()):
        assert rel_err(a, b) <= 1e-6
    opt = scaled.optimizer
    weights = scaled.get_weights()
    state = [numpy_of(v) for v in opt.inner_optimizer.variables]
    scale = float(numpy_of(opt.dynamic_scale))
    y_bad = y[:16].copy()
    y_bad[0] = np.inf
    scaled.train_on_batch(x[:16], y_bad)
    for before, after in zip(weights, scaled.get_weights()):
        np.testing.assert_array_equal(before, after)
    for before, after in zip(state, opt.inner_optimizer.variables):
        np.testing.assert_array_equal(before, numpy_of(after))
    assert float(numpy_of(opt.dynamic_scale)) == scale / 2


@pytest.mark.parametrize("compact", [True, False])
def test_keras_decoupled_weight_decay_with_zero_gradient_is_exactly_the_decay(compact):
    var = keras.Variable(np.array([1.0, -2.0], "float32"))
    opt = FTML(learning_rate=0.1, weight_decay=0.5, compact=compact)
    opt.apply([ops.zeros(2)], [var])
    np.testing.assert_allclose(numpy_of(var), [0.95, -1.9], rtol=1e-6)


# ============================================================================ sparse gradients
# Each backend's own sparse type: TensorFlow's IndexedSlices (what an Embedding's gradient is),
# JAX's BCOO, torch's sparse COO. Keras declares sparse support for TensorFlow and JAX only
# (keras.backend.SUPPORTS_SPARSE_TENSORS); its torch backend passes a torch sparse tensor through
# to update_step untouched, so FTML is checked with one there too.
SPARSE_ROWS = (0, 2, 4)


def sparse_gradient(rows: np.ndarray, shape: tuple[int, ...]):
    """A gradient with ``rows`` at rows SPARSE_ROWS of a ``shape`` tensor, in the backend's sparse type."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.IndexedSlices(tf.constant(rows), tf.constant(SPARSE_ROWS, dtype="int64"), tf.constant(shape))
    if BACKEND == "jax":
        import jax.experimental.sparse as jax_sparse
        import jax.numpy as jnp

        indices = jnp.asarray(np.array(SPARSE_ROWS).reshape(-1, 1))
        return jax_sparse.BCOO((jnp.asarray(rows), indices), shape=shape)
    import torch

    return torch.sparse_coo_tensor(torch.tensor([SPARSE_ROWS]), torch.from_numpy(rows), shape)


def dense_twin(rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    out = np.zeros(shape, rows.dtype)
    out[list(SPARSE_ROWS)] = rows
    return out


def test_sparse_gradient_is_the_backends_sparse_type():
    """The tests below really hand the optimizer a sparse tensor (not one densified on the way)."""
    g = sparse_gradient(np.ones((3, 2), "float32"), (5, 2))
    assert type(g).__name__ in {"IndexedSlices", "BCOO"} or str(g.layout) == "torch.sparse_coo"
    np.testing.assert_array_equal(numpy_of(_dense_of(g)), dense_twin(np.ones((3, 2), "float32"), (5, 2)))


def _dense_of(g):
    return ftmlopt.keras._dense(g)


SPARSE_OPTIONS = {
    "plain": {},
    "coupled_wd+clip": {"coupled_weight_decay": 0.25, "clip_gradient": 4.0},
    "keras_weight_decay": {"weight_decay": 0.125},
}
# (Keras' own clipnorm fails on a JAX BCOO before any optimizer sees it, Adam's included:
# "sparse rule for gt is not implemented"; so Keras' clipping is left out of these cases.)


@pytest.mark.parametrize("options", list(SPARSE_OPTIONS))
@pytest.mark.parametrize("compact", [True, False])
def test_sparse_gradient_steps_exactly_like_its_dense_twin(compact, options):
    """Five steps with a sparse gradient give the weights and state of the same gradient given dense,
    bit for bit (the sparse one is scattered out first); through ``stateless_apply`` on JAX too, the
    path Keras' JAX trainer takes. The untouched rows do move with coupled decay (g' = wd w there)."""
    shape = (5, 3, 2)
    kwargs = {"learning_rate": 0.05, "compact": compact, **SPARSE_OPTIONS[options]}
    var_s, var_d = keras.Variable(np.ones(shape, "float32")), keras.Variable(np.ones(shape, "float32"))
    opt_s, opt_d = FTML(**kwargs), FTML(**kwargs)
    rng = np.random.default_rng(1)
    for i in range(5):
        rows = (rng.standard_normal((3, *shape[1:])) * (10.0 - i)).astype("float32")
        opt_s.apply([sparse_gradient(rows, shape)], [var_s])
        opt_d.apply([ops.convert_to_tensor(dense_twin(rows, shape))], [var_d])
        np.testing.assert_array_equal(numpy_of(var_s), numpy_of(var_d))
        for a, b in zip(opt_s.variables, opt_d.variables):
            np.testing.assert_array_equal(numpy_of(a), numpy_of(b))
    assert not np.array_equal(numpy_of(var_s)[list(SPARSE_ROWS)], np.ones((3, *shape[1:])))
    if BACKEND == "jax":
        opt_s, opt_d = FTML(**kwargs), FTML(**kwargs)
        var_s = keras.Variable(np.ones(shape, "float32"))
        opt_s.build([var_s])
        opt_d.build([var_s])
        state_s, state_d = opt_s.variables, opt_d.variables
        w_s, w_d = [var_s.value], [var_s.value]
        for i in range(5):
            rows = np.full((3, *shape[1:]), 10.0 - i, "float32")
            w_s, state_s = opt_s.stateless_apply(state_s, [sparse_gradient(rows, shape)], w_s)
            w_d, state_d = opt_d.stateless_apply(state_d, [ops.convert_to_tensor(dense_twin(rows, shape))], w_d)
            np.testing.assert_array_equal(numpy_of(w_s[0]), numpy_of(w_d[0]))
            for a, b in zip(state_s, state_d):
                np.testing.assert_array_equal(numpy_of(a), numpy_of(b))


@pytest.mark.parametrize("compact", [True, False])
def test_sparse_gradient_updates_go_through_the_optimizers_assign(compact):
    """Every write goes through ``optimizer.assign`` (Keras' rule for sparse-safe optimizers: a direct
    ``variable.assign`` would bypass the backend's sparse handling), each written value is dense (FTML
    decays ``v`` everywhere, like Adam), and the weight and every state variable are written."""
    from unittest import mock

    var = keras.Variable(np.ones((5, 4), "float32"))
    opt = FTML(0.05, compact=compact)
    opt.build([var])
    raw_class = type(var.value) if BACKEND == "tensorflow" else type(var)
    written = []

    def record(variable, value):
        # a torch tensor's layout (sparse or strided); other backends' arrays carry other "layout"s (JAX's sharding)
        layout = value.layout if type(value).__module__.startswith("torch") else None
        written.append((variable, type(value).__name__, layout))

    def refuse(variable, value, *args, **kwargs):
        if len(variable.shape):
            raise AssertionError(f"direct assign on a {tuple(variable.shape)} variable, not through optimizer.assign")

    with (
        mock.patch.object(opt, "assign", side_effect=record),
        mock.patch.object(raw_class, "assign", autospec=True, side_effect=refuse),
        mock.patch.object(raw_class, "assign_add", autospec=True, side_effect=refuse),
        mock.patch.object(raw_class, "assign_sub", autospec=True, side_effect=refuse),
    ):
        opt.apply([sparse_gradient(np.full((3, 4), 0.5, "float32"), (5, 4))], [var])
    assert {type(value).__name__ for _, value, _ in written}.isdisjoint({"IndexedSlices", "BCOO", "SparseTensor"})
    assert all(layout is None or str(layout) == "torch.strided" for _, _, layout in written)

    def raw(x):  # TensorFlow's update_step is handed the tf.Variable inside the Keras one
        return x._value if isinstance(x, keras.Variable) else x

    targets = [id(raw(variable)) for variable, _, _ in written]
    expected = [var, *(opt._v if compact else opt._d + opt._v + opt._z)]
    assert sorted(targets) == sorted(id(raw(x)) for x in expected)


@pytest.mark.parametrize("compact", [True, False])
def test_float64_state_makes_the_step_float64(compact):
    """rule.compute_dtype: a float32 variable with state_dtype="float64" is stepped in float64 (its
    v agrees with the float64 rule to 1e-12; a float32 step would be 1e-7 off) and rounded once."""
    w0, grads = problem(np.float32, steps=5)
    var = keras.Variable(w0)
    opt = FTML(**HYPER, compact=compact, state_dtype="float64")
    ref = numpy_compact(w0, grads, [0.125] * 5, 0.5, 0.875, 2.0**-20)
    for t in range(5):
        opt.apply([ops.convert_to_tensor(grads[t])], [var])
        assert str(var.dtype) == "float32" and str(opt._v[0].dtype) == "float64"
        assert rel_err(numpy_of(opt._v[0]), ref[t][1]) <= 1e-12, (t, rel_err(numpy_of(opt._v[0]), ref[t][1]))
        assert rel_err(numpy_of(var), ref[t][0]) <= 1e-6
