"""lr 0 in the MXNet system: ``FTML.update`` takes the rule's "no step" (count, fold g into v, keep w, d, z).

MXNet 1.9.1's kernel at lr 0 computes ``v`` as usual and then divides by lr: ``d = inf``, NaN
weights (spec §1.5; the test-side emulation shows it below). The MXNet system keeps what MXNet
computes finitely (the count and the bits of ``v``) and nothing else: that is the rule's
convention (``ftmlopt.rule``, "lr = 0 is no step"), checked here against the emulation and the rule.
``ftml_update`` itself keeps refusing lr 0 (``tests/mxnet/test_operator.py``).
"""

from __future__ import annotations

import numpy as np
import pytest

from ftmlopt import rule
from ftmlopt.mxnet.operator import fold_gradient
from ftmlopt.mxnet.optimizer import FTML

HYPER = dict(beta1=0.5, beta2=0.75, epsilon=2.0**-20, wd=0.5, rescale_grad=0.5)
CLIP = 0.375  # all exact in float32, so float64 MXNet and the float64 rule see the same numbers


def _grads(dtype: type) -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [rng.normal(size=7).astype(dtype) for _ in range(3)]


def _emulate(ref, w, g, d, v, z, *, lr: float, t: int):
    with np.errstate(divide="ignore", invalid="ignore"):
        return ref.emulate(w, g, d, v, z, lr=lr, t=t, clip_grad=CLIP, **HYPER)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lr_zero_counts_the_step_folds_v_and_keeps_w_d_z(ref, dtype) -> None:
    opt = FTML(learning_rate=0.1, clip_gradient=CLIP, **HYPER)
    w = np.linspace(-1, 1, 7).astype(dtype)
    state = opt.create_state(0, w)
    g1, g2, g3 = _grads(dtype)
    e = _emulate(ref, w, g1, *state, lr=0.1, t=1)
    opt.update(0, w, g1, state)
    assert all(ref.bits_equal(a, b) for a, b in zip((w, *state), e))

    before = [a.copy() for a in (w, *state)]
    mxnet = _emulate(ref, w, g2, *state, lr=0.0, t=2)
    assert np.isinf(mxnet[1]).all() and np.isnan(mxnet[0]).any()  # what MXNet itself writes at lr 0
    opt.set_lr_mult({0: 0.0})  # index 0 frozen on this step only
    opt.update(0, w, g2, state)
    assert opt._index_update_count[0] == 2 and opt.num_update == 2  # counted
    d, v, z = state
    assert ref.bits_equal(w, before[0]) and ref.bits_equal(d, before[1]) and ref.bits_equal(z, before[3])
    assert ref.bits_equal(v, mxnet[2])  # v: MXNet's bits
    assert not ref.bits_equal(v, before[2])

    opt.set_lr_mult({})
    e = _emulate(ref, w, g3, d, v, z, lr=0.1, t=3)
    opt.update(0, w, g3, state)
    assert all(ref.bits_equal(a, b) for a, b in zip((w, *state), e))
    assert all(np.isfinite(a).all() for a in (w, *state))


def test_lr_zero_is_the_rules_mxnet_step_at_lr_zero(ref) -> None:
    """float64 with float32-exact hyper-parameters: the same bits as ``rule.mxnet_step`` at lr 0."""
    opt = FTML(learning_rate=0.1, clip_gradient=CLIP, **HYPER)  # the constructor wants lr > 0
    opt.set_lr_mult({0: 0.0})
    w = np.linspace(-1, 1, 7)
    d, v, z = (np.abs(np.random.default_rng(1).normal(size=7)) for _ in range(3))
    g = _grads(np.float64)[0]
    c = rule.constants(0.0, 1, HYPER["beta1"], HYPER["beta2"], HYPER["epsilon"], weight_decay=HYPER["wd"],
                       clip=CLIP, grad_scale=HYPER["rescale_grad"])
    expected = rule.mxnet_step(w, g, d, v, z, c, sqrt=np.sqrt, clip=np.clip)
    state = (d.copy(), v.copy(), z.copy())
    w_run = w.copy()
    opt.update(0, w_run, g, state)
    for got, exp in zip((w_run, *state), expected):
        assert ref.bits_equal(got, exp)


def test_lr_zero_float16_folds_in_float32_and_rounds_once(ref) -> None:
    opt = FTML(learning_rate=0.1, clip_gradient=CLIP, **HYPER)
    opt.set_lr_mult({0: 0.0})
    w = np.linspace(-1, 1, 7).astype(np.float16)
    g = _grads(np.float16)[0]
    with pytest.warns(UserWarning):  # MXNet's accuracy warning for float16 without multi_precision
        state = opt.create_state_multi_precision(0, w)
    state[1][:] = np.float16(0.25)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected_v = ref.fp16(w, g, *state, lr=0.0, t=1, clip_grad=CLIP, **HYPER)[2]
    w0 = w.copy()
    opt.update_multi_precision(0, w, g, state)
    assert ref.bits_equal(state[1], expected_v) and ref.bits_equal(w, w0)


def test_fold_gradient_checks_before_writing() -> None:
    w, g, v = np.ones(3), np.ones(3), np.zeros(3)
    with pytest.raises(ValueError, match=r"Invalid beta2: 1\.0"):
        fold_gradient(w, g, v, beta2=1.0)
    with pytest.raises(ValueError, match="v has float32"):
        fold_gradient(w, g, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="Invalid rescale_grad: -1"):
        fold_gradient(w, g, v, rescale_grad=-1)
    assert not v.any()
