"""Property-based tests of ``FTML``/``Updater`` (hypothesis): multi-step runs match the test-side
MXNet emulation bit for bit, float16 with and without multi_precision, and no mutation on error."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ftmlopt.mxnet.optimizer import FTML, get_updater

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

opt_kwargs = st.fixed_dictionaries(
    {
        "learning_rate": st.floats(1e-4, 1.0),
        "beta1": st.floats(0.0, 0.95),
        "beta2": st.floats(0.0, 0.9999),
        "epsilon": st.floats(1e-10, 1e-3),
        "wd": st.floats(0.0, 0.1),
        "rescale_grad": st.floats(0.01, 2.0),
        "begin_num_update": st.integers(0, 50),
    },
    optional={"clip_gradient": st.one_of(st.none(), st.just(0), st.floats(-1.0, 2.0))},
)


def _kernel_clip(kw):
    c = kw.get("clip_gradient")
    return c if c else -1.0


@SETTINGS
@given(kw=opt_kwargs, dtype=st.sampled_from([np.float32, np.float64]),
       shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=5), steps=st.integers(1, 12),
       seed=st.integers(0, 2**16))
def test_ftml_updates_match_emulation(ref, kw, dtype, shape, steps, seed):
    rng = np.random.default_rng(seed)
    opt = FTML(**kw)
    w = rng.normal(size=shape).astype(dtype)
    state = opt.create_state_multi_precision(0, w)
    ew, ed, ev, ez = w.copy(), *(np.zeros_like(w) for _ in range(3))
    for step in range(1, steps + 1):
        g = rng.normal(size=shape).astype(dtype)
        opt.update_multi_precision(0, w, g, state)
        t = kw["begin_num_update"] + step
        ew, ed, ev, ez = ref.emulate(ew, g, ed, ev, ez, lr=kw["learning_rate"], t=t, beta1=kw["beta1"],
                                     beta2=kw["beta2"], epsilon=kw["epsilon"], wd=kw["wd"],
                                     rescale_grad=kw["rescale_grad"], clip_grad=_kernel_clip(kw))
        assert opt._index_update_count[0] == t
        for got, e in zip((w, *state), (ew, ed, ev, ez)):
            assert ref.bits_equal(got, e)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@SETTINGS
@given(kw=opt_kwargs, mp=st.booleans(), shape=hnp.array_shapes(min_dims=1, max_dims=2, max_side=5),
       steps=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_float16_paths(ref, kw, mp, shape, steps, seed):
    rng = np.random.default_rng(seed)
    opt = FTML(multi_precision=mp, **kw)
    w = rng.normal(size=shape).astype(np.float16)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        up = get_updater(opt)
        master = w.astype(np.float32)
        exp_state = [np.zeros(shape, np.float32 if mp else np.float16) for _ in range(3)]
        for step in range(1, steps + 1):
            g = rng.normal(size=shape).astype(np.float16)
            g.flat[0] = 0  # a zero gradient: MXNet's pure-fp16 path would give NaN here
            prev = w.copy()
            up(0, g, w)
            hyper = {"lr": kw["learning_rate"], "t": kw["begin_num_update"] + step, "beta1": kw["beta1"],
                     "beta2": kw["beta2"], "epsilon": kw["epsilon"], "wd": kw["wd"],
                     "rescale_grad": kw["rescale_grad"], "clip_grad": _kernel_clip(kw)}
            if mp:
                master, *exp_state = ref.emulate(master, g.astype(np.float32), *exp_state, **hyper)
                exp_w = master.astype(np.float16)
                got_state = up.states[0][1]
            else:
                exp_w, *exp_state = ref.fp16(prev, g, *exp_state, **hyper)
                got_state = up.states[0]
            assert ref.bits_equal(w, exp_w)
            for a, b in zip(got_state, exp_state):
                assert ref.bits_equal(a, b)
    fp16_warnings = [r for r in rec if "multi_precision=True" in str(r.message)]
    assert len(fp16_warnings) == (0 if mp else 1)


@SETTINGS
@given(kw=opt_kwargs, which=st.sampled_from(["grad_shape", "grad_dtype", "grad_int", "state", "weight_int"]),
       seed=st.integers(0, 2**16))
def test_invalid_update_mutates_nothing(ref, kw, which, seed):
    rng = np.random.default_rng(seed)
    opt = FTML(**kw)
    up = get_updater(opt)
    w = rng.normal(size=(3, 2)).astype(np.float32)
    up(0, rng.normal(size=(3, 2)).astype(np.float32), w)
    snap = [w.copy(), *(a.copy() for a in up.states[0])]
    counts, n = dict(opt._index_update_count), opt.num_update
    g = rng.normal(size=(3, 2)).astype(np.float32)
    weight = w
    if which == "grad_shape":
        g = g[:2]
    elif which == "grad_dtype":
        g = g.astype(np.float64)
    elif which == "grad_int":
        g = g.astype(np.int16)
    elif which == "weight_int":
        weight = w.astype(np.int32)
    full_state = up.states[0]
    if which == "state":
        up.states[0] = full_state[:2]  # a corrupted state (d, v) without z
    with pytest.raises((TypeError, ValueError)):
        up(0, g, weight)
    for a, b in zip((w, *full_state), snap, strict=True):
        assert ref.bits_equal(a, b)
    assert opt._index_update_count == counts and opt.num_update == n
