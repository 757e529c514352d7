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
    opt = FTML(**HYPER, **okw)
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
    opt = FTML(**HYPER, **okw)
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
    opt = FTML(**HYPER, **okw)
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
    opt = FTML(**HYPER, weight_decay=wd)
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
    opt = FTML(**HYPER, clipvalue=0.5, coupled_weight_decay=0.25)
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
    opt = FTML(schedule, beta_1=0.5, beta_2=0.875, epsilon=2.0**-20)
    w, d, v, z = w0.copy(), np.zeros_like(w0), np.zeros_like(w0), np.zeros_like(w0)
    for t in range(1, 9):
        opt.apply([ops.convert_to_tensor(grads[t - 1])], [var])
        lr_t = 0.25 * 0.5 ** (t - 1)
        ftml_update(w, grads[t - 1], d, v, z, lr=lr_t, t=t, beta1=0.5, beta2=0.875, epsilon=2.0**-20, out=w)
        assert rel_err(numpy_of(var), w) <= 1e-6
        assert rel_err(numpy_of(opt._d[0]), d) <= 1e-6


def test_get_config_from_config_round_trip():
    opt = FTML(
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


def test_saved_model_resumes_with_the_same_optimizer_state(tmp_path):
    model, x, y = _model_and_data()
    model.compile(optimizer=FTML(learning_rate=0.02, clip_gradient=1.0), loss="mse")
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
    opt = TorchFTML([p], lr=0.125, betas=(0.5, 0.875), eps=2.0**-20, weight_decay=0.25, clip_gradient=0.75)
    return torch, p, opt


def test_matches_the_torch_front_end_fp32_per_step():
    """Keras FTML and ftmlopt.torch.FTML, both started from MXNet's state each step: within 1e-6."""
    okw, mkw = CASES["wd+clip"]
    w0, grads = problem(np.float32)
    torch, p, topt = _torch_ftml(w0)
    var = keras.Variable(w0)
    opt = FTML(**HYPER, **okw)
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
    opt = FTML(**HYPER, **okw)
    for t in range(STEPS):
        opt.apply([ops.convert_to_tensor(grads[t], dtype="float64")], [var])
        p.grad = torch.from_numpy(grads[t].copy())
        topt.step()
        assert rel_err(numpy_of(var), p.detach().numpy()) <= 1e-12, t
        assert rel_err(numpy_of(opt._z[0]), topt.state[p]["z"].numpy()) <= 1e-12, t


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"learning_rate": 0.0}, ValueError, "learning_rate"),
        ({"learning_rate": -1.0}, ValueError, "learning_rate"),
        ({"beta_1": 1.0}, ValueError, "beta_1"),
        ({"beta_2": 1.5}, ValueError, "beta_2"),
        ({"beta_1": "0.5"}, TypeError, "beta_1"),
        ({"epsilon": -1.0}, ValueError, "epsilon"),
        ({"coupled_weight_decay": -0.1}, ValueError, "coupled_weight_decay"),
        ({"clip_gradient": 0.0}, ValueError, "clip_gradient"),
        ({"clip_gradient": float("inf")}, ValueError, "clip_gradient"),
        ({"clip_gradient": "1"}, TypeError, "clip_gradient"),
    ],
)
def test_bad_arguments_are_rejected_by_name(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        FTML(**kwargs)


def test_docstring_example():
    import doctest

    result = doctest.testmod(ftmlopt.keras)
    assert result.attempted > 0 and result.failed == 0
