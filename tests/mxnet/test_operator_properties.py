"""Property-based tests of ``ftml_update`` (hypothesis): shapes, dtypes, hyper-parameters.

* float32/float64: bit-identical to the test-side MXNet emulation, on both dispatch paths;
* float16: bit-identical to "float32 computation, rounded once";
* a bad argument raises before anything is modified.
"""

from __future__ import annotations

import os
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ftmlopt import ftml_update

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

hyper_st = st.fixed_dictionaries({
    "lr": st.floats(1e-4, 10.0),
    "t": st.integers(1, 100_000),
    "beta1": st.floats(0.0, 0.99),
    "beta2": st.floats(0.0, 0.9999),
    "epsilon": st.floats(1e-10, 1e-2),
    "wd": st.floats(0.0, 0.5),
    "rescale_grad": st.floats(0.0, 4.0),
    "clip_grad": st.one_of(st.just(-1.0), st.floats(-3.0, 3.0)),
})


@st.composite
def problem(draw, dtypes=(np.float32, np.float64)):
    dtype = draw(st.sampled_from(dtypes))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6))
    elems = st.floats(-1e3, 1e3, width=16 if dtype == np.float16 else 32)
    pos = st.floats(0.0, 1e3, width=16 if dtype == np.float16 else 32)
    w, g, z = (draw(hnp.arrays(dtype, shape, elements=elems)) for _ in range(3))
    d, v = (draw(hnp.arrays(dtype, shape, elements=pos)) for _ in range(2))
    return w, g, d, v, z


def _env(path: str):
    return mock.patch.dict(os.environ, {"FTMLOPT_DISABLE_CPU_KERNELS": "1" if path == "numpy" else "0"})


@SETTINGS
@given(p=problem(), hyper=hyper_st, path=st.sampled_from(["numpy", "default"]), in_place=st.booleans())
def test_operator_matches_emulation_bit_exact(ref, p, hyper, path, in_place):
    w, g, d, v, z = p
    exp = ref.emulate(w, g, d, v, z, **hyper)
    with _env(path):
        new = ftml_update(w, g, d, v, z, out=w if in_place else None, **hyper)
    assert (new is w) == in_place
    for got, e in zip((new, d, v, z), exp):
        assert ref.bits_equal(got, e)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # d may exceed float16's range
@SETTINGS
@given(p=problem(dtypes=(np.float16,)), hyper=hyper_st)
def test_float16_is_float32_rounded_once(ref, p, hyper):
    w, g, d, v, z = p
    exp = ref.fp16(w, g, d, v, z, **hyper)
    new = ftml_update(w, g, d, v, z, **hyper)
    for got, e in zip((new, d, v, z), exp):
        assert ref.bits_equal(got, e)


BAD = st.sampled_from([
    ("t", 0), ("t", -1), ("t", 2.0), ("lr", 0.0), ("lr", -1.0), ("lr", float("inf")), ("beta1", 1.0),
    ("beta2", 1.5), ("beta1", -0.5), ("epsilon", -1.0), ("epsilon", float("nan")), ("rescale_grad", -0.5),
    ("wd", float("nan")), ("clip_grad", float("nan")),
])


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@SETTINGS
@given(p=problem(dtypes=(np.float16, np.float32, np.float64)), hyper=hyper_st, bad=BAD,
       path=st.sampled_from(["numpy", "default"]))
def test_no_mutation_on_error(ref, p, hyper, bad, path):
    w, g, d, v, z = p
    snap = [a.copy() for a in p]
    name, value = bad
    hyper = {**hyper, name: value}
    with _env(path):
        try:
            ftml_update(w, g, d, v, z, out=w, **hyper)
        except (TypeError, ValueError) as exc:
            assert name in str(exc)
        else:
            raise AssertionError(f"{name}={value!r} was accepted")
    for a, b in zip((w, g, d, v, z), snap):
        assert ref.bits_equal(a, b)


@SETTINGS
@given(p=problem(), which=st.sampled_from(["grad", "d", "v", "z"]), kind=st.sampled_from(["shape", "dtype", "int"]))
def test_mismatched_arrays_rejected_without_mutation(ref, p, which, kind):
    arrays = dict(zip(["weight", "grad", "d", "v", "z"], p))
    snap = {k: a.copy() for k, a in arrays.items()}
    a = arrays[which]
    if kind == "shape":
        arrays[which] = np.zeros((*a.shape, 2), a.dtype)
    elif kind == "dtype":
        arrays[which] = a.astype(np.float16)
    else:
        arrays[which] = a.astype(np.int64)
    try:
        ftml_update(arrays["weight"], arrays["grad"], arrays["d"], arrays["v"], arrays["z"], lr=0.1, t=1,
                    out=arrays["weight"])
    except (TypeError, ValueError) as exc:
        assert which in str(exc)
    else:
        raise AssertionError("accepted")
    for k in snap:
        if k != which:
            assert ref.bits_equal(arrays[k], snap[k])
