"""``ftml_update``: bit-exact against the test-side MXNet emulation, the algebra of spec §1.3,
``out``/clip/float16 semantics, and validation before mutation.

Every test that touches the kernel runs on both dispatch paths (``kernel_path``): NumPy
(``FTMLOPT_DISABLE_CPU_KERNELS=1``) and the default (the compiled CPU kernel when llvmlite is installed).
"""

from __future__ import annotations

import numpy as np
import pytest

from ftmlopt import ftml_update

SHAPES = [(), (1,), (7,), (3, 4, 5), (2, 1, 3, 2), (1000,), (33, 31)]


def _random_hyper(rng: np.random.Generator) -> dict:
    return {
        "lr": float(10 ** rng.uniform(-4, 0.5)),
        "beta1": float(rng.choice([0.0, 0.5, 0.6, 0.9, rng.uniform(0, 0.99)])),
        "beta2": float(rng.choice([0.0, 0.8, 0.999, rng.uniform(0, 0.9999)])),
        "epsilon": float(rng.choice([1e-8, 0.0, 1e-3, 10 ** rng.uniform(-12, -2)])),
        "wd": float(rng.choice([0.0, 0.05, rng.uniform(0, 0.5)])),
        "rescale_grad": float(rng.choice([1.0, 0.14, rng.uniform(0, 4)])),
        "clip_grad": float(rng.choice([-1.0, 0.4, rng.uniform(0, 3), -rng.uniform(0, 3)])),
    }


def _state(rng, shape, dtype):
    d = np.array(np.abs(rng.normal(size=shape)) * 3, dtype=dtype)
    v = np.array(np.abs(rng.normal(size=shape)) * 0.1, dtype=dtype)
    z = np.array(rng.normal(size=shape), dtype=dtype)
    return d, v, z


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_random_single_steps_bit_exact(shape, dtype, ref, kernel_path):
    rng = np.random.default_rng(abs(hash((shape, np.dtype(dtype).name))) % 2**32)
    for _ in range(6):
        hyper = _random_hyper(rng)
        t = int(rng.integers(1, 1001))
        w = np.array(rng.normal(scale=2, size=shape), dtype=dtype)
        g = np.array(rng.normal(scale=rng.choice([1e-3, 1.0, 100.0]), size=shape), dtype=dtype)
        d, v, z = _state(rng, shape, dtype)
        exp = ref.emulate(w, g, d, v, z, t=t, **hyper)
        w0, g0 = w.copy(), g.copy()
        new = ftml_update(w, g, d, v, z, t=t, **hyper)
        assert ref.bits_equal(new, exp[0]), hyper
        for got, e in zip((d, v, z), exp[1:]):
            assert ref.bits_equal(got, e), hyper
        assert ref.bits_equal(w, w0) and ref.bits_equal(g, g0)  # out=None: weight and grad untouched


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_multi_step_runs_bit_exact(dtype, ref, kernel_path):
    rng = np.random.default_rng(11)
    for shape in [(3, 4, 5), (257,)]:
        hyper = _random_hyper(rng)
        w = rng.normal(size=shape).astype(dtype)
        d = np.zeros_like(w)
        v, z = np.zeros_like(w), np.zeros_like(w)
        ew, ed, ev, ez = w.copy(), d.copy(), v.copy(), z.copy()
        for t in range(1, 16):
            g = rng.normal(size=shape).astype(dtype)
            ftml_update(w, g, d, v, z, t=t, out=w, **hyper)
            ew, ed, ev, ez = ref.emulate(ew, g, ed, ev, ez, t=t, **hyper)
            for got, e in ((w, ew), (d, ed), (v, ev), (z, ez)):
                assert ref.bits_equal(got, e), (t, hyper)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_contiguous_views_bit_exact(dtype, ref, kernel_path):
    rng = np.random.default_rng(3)
    base = [rng.normal(size=(6, 8)).astype(dtype) for _ in range(5)]
    base[3] = np.abs(base[3])
    w, g, d, v, z = (b[::2, 1::3] for b in base)
    assert not w.flags.c_contiguous
    exp = ref.emulate(w, g, d, v, z, lr=0.05, t=4, wd=0.01, clip_grad=0.7)
    new = ftml_update(w, g, d, v, z, lr=0.05, t=4, wd=0.01, clip_grad=0.7, out=w)
    assert new is w
    for got, e in zip((w, d, v, z), exp):
        assert ref.bits_equal(np.ascontiguousarray(got), e)
    # The elements a view skips are untouched.
    snapshot = rng.normal(size=(6, 8)).astype(dtype)
    big = snapshot.copy()
    view = big[::2]
    ftml_update(view, np.ones_like(view), np.zeros_like(view), np.zeros_like(view), np.zeros_like(view),
                lr=0.1, t=1, out=view)
    assert ref.bits_equal(big[1::2], snapshot[1::2])


def test_out_argument_forms(ref, kernel_path):
    rng = np.random.default_rng(5)
    w = rng.normal(size=(4, 3)).astype(np.float32)
    g = rng.normal(size=(4, 3)).astype(np.float32)
    states = [np.zeros_like(w) for _ in range(3)]
    exp = ref.emulate(w, g, *states, lr=0.1, t=1)
    # separate out: weight untouched, out receives the result and is returned
    out = np.full_like(w, 7.0)
    w_before = w.copy()
    res = ftml_update(w, g, *[s.copy() for s in states], lr=0.1, t=1, out=out)
    assert res is out and ref.bits_equal(out, exp[0]) and ref.bits_equal(w, w_before)
    # None: a fresh array
    res = ftml_update(w, g, *[s.copy() for s in states], lr=0.1, t=1)
    assert res is not w and ref.bits_equal(res, exp[0]) and ref.bits_equal(w, w_before)
    # in place
    res = ftml_update(w, g, *states, lr=0.1, t=1, out=w)
    assert res is w and ref.bits_equal(w, exp[0])


def test_step_one_is_sign_like(kernel_path):
    """Spec §1.3: from zero state every element moves by lr * g'/(|g'|+eps); g'=0 keeps its weight."""
    w = np.array([0.5, -1.25, 2.0, 0.0, 3.0, -4.0])
    g = np.array([1e-4, -50.0, 0.0, 2.0, -3e-3, 0.25])
    d, v, z = (np.zeros_like(w) for _ in range(3))
    lr, b1, eps = 0.125, 0.5, 1e-8  # exact in float32
    new = ftml_update(w, g, d, v, z, lr=lr, t=1, beta1=b1, epsilon=eps)
    np.testing.assert_allclose(new, w - lr * g / (np.abs(g) + eps), rtol=1e-12, atol=1e-15)
    assert new[2] == w[2]
    np.testing.assert_allclose(d, (1 - b1) / lr * (np.abs(g) + eps), rtol=1e-12)
    np.testing.assert_allclose(d[2], (1 - b1) * eps / lr, rtol=1e-12)
    np.testing.assert_allclose(z[2], -d[2] * w[2], rtol=1e-12)


@pytest.mark.parametrize("hyper", [
    {"lr": 0.01, "beta1": 0.6, "beta2": 0.999, "epsilon": 1e-8, "wd": 0.0, "rescale_grad": 1.0, "clip": None},
    {"lr": 0.1, "beta1": 0.5, "beta2": 0.9, "epsilon": 1e-8, "wd": 0.05, "rescale_grad": 0.8, "clip": 0.4},
    {"lr": 0.3, "beta1": 0.9, "beta2": 0.99, "epsilon": 1e-3, "wd": 0.01, "rescale_grad": 2.0, "clip": 5.0},
])
def test_theorem1_float64(hyper, ref, kernel_path):
    """Paper's Theorem 1 on the float64 operator, 12 steps: w_t = w_{t-1} - lr (1-b1)/(1-b1^t) g'/(...)."""
    h = {k: (ref.f32(x) if (k not in ("epsilon", "clip") and x is not None) else x) for k, x in hyper.items()}
    if h["clip"] is not None:
        h["clip"] = ref.f32(h["clip"])
    rng = np.random.default_rng(17)
    w = rng.normal(size=(5, 7))
    d, v, z = (np.zeros_like(w) for _ in range(3))
    v_compact = np.zeros_like(w)
    for t in range(1, 13):
        g = rng.normal(size=w.shape) * 2
        gp = h["rescale_grad"] * g + h["wd"] * w
        if h["clip"] is not None:
            gp = np.clip(gp, -h["clip"], h["clip"])
        v_compact = h["beta2"] * v_compact + (1 - h["beta2"]) * gp * gp
        expected = ref.theorem1(w, gp, v_compact, lr=h["lr"], t=t, beta1=h["beta1"], beta2=h["beta2"],
                                epsilon=h["epsilon"])
        ftml_update(w, g, d, v, z, lr=hyper["lr"], t=t, beta1=hyper["beta1"], beta2=hyper["beta2"],
                    epsilon=hyper["epsilon"], wd=hyper["wd"], rescale_grad=hyper["rescale_grad"],
                    clip_grad=hyper["clip"] if hyper["clip"] is not None else -1.0, out=w)
        np.testing.assert_allclose(w, expected, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(v, v_compact, rtol=1e-12, atol=0)
        np.testing.assert_allclose(w, -z / d, rtol=1e-12, atol=1e-14)  # the invariant w = -z/d


def test_pull_back_when_weight_is_edited(ref, kernel_path):
    """Spec §1.3: an edited weight is pulled back by z; Theorem 1 then no longer holds."""
    rng = np.random.default_rng(23)
    lr, b1, b2, eps = 0.1, 0.6, 0.999, 1e-8
    lr32, b132, b232 = ref.f32(lr), ref.f32(b1), ref.f32(b2)
    w = rng.normal(size=20)
    d, v, z = (np.zeros_like(w) for _ in range(3))
    for t in range(1, 6):
        ftml_update(w, rng.normal(size=20), d, v, z, lr=lr, t=t, beta1=b1, beta2=b2, epsilon=eps, out=w)
    w_edit = w + rng.normal(size=20)          # user code (or a weights-only reload) changes the weight
    w[...] = w_edit
    d_prev, z_prev, v_prev = d.copy(), z.copy(), v.copy()
    g = rng.normal(size=20)
    ftml_update(w, g, d, v, z, lr=lr, t=6, beta1=b1, beta2=b2, epsilon=eps, out=w)
    pull_back = w_edit - (1 - b132) * g / d - b132 * (z_prev + d_prev * w_edit) / d
    np.testing.assert_allclose(w, pull_back, rtol=1e-12, atol=1e-12)
    compact = ref.theorem1(w_edit, g, b232 * v_prev + (1 - b232) * g * g, lr=lr32, t=6, beta1=b132, beta2=b232,
                           epsilon=eps)
    assert np.max(np.abs(w - compact)) > 0.1


def test_clip_semantics(ref, kernel_path):
    w = np.array([1.0, -1.0, 2.0, 0.0], dtype=np.float32)
    g = np.array([3.0, -3.0, 0.25, np.nan], dtype=np.float32)
    # clip_grad=0 at the operator level zeroes g' (MXNet checks clip >= 0)
    d, v, z = (np.zeros_like(w) for _ in range(3))
    new = ftml_update(w, g, d, v, z, lr=0.1, t=1, clip_grad=0.0)
    assert np.all(v[:3] == 0) and ref.bits_equal(new[:3], w[:3]) and np.isnan(v[3])
    # a positive bound clamps g'; NaN passes through unclipped (then v, d, z, w are NaN there)
    d, v, z = (np.zeros_like(w) for _ in range(3))
    ftml_update(w, g, d, v, z, lr=0.1, t=1, beta2=0.5, clip_grad=0.5)
    np.testing.assert_array_equal(v[:3], np.float32(0.5) * np.float32([0.25, 0.25, 0.0625]))
    assert np.isnan(v[3])
    # negative: no clipping
    d, v, z = (np.zeros_like(w) for _ in range(3))
    ftml_update(w, g, d, v, z, lr=0.1, t=1, beta2=0.5, clip_grad=-0.5)
    np.testing.assert_array_equal(v[:3], np.float32(0.5) * np.float32([9.0, 9.0, 0.0625]))


def test_weight_decay_is_added_before_clipping(kernel_path):
    """Spec §6: weight 1, grad 0, wd 1, clip 0.5, beta2 0.5 gives v = 0.125 in 1.9.1 (0.5 in 2.0)."""
    w, g = np.ones(1, dtype=np.float32), np.zeros(1, dtype=np.float32)
    d, v, z = (np.zeros_like(w) for _ in range(3))
    ftml_update(w, g, d, v, z, lr=0.1, t=1, wd=1.0, clip_grad=0.5, beta2=0.5)
    assert v[0] == np.float32(0.125)


def test_epsilon_is_outside_the_square_root(kernel_path):
    w, g = np.zeros(1), np.array([0.0])
    d, v, z = (np.zeros_like(w) for _ in range(3))
    ftml_update(w, g, d, v, z, lr=0.5, t=1, beta1=0.5, epsilon=0.25)
    assert d[0] == (1 - 0.5) / 0.5 * (0.0 + 0.25)  # inside the sqrt it would be sqrt(0.25) = 0.5


def test_hyper_parameters_are_parsed_to_float32_even_for_float64(ref, kernel_path):
    """beta2 = 0.999 becomes 0.99900001287 (spec §1.2); epsilon stays a double."""
    w, g = np.array([0.0]), np.array([2.0])
    d, v, z = (np.zeros_like(w) for _ in range(3))
    ftml_update(w, g, d, v, z, lr=0.1, t=1, beta2=0.999)
    assert v[0] == (1.0 - float(np.float32(0.999))) * 4.0
    assert v[0] != (1.0 - 0.999) * 4.0


def test_large_t(ref, kernel_path):
    rng = np.random.default_rng(2)
    for dtype in (np.float32, np.float64):
        w, g = rng.normal(size=9).astype(dtype), rng.normal(size=9).astype(dtype)
        d, v, z = _state(rng, 9, dtype)
        for t in (1000, 123_456, 2**31 - 1):
            exp = ref.emulate(w, g, d, v, z, lr=0.01, t=t)
            got = ftml_update(w, g, d.copy(), v.copy(), z.copy(), lr=0.01, t=t)
            assert ref.bits_equal(got, exp[0]) and np.all(np.isfinite(got))


# --------------------------------------------------------------------------- float16
def test_float16_is_float32_computation_rounded_once(ref, kernel_path):
    rng = np.random.default_rng(8)
    w = rng.normal(size=(4, 5)).astype(np.float16)
    d, v, z = (np.zeros_like(w) for _ in range(3))
    for t in range(1, 11):
        g = rng.normal(size=(4, 5)).astype(np.float16)
        g[0, :2] = 0
        exp = ref.fp16(w, g, d, v, z, lr=0.05, t=t, wd=0.01, clip_grad=1.0)
        new = ftml_update(w, g, d, v, z, lr=0.05, t=t, wd=0.01, clip_grad=1.0)
        assert new.dtype == np.float16
        for got, e in zip((new, d, v, z), exp):
            assert ref.bits_equal(got, e), t
        w = new
    assert np.all(np.isfinite(w))


def test_float16_zero_gradient_gives_no_nan(kernel_path):
    """MXNet 1.9.1 returns [nan, 1.9] here (its half epsilon underflows to 0); ftmlopt does not."""
    w = np.array([1.0, 2.0], dtype=np.float16)
    g = np.array([0.0, 1.0], dtype=np.float16)
    d, v, z = (np.zeros_like(w) for _ in range(3))
    new = ftml_update(w, g, d, v, z, lr=0.1, t=1, out=w)
    assert new is w
    assert w[0] == np.float16(1.0) and w[1] == np.float16(1.9)
    assert np.all(np.isfinite(d)) and np.all(np.isfinite(z))


# --------------------------------------------------------------------------- validation
def _good():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 2)).astype(np.float32)
    return {"weight": w, "grad": rng.normal(size=(3, 2)).astype(np.float32), "d": np.ones_like(w),
            "v": np.full_like(w, 0.5), "z": np.full_like(w, -0.25)}


BAD_SCALARS = [
    ("t", 0, ValueError), ("t", -3, ValueError), ("t", 1.0, TypeError), ("t", True, TypeError), ("t", "1", TypeError),
    ("lr", 0.0, ValueError), ("lr", -0.1, ValueError), ("lr", float("nan"), ValueError),
    ("lr", float("inf"), ValueError), ("lr", "0.1", TypeError), ("lr", None, TypeError),
    ("beta1", 1.0, ValueError), ("beta1", -0.1, ValueError), ("beta1", 1.5, ValueError),
    ("beta1", float("nan"), ValueError), ("beta2", 1.0, ValueError), ("beta2", -1e-9, ValueError),
    ("beta2", float("inf"), ValueError), ("epsilon", -1e-8, ValueError), ("epsilon", float("inf"), ValueError),
    ("epsilon", float("nan"), ValueError), ("rescale_grad", -1.0, ValueError),
    ("rescale_grad", float("nan"), ValueError), ("wd", float("nan"), ValueError), ("wd", float("inf"), ValueError),
    ("clip_grad", float("nan"), ValueError), ("beta1", [0.5], TypeError),
]


@pytest.mark.parametrize(("name", "value", "exc"), BAD_SCALARS)
def test_bad_scalars_raise_before_mutation(name, value, exc, kernel_path):
    arrays = _good()
    before = {k: a.copy() for k, a in arrays.items()}
    kwargs = {"lr": 0.1, "t": 1, name: value}
    with pytest.raises(exc) as info:
        ftml_update(arrays["weight"], arrays["grad"], arrays["d"], arrays["v"], arrays["z"], out=arrays["weight"],
                    **kwargs)
    assert name in str(info.value) and repr(value) in str(info.value)
    for k, a in arrays.items():
        np.testing.assert_array_equal(a, before[k])


def _bad_arrays():
    cases = []
    for name in ("grad", "d", "v", "z", "out"):
        cases.append((name, lambda a, n=name: a.update({n: np.zeros((2, 3), np.float32)}), ValueError, "(2, 3)"))
        cases.append((name, lambda a, n=name: a.update({n: np.zeros((3, 2), np.float64)}), TypeError, "float64"))
    for name in ("weight", "grad", "d", "v", "z"):
        cases.append((name, lambda a, n=name: a.update({n: np.zeros((3, 2), np.int32)}), TypeError, "int32"))
        cases.append((name, lambda a, n=name: a.update({n: [[0.0] * 2] * 3}), TypeError, "list"))
    return cases


@pytest.mark.parametrize(("name", "mutate", "exc", "shown"), _bad_arrays())
def test_bad_arrays_raise_before_mutation(name, mutate, exc, shown, kernel_path):
    arrays = _good()
    arrays["out"] = arrays["weight"]
    mutate(arrays)
    snap = {k: np.array(a, copy=True) for k, a in arrays.items()}
    with pytest.raises(exc) as info:
        ftml_update(arrays["weight"], arrays["grad"], arrays["d"], arrays["v"], arrays["z"], lr=0.1, t=1,
                    out=arrays["out"])
    assert name in str(info.value) and shown in str(info.value)
    for k, a in arrays.items():
        np.testing.assert_array_equal(np.asarray(a), snap[k])


def test_aliased_or_read_only_states_rejected(kernel_path):
    a = _good()
    snap = {k: x.copy() for k, x in a.items()}
    with pytest.raises(ValueError, match="shares memory"):
        ftml_update(a["weight"], a["grad"], a["d"], a["d"], a["z"], lr=0.1, t=1)
    with pytest.raises(ValueError, match="out shares memory with state d"):
        ftml_update(a["weight"], a["grad"], a["d"], a["v"], a["z"], lr=0.1, t=1, out=a["d"])
    ro = a["v"].copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="v must be writable"):
        ftml_update(a["weight"], a["grad"], a["d"], ro, a["z"], lr=0.1, t=1)
    for k, x in a.items():
        np.testing.assert_array_equal(x, snap[k])


# --------------------------------------------------------------------------- hyper-parameter parsing
# (value passed from Python, value MXNet 1.9.1's kernel received), read back from the real MXNet 1.9.1
# through float64 arrays (d = the parsed value exactly, see _readout below); float32(x) differs for each.
MXNET_FLOAT_FIELD = [
    (1.9365173080312914, 1.9365172386169434), (4.574023937206841, 4.574024200439453),
    (2.816292629608009, 2.8162927627563477), (3.546457896781914, 3.5464577674865723),
    (1.0982058658246672, 1.098205804824829), (9.907589451138602e-07, 9.907588491842034e-07),
    (5.7426087934941505e-06, 5.742609118897235e-06), (1.1211296534717385e-08, 1.1211295891655482e-08),
    (2.66319981194212e-13, 2.66320006412496e-13), (9.909596214095392e-13, 9.909597014495786e-13),
]
MXNET_DOUBLE_FIELD = [  # epsilon
    (2.66319981194212e-13, 2.6631998119421197e-13), (5.7426087934941505e-06, 5.742608793494151e-06),
    (0.48498252239631395, 0.4849825223963139), (0.0009435094654774589, 0.0009435094654774588),
    (1.0698239369286541e-10, 1.0698239369286542e-10), (2.9919581598490372e-09, 2.9919581598490376e-09),
]


@pytest.mark.parametrize(("sent", "received"), MXNET_FLOAT_FIELD)
def test_float_fields_are_parsed_like_mxnet(sent, received, ref, kernel_path):
    assert float(np.float32(sent)) != received  # a plain float32 rounding would be off by one ulp
    assert float(ref.parse(sent)) == received  # the test-side model of dmlc's parser agrees with MXNet
    # Read the parsed rescale_grad back: float64, g=1, beta1=beta2=0, eps=0, lr=1, t=1 gives d = |rescale_grad|.
    w, g = np.zeros(1), np.ones(1)
    d, v, z = (np.zeros(1) for _ in range(3))
    ftml_update(w, g, d, v, z, lr=1.0, t=1, beta1=0.0, beta2=0.0, epsilon=0.0, rescale_grad=sent)
    assert d[0] == received
    # and as lr in float32: d_1 = (1/lr)(|g| + 0) with g = 1
    w32, g32 = np.zeros(1, np.float32), np.ones(1, np.float32)
    d32, v32, z32 = (np.zeros(1, np.float32) for _ in range(3))
    ftml_update(w32, g32, d32, v32, z32, lr=sent, t=1, beta1=0.0, beta2=0.0, epsilon=0.0)
    assert d32[0] == np.float32(1) / np.float32(received)


@pytest.mark.parametrize(("sent", "received"), MXNET_DOUBLE_FIELD)
def test_epsilon_is_parsed_like_mxnet(sent, received, ref, kernel_path):
    assert sent != received and float(ref.parse(sent, double=True)) == received
    w, g = np.zeros(1), np.zeros(1)
    d, v, z = (np.zeros(1) for _ in range(3))
    ftml_update(w, g, d, v, z, lr=1.0, t=1, beta1=0.0, beta2=0.0, epsilon=sent)
    assert d[0] == received


def test_short_decimals_parse_to_their_float32_rounding(ref):
    for x in (0.1, 0.6, 0.999, 0.05, 1e-8, 0.0025, 1.0, 0.0, -1.0, 0.4, 2.5, 1e-3):
        assert float(ref.parse(x)) == float(np.float32(x)) and float(ref.parse(x, double=True)) == x
