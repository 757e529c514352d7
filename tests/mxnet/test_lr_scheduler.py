"""``ftmlopt.mxnet.lr_scheduler`` numerically as ``mxnet.lr_scheduler`` (spec §4, verified numbers)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ftmlopt.mxnet.lr_scheduler import (
    CosineScheduler,
    FactorScheduler,
    LRScheduler,
    MultiFactorScheduler,
    PolyScheduler,
)
from ftmlopt.mxnet.optimizer import FTML


def test_factor_scheduler_decays_strictly_after_each_step():
    s = FactorScheduler(step=2, factor=0.5, base_lr=1.0)
    assert [s(n) for n in range(8)] == [1, 1, 1, 0.5, 0.5, 0.25, 0.25, 0.125]


def test_factor_scheduler_closed_form_and_jumps():
    s = FactorScheduler(step=3, factor=0.5, base_lr=0.8)
    for n in range(1, 30):
        assert s(n) == pytest.approx(0.8 * 0.5 ** ((n - 1) // 3), rel=1e-15)
    jump = FactorScheduler(step=2, factor=0.5, base_lr=1.0)
    assert jump(1) == 1.0 and jump(7) == 0.125  # a jump applies every missed decay


def test_factor_scheduler_stop_factor_lr():
    s = FactorScheduler(step=1, factor=0.1, stop_factor_lr=1e-3, base_lr=1.0)
    assert [s(n) for n in (1, 2, 3)] == pytest.approx([1.0, 0.1, 0.01])
    assert s(4) == pytest.approx(1e-3) and s(5) == 1e-3 and s(50) == 1e-3


def test_multifactor_scheduler():
    s = MultiFactorScheduler(step=[2, 4], factor=0.1, base_lr=1.0)
    assert [s(n) for n in range(7)] == pytest.approx([1, 1, 1, 0.1, 0.1, 0.01, 0.01], rel=1e-15)
    assert s.cur_step_ind == 2 and s.count == 4


def test_poly_scheduler_and_its_sticky_tail():
    p = PolyScheduler(max_update=10, base_lr=1.0, pwr=1)
    assert p(3) == pytest.approx(0.7, rel=1e-15)
    assert p(20) == pytest.approx(0.7, rel=1e-15)  # past max_update: the last computed value
    q = PolyScheduler(max_update=4, base_lr=2.0, pwr=2, final_lr=0.5)
    assert [q(n) for n in range(6)] == pytest.approx([2.0, 0.5 + 1.5 * 0.5625, 0.5 + 1.5 * 0.25,
                                                      0.5 + 1.5 * 0.0625, 0.5, 0.5], rel=1e-15)


def test_cosine_scheduler():
    c = CosineScheduler(max_update=4, base_lr=1.0)
    assert [c(n) for n in range(7)] == pytest.approx([1, 0.853553, 0.5, 0.146447, 0, 0, 0], abs=1e-6)
    c2 = CosineScheduler(max_update=10, base_lr=0.3, final_lr=0.1)
    assert c2(5) == pytest.approx(0.1 + 0.2 * (1 + math.cos(math.pi / 2)) / 2)


@pytest.mark.parametrize("cls_kwargs", [
    (FactorScheduler, {"step": 100}), (MultiFactorScheduler, {"step": [100]}),
    (PolyScheduler, {"max_update": 100}), (CosineScheduler, {"max_update": 100}),
])
def test_warmup_linear_and_constant(cls_kwargs):
    cls, kw = cls_kwargs
    lin = cls(base_lr=1.0, warmup_steps=4, warmup_begin_lr=0.2, **kw)
    assert [lin(n) for n in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8], rel=1e-15)
    const = cls(base_lr=1.0, warmup_steps=4, warmup_begin_lr=0.2, warmup_mode="constant", **kw)
    assert [const(n) for n in range(4)] == [0.2] * 4
    assert lin(4) == pytest.approx(1.0)


def test_warmup_does_not_shift_factor_decay_but_shifts_poly():
    f = FactorScheduler(step=2, factor=0.5, base_lr=1.0, warmup_steps=2)
    assert [f(n) for n in (2, 3)] == [1.0, 0.5]
    p = PolyScheduler(max_update=10, base_lr=1.0, pwr=1, warmup_steps=2)
    assert p(2) == 1.0 and p(6) == pytest.approx(0.5, rel=1e-15)


def test_optimizer_override_quirks(capsys):
    """Spec §4.6: the override only sets base_lr; Poly/Cosine and warmup keep the original rate."""
    p = PolyScheduler(max_update=10, base_lr=1.0, pwr=1)
    opt = FTML(learning_rate=0.5, lr_scheduler=p)
    assert "overwritten" in capsys.readouterr().out
    assert p.base_lr == 0.5 and opt.learning_rate == 1.0  # lost as soon as it computes
    c = CosineScheduler(max_update=4, base_lr=1.0)
    FTML(learning_rate=0.5, lr_scheduler=c)
    assert c(0) == 1.0
    f = FactorScheduler(step=10, base_lr=1.0, warmup_steps=2, warmup_begin_lr=0.0)
    opt = FTML(learning_rate=0.5, lr_scheduler=f)
    assert f(1) == 0.5  # warmup ramps to the scheduler's original base_lr (1.0)...
    assert opt.learning_rate == 0.0 and f(5) == 0.5  # ...while the plateau uses the override


def test_scheduler_lr_used_by_ftml_is_evaluated_after_increment(ref):
    s = FactorScheduler(step=1, factor=0.5, base_lr=0.1)
    opt = FTML(lr_scheduler=s)
    w = np.array([0.5, -1.0], np.float32)
    state = opt.create_state(0, w)
    for t, lr in zip((1, 2, 3), (0.1, 0.05, 0.025)):
        g = np.array([0.25 * t, -0.5], np.float32)
        exp = ref.emulate(w, g, *state, lr=lr, t=t)
        opt.update(0, w, g, state)
        assert ref.bits_equal(w, exp[0])


@pytest.mark.parametrize(("make", "exc", "msg"), [
    (lambda: LRScheduler(base_lr=0.1, warmup_begin_lr=0.2), ValueError, "Base lr has to be higher than warmup"),
    (lambda: LRScheduler(warmup_steps=-1), ValueError, "Warmup steps has to be positive or 0"),
    (lambda: LRScheduler(warmup_steps=1.5), TypeError, "warmup_steps"),
    (lambda: LRScheduler(warmup_mode="cubic"), ValueError, "Supports only linear and constant"),
    (lambda: FactorScheduler(step=0), ValueError, "greater or equal than 1"),
    (lambda: FactorScheduler(step=1, factor=1.5), ValueError, "Factor must be no more than 1"),
    (lambda: MultiFactorScheduler(step=[]), TypeError, "non-empty list"),
    (lambda: MultiFactorScheduler(step=[3, 2]), ValueError, "increasing"),
    (lambda: MultiFactorScheduler(step=[0, 2]), ValueError, "greater or equal than 1"),
    (lambda: MultiFactorScheduler(step=[2], factor=2.0), ValueError, "no more than 1"),
    (lambda: PolyScheduler(max_update=0), ValueError, "max_update"),
    (lambda: CosineScheduler(max_update=2.5), TypeError, "max_update"),
    (lambda: FactorScheduler(step=1, base_lr=float("nan")), ValueError, "base_lr"),
])
def test_scheduler_validation(make, exc, msg):
    with pytest.raises(exc, match=msg):
        make()


def test_base_class_call_and_warmup_bounds():
    s = LRScheduler(base_lr=1.0, warmup_steps=3, warmup_begin_lr=0.5)
    with pytest.raises(NotImplementedError, match="must override this"):
        s(0)
    assert s.get_warmup_lr(1) == pytest.approx(0.5 + 0.5 / 3)
    with pytest.raises(ValueError, match="warmup"):
        s.get_warmup_lr(3)
