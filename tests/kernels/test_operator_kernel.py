"""The compiled operator kernel (``ftmlopt.mxnet._kernel.operator_kernel``) is bit-identical to NumPy's and to MXNet."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest

from ftmlopt import ftml_update
from ftmlopt.kernels import cpu
from ftmlopt.mxnet import _kernel
from ftmlopt.mxnet import operator as op
from ftmlopt.mxnet.operator import _numpy_kernel, prepare_scalars


def test_compiled_kernel_is_available_in_the_test_install() -> None:
    assert _kernel.AVAILABLE and cpu.AVAILABLE


def _arrays(rng: np.random.Generator, shape: tuple[int, ...], dtype: type, specials: bool) -> list[np.ndarray]:
    w, g, d, v, z = (np.array(rng.standard_normal(shape), dtype=dtype) for _ in range(5))
    d, v = np.array(np.abs(d) * 3, dtype=dtype), np.array(np.abs(v), dtype=dtype)
    if specials and w.size >= 8:
        flat = g.reshape(-1)
        flat[:4] = [np.nan, np.inf, -np.inf, -0.0]
        w.reshape(-1)[4] = -0.0
        v.reshape(-1)[5] = 0.0
    return [w, g, d, v, z]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN/inf inputs on the NumPy side
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 5), (100_003,)])
@pytest.mark.parametrize(
    "hyper",
    [
        dict(lr=0.01, t=1, beta1=0.6, beta2=0.999, epsilon=1e-8, wd=0.0, rescale_grad=1.0, clip_grad=-1.0),
        dict(lr=0.1, t=3, beta1=0.5, beta2=0.9, epsilon=1e-8, wd=0.05, rescale_grad=0.8, clip_grad=0.4),
        dict(lr=0.003, t=1000, beta1=0.9, beta2=0.99, epsilon=1e-6, wd=1e-3, rescale_grad=2.0, clip_grad=0.0),
    ],
)
@pytest.mark.parametrize("out_mode", ["none", "inplace", "separate"])
def test_operator_kernel_bit_identical_to_numpy(dtype, shape, hyper, out_mode, monkeypatch) -> None:
    if out_mode == "separate":  # small arrays run on one thread; force all threads here
        monkeypatch.setattr(cpu, "PARALLEL_MIN", 0)
    rng = np.random.default_rng(hash((shape, out_mode)) % 2**32)
    base = _arrays(rng, shape, dtype, specials=True)
    s = prepare_scalars(dtype, **hyper)
    # The NumPy reference runs on 1-d views (its ufunc `out=` cannot take 0-d results); same bytes.
    a = [x.copy().reshape(-1) for x in base]
    b = [x.copy() for x in base]
    outs = {"none": (None, None), "inplace": (a[0], b[0]), "separate": (np.empty_like(a[0]), np.empty_like(b[0]))}
    out_a, out_b = outs[out_mode]
    ra = _numpy_kernel(*a, out_a, s)
    rb = _kernel.operator_kernel(*b, out_b, s)
    assert rb.dtype == dtype and rb.shape == shape
    if out_mode != "none":
        assert rb is out_b
    for x, y in zip([ra, *a], [rb, *b]):
        assert x.tobytes() == y.tobytes()


def test_operator_kernel_several_steps_match_numpy_state_included() -> None:
    rng = np.random.default_rng(7)
    a = _arrays(rng, (4097,), np.float32, specials=False)
    a[2][:] = 0
    a[3][:] = 0
    a[4][:] = 0
    b = [x.copy() for x in a]
    for t in range(1, 6):
        g = rng.standard_normal(4097).astype(np.float32)
        a[1][:] = g
        b[1][:] = g
        s = prepare_scalars(np.float32, 0.05, t, 0.6, 0.999, 1e-8, 0.01, 1.0, 1.0)
        _numpy_kernel(*a, a[0], s)
        _kernel.operator_kernel(*b, b[0], s)
        for x, y in zip(a, b):
            assert x.tobytes() == y.tobytes()


def test_ftml_update_dispatches_to_the_compiled_kernel_for_contiguous_arrays(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FTMLOPT_DISABLE_CPU_KERNELS", raising=False)
    monkeypatch.delenv("FTMLOPT_DISABLE_NUMBA", raising=False)
    calls = []
    real = _kernel.operator_kernel

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(_kernel, "operator_kernel", spy)
    w = np.ones(5, np.float32)
    ftml_update(w, np.full(5, 0.5, np.float32), *(np.zeros(5, np.float32) for _ in range(3)), lr=0.1, t=1, out=w)
    assert len(calls) == 1
    np.testing.assert_allclose(w, 0.9, rtol=1e-6)
    assert op._select_kernel((w[::2],)) is op._numpy_kernel  # strided arrays stay on NumPy


def test_disable_variable_and_its_deprecated_old_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """``FTMLOPT_DISABLE_CPU_KERNELS`` selects NumPy; its old name ``FTMLOPT_DISABLE_NUMBA`` too, and warns."""
    new, old = "FTMLOPT_DISABLE_CPU_KERNELS", "FTMLOPT_DISABLE_NUMBA"
    arrays = (np.zeros(3, np.float32),)
    monkeypatch.delenv(new, raising=False)
    monkeypatch.delenv(old, raising=False)
    assert op._select_kernel(arrays) is _kernel.operator_kernel
    monkeypatch.setenv(new, "1")
    assert op._select_kernel(arrays) is op._numpy_kernel
    monkeypatch.setenv(new, "0")
    assert op._select_kernel(arrays) is _kernel.operator_kernel
    monkeypatch.delenv(new)
    monkeypatch.setenv(old, "1")
    with pytest.warns(DeprecationWarning, match="FTMLOPT_DISABLE_NUMBA is deprecated; set FTMLOPT_DISABLE_CPU_KERNELS"):
        assert op._select_kernel(arrays) is op._numpy_kernel
    w = np.ones(3, np.float32)
    with pytest.warns(DeprecationWarning, match=old):  # through the public function, which still steps
        ftml_update(w, np.full(3, 0.5, np.float32), *(np.zeros(3, np.float32) for _ in range(3)), lr=0.1, t=1, out=w)
    np.testing.assert_allclose(w, 0.9, rtol=1e-6)
    monkeypatch.setenv(old, "0")
    with pytest.warns(DeprecationWarning):
        assert op._select_kernel(arrays) is _kernel.operator_kernel
    monkeypatch.setenv(new, "0")  # the new name wins, and then nothing warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monkeypatch.setenv(old, "1")
        assert op._select_kernel(arrays) is _kernel.operator_kernel


V1_CASES = [
    "A_defaults_float32", "B_clip_wd_rescale_float32", "C_clip_wd_rescale_float64", "D_operator_explicit_t",
    "E_factor_scheduler_float32", "F_begin_num_update_float32", "H_weight_overwritten_between_steps",
]


@pytest.mark.parametrize("name", V1_CASES)
def test_operator_kernel_reproduces_mxnet_vectors_bit_for_bit(vectors, name: str) -> None:
    case = vectors[name]
    dt = np.dtype(case["dtype"]).type
    hp = case["hyperparameters"]
    clip = hp.get("clip_gradient", hp.get("clip_grad"))
    w = np.array(case["initial_weight"], dtype=dt)
    d, v, z = (np.zeros_like(w) for _ in range(3))
    for step in case["steps"]:
        if step.get("weight_before_step") is not None:
            w = np.array(step["weight_before_step"], dtype=dt)
        s = prepare_scalars(dt, step["lr_used"], step["t"], hp["beta1"], hp["beta2"], hp["epsilon"],
                            step["wd_used"], hp["rescale_grad"], -1.0 if clip is None else clip)
        _kernel.operator_kernel(w, np.array(step["grad"], dtype=dt), d, v, z, w, s)
        for key, got in (("weight", w), ("d", d), ("v", v), ("z", z)):
            expected = np.array(step["expected_mxnet"][key], dtype=dt)
            assert got.tobytes() == expected.tobytes(), (name, step["step"], key)


def test_module_imports_and_reports_unavailable_without_llvmlite() -> None:
    code = (
        "import sys; sys.modules['llvmlite'] = sys.modules['llvmlite.binding'] = None\n"
        "import numpy as np\n"
        "from ftmlopt.mxnet import _kernel\n"
        "assert _kernel.AVAILABLE is False\n"
        "from ftmlopt import ftml_update\n"
        "w = np.ones(3, np.float32)\n"
        "z3 = (np.zeros(3, np.float32) for _ in range(3))\n"
        "ftml_update(w, np.full(3, 0.5, np.float32), *z3, lr=0.1, t=1, out=w)\n"
        "assert abs(float(w[0]) - 0.9) < 1e-6\n"
        "try:\n    _kernel.operator_kernel(w, w, w, w, w, None, None)\n"
        "except ImportError as e:\n    print('raised', e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "raised the CPU kernels need llvmlite" in res.stdout
