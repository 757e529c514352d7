"""``ftmlopt.mxnet.optimizer.FTML`` against MXNet: every 1.9.1 vector through the optimizer API (and the
Updater), and MXNet's own ``test_ftml`` grid (spec §5.1) with its ``PyFTML`` reference, plus
multi-step runs of the whole grid.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ftmlopt import lr_scheduler
from ftmlopt.mxnet.optimizer import FTML, Optimizer, create, get_updater

OPT_CASES = [
    "A_defaults_float32",
    "B_clip_wd_rescale_float32",
    "C_clip_wd_rescale_float64",
    "E_factor_scheduler_float32",
    "F_begin_num_update_float32",
    "G_float16_multi_precision",
    "H_weight_overwritten_between_steps",
]
DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64}


def _make_optimizer(case: dict) -> Optimizer:
    """``mx.optimizer.create('ftml', **hyperparameters)``; a null hyper-parameter is not passed."""
    kwargs = {k: v for k, v in case["hyperparameters"].items() if v is not None}
    if "lr_scheduler" in case:
        spec = dict(case["lr_scheduler"])
        cls = getattr(lr_scheduler, spec.pop("type"))
        kwargs["lr_scheduler"] = cls(**spec)
    return create("ftml", **kwargs)


def _check_step(case, step, weight, inner_state, master, ref):
    exp = step["expected_mxnet"]
    sdt = np.float32 if case["dtype"] == "float16" else DTYPES[case["dtype"]]
    assert ref.bits_equal(weight, ref.arr(exp["weight"], DTYPES[case["dtype"]]))
    for got, key in zip(inner_state, "dvz"):
        assert ref.bits_equal(got, ref.arr(exp[key], sdt)), key
    if master is not None:
        assert ref.bits_equal(master, ref.arr(exp["master_weight_fp32"], np.float32))


@pytest.mark.parametrize("name", OPT_CASES)
def test_optimizer_api_reproduces_mxnet_191(name, vectors, ref, kernel_path):
    case = vectors[name]
    opt = _make_optimizer(case)
    w = ref.arr(case["initial_weight"], DTYPES[case["dtype"]])
    state = opt.create_state_multi_precision(0, w)
    if case["dtype"] == "float16":  # spec §3.7: (fp32 master, (d, v, z) fp32)
        master, inner = state
        assert master.dtype == np.float32 and all(s.dtype == np.float32 for s in inner) and len(inner) == 3
    else:
        master, inner = None, state
        assert isinstance(state, tuple) and len(state) == 3 and all(s.dtype == w.dtype for s in state)
    for step in case["steps"]:
        if step.get("weight_before_step") is not None:  # H: the user overwrites the weight
            w[...] = ref.arr(step["weight_before_step"], w.dtype)
            if master is not None:
                master[...] = w
        opt.update_multi_precision(0, w, ref.arr(step["grad"], w.dtype), state)
        assert opt._index_update_count[0] == step["t"] == opt.num_update
        assert opt.learning_rate == pytest.approx(step["lr_used"], rel=1e-15)
        assert opt._get_wd(0) == step["wd_used"]
        _check_step(case, step, w, inner, master, ref)


@pytest.mark.parametrize("name", OPT_CASES)
def test_updater_reproduces_mxnet_191(name, vectors, ref):
    case = vectors[name]
    updater = get_updater(_make_optimizer(case))
    w = ref.arr(case["initial_weight"], DTYPES[case["dtype"]])
    for step in case["steps"]:
        if step.get("weight_before_step") is not None:
            w[...] = ref.arr(step["weight_before_step"], w.dtype)
        updater(0, ref.arr(step["grad"], w.dtype), w)
        state = updater.states[0]
        master, inner = state if case["dtype"] == "float16" else (None, state)
        if step.get("weight_before_step") is None:
            _check_step(case, step, w, inner, master, ref)


# --------------------------------------------------------------------------- MXNet's grid
class PyFTML(Optimizer):
    """MXNet 1.x test_optimizer.py's reference, written with NumPy float32 arrays (spec §5.1)."""

    def __init__(self, beta1=0.6, beta2=0.999, epsilon=1e-8, **kwargs):
        super().__init__(**kwargs)
        self.beta1, self.beta2, self.epsilon = beta1, beta2, epsilon

    def create_state(self, index, weight):
        return (np.zeros_like(weight), np.zeros_like(weight), np.zeros_like(weight))

    def update(self, index, weight, grad, state):
        assert isinstance(weight, np.ndarray) and isinstance(grad, np.ndarray)
        self._update_count(index)
        lr, wd = self._get_lr(index), self._get_wd(index)
        t = self._index_update_count[index]
        grad = grad * self.rescale_grad + wd * weight
        if self.clip_gradient is not None:
            grad = np.clip(grad, -self.clip_gradient, self.clip_gradient)
        d, v, z = state
        v_t = self.beta2 * v + (1 - self.beta2) * np.square(grad)
        d_t = (1 - pow(self.beta1, t)) / lr * (np.sqrt(v_t / (1 - pow(self.beta2, t))) + self.epsilon)
        sigma_t = d_t - self.beta1 * d
        z_t = self.beta1 * z + (1 - self.beta1) * grad - sigma_t * weight
        weight[:] = -z_t / d_t
        d[:], v[:], z[:] = d_t, v_t, z_t


GRID = [
    {k: v for k, v in zip(("beta1", "beta2", "clip_gradient", "rescale_grad", "wd"), combo) if v is not None}
    for combo in itertools.product(
        [None, 0.5, 0.7], [None, 0.8, 0.9], [None, 0.4, 0.5], [None, 0.14, 0.8], [None, 0.03, 0.05, 0.07]
    )
]


def test_grid_has_324_combinations():
    assert len(GRID) == 324 and len({tuple(sorted(g.items())) for g in GRID}) == 324


def _compare_states(s1, s2, rtol, atol):
    for a, b in zip(s1, s2):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


@pytest.fixture
def numpy_kernel(monkeypatch):
    """The grid exercises the optimizer over thousands of tiny updates; run them on the NumPy kernel
    (the compiled path is compared with it, and with the emulation, in tests/kernels/test_operator_kernel.py)."""
    monkeypatch.setenv("FTMLOPT_DISABLE_CPU_KERNELS", "1")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mxnet_test_ftml_grid(seed, numpy_kernel):
    """compare_optimizer(PyFTML(**kw), FTML(**kw), (3, 4, 5), float32): one update, states and weights."""
    rng = np.random.default_rng(seed)
    for kw in GRID:
        w = rng.uniform(0, 1, size=(3, 4, 5)).astype(np.float32)
        g = rng.uniform(0, 1, size=(3, 4, 5)).astype(np.float32)
        opt_ref, opt = PyFTML(**kw), FTML(**kw)
        w_ref, w_got = w.copy(), w.copy()
        s_ref = opt_ref.create_state_multi_precision(0, w_ref)
        s_got = opt.create_state_multi_precision(0, w_got)
        _compare_states(s_ref, s_got, 0, 0)
        opt_ref.update_multi_precision(0, w_ref, g.copy(), s_ref)
        opt.update_multi_precision(0, w_got, g.copy(), s_got)
        # MXNet's tolerances are rtol 1e-3 / atol 1e-4; these are 100x tighter.
        _compare_states(s_ref, s_got, 1e-5, 1e-6)
        np.testing.assert_allclose(w_got, w_ref, rtol=1e-5, atol=1e-6, err_msg=str(kw))


def test_grid_multi_step(ref, numpy_kernel):
    """All 324 combinations for 12 steps: bit-exact vs the emulation, close to PyFTML, Theorem-1 consistent."""
    rng = np.random.default_rng(42)
    for kw in GRID:
        w0 = rng.uniform(-1, 1, size=(3, 4, 5)).astype(np.float32)
        opt_ref, opt = PyFTML(**kw), FTML(**kw)
        w_ref, w_got = w0.copy(), w0.copy()
        s_ref, s_got = opt_ref.create_state(0, w_ref), opt.create_state(0, w_got)
        ew, ed, ev, ez = w0.copy(), *(np.zeros_like(w0) for _ in range(3))
        emu_kw = {k: kw[k] for k in ("beta1", "beta2", "wd", "rescale_grad") if k in kw}
        emu_kw["clip_grad"] = kw.get("clip_gradient", -1.0)
        for t in range(1, 13):
            g = rng.normal(size=(3, 4, 5)).astype(np.float32)
            opt_ref.update(0, w_ref, g, s_ref)
            opt.update(0, w_got, g, s_got)
            ew, ed, ev, ez = ref.emulate(ew, g, ed, ev, ez, lr=0.01, t=t, **emu_kw)
            for got, e in zip((w_got, *s_got), (ew, ed, ev, ez)):
                assert ref.bits_equal(got, e), (kw, t)
            _compare_states(s_ref, s_got, 1e-3, 1e-4)
            np.testing.assert_allclose(w_got, w_ref, rtol=1e-3, atol=1e-4, err_msg=f"{kw} t={t}")
