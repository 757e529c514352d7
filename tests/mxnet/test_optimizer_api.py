"""The MXNet 1.9 ``Optimizer``/``FTML`` API (spec §2-§3), plus ftmlopt's deliberate differences."""

from __future__ import annotations

import pickle
import warnings
from types import SimpleNamespace

import numpy as np
import pytest

from ftmlopt import lr_scheduler
from ftmlopt.mxnet.optimizer import FTML, SGD, Optimizer, create, register
from ftmlopt.mxnet.optimizer import base as base_mod

FP16_WARNING = (
    "Accumulating with float16 in optimizer can lead to poor accuracy or slow convergence. "
    "Consider using multi_precision=True option of the optimizer"
)
OVERRIDE_MSG = "learning rate from ``lr_scheduler`` has been overwritten by ``learning_rate`` in optimizer."


@pytest.fixture
def clean_registry():
    """Restore the registry after a test that registers classes."""
    saved = dict(Optimizer.opt_registry)
    yield
    Optimizer.opt_registry.clear()
    Optimizer.opt_registry.update(saved)


# --------------------------------------------------------------------------- registry
@pytest.mark.parametrize("name", ["ftml", "FTML", "fTmL"])
def test_create_is_case_insensitive(name):
    opt = create(name, learning_rate=0.2, beta1=0.5)
    assert type(opt) is FTML and opt.lr == 0.2 and opt.beta1 == 0.5
    assert type(Optimizer.create_optimizer(name)) is FTML


def test_registry_contents():
    assert Optimizer.opt_registry["ftml"] is FTML and Optimizer.opt_registry["sgd"] is SGD


def test_unknown_name_error_keeps_the_spelling():
    with pytest.raises(ValueError, match=r"^Cannot find optimizer NoSuchOpt$"):
        create("NoSuchOpt")


def test_register_override_warning_text(clean_registry):
    class FTML(Optimizer):  # the same name on purpose
        pass

    with pytest.warns(UserWarning) as rec:
        assert register(FTML) is FTML
    assert str(rec[0].message) == (
        f"WARNING: New optimizer {__name__}.FTML is overriding existing optimizer ftmlopt.mxnet.optimizer.ftml.FTML"
    )
    assert Optimizer.opt_registry["ftml"] is FTML


def test_register_as_decorator_and_non_class(clean_registry):
    @register
    class MyOpt(Optimizer):
        pass

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a new name does not warn
        assert type(create("MYOPT")) is MyOpt
    with pytest.raises(TypeError):
        register(lambda: None)


def test_unknown_keyword_argument():
    with pytest.raises(TypeError, match="foo"):
        FTML(foo=1)
    with pytest.raises(TypeError, match="foo"):
        create("ftml", foo=1)


# --------------------------------------------------------------------------- constructor, learning rate
def test_defaults():
    opt = FTML()
    assert (opt.beta1, opt.beta2, opt.epsilon) == (0.6, 0.999, 1e-8)
    assert opt.lr == 0.01 and opt.learning_rate == 0.01
    assert opt.rescale_grad == 1.0 and opt.wd == 0.0 and opt.clip_gradient is None
    assert opt.begin_num_update == opt.num_update == 0 and opt.multi_precision is False
    assert opt.aggregate_num == 0 and opt.param_dict == {} and opt.idx2name == {} and opt.sym_info == ()
    assert opt._all_index_update_counts == {0: {}} and opt._index_update_count is opt._all_index_update_counts[0]


def test_scheduler_without_learning_rate_drives_the_rate(capsys):
    sched = lr_scheduler.FactorScheduler(step=1, base_lr=1024)
    opt = FTML(lr_scheduler=sched)
    assert opt.lr is None and opt.learning_rate == 1024
    assert capsys.readouterr().out == ""


def test_scheduler_override_is_printed(capsys):
    sched = lr_scheduler.FactorScheduler(step=10, factor=0.5, base_lr=0.1)
    opt = FTML(learning_rate=0.3, lr_scheduler=sched)
    assert capsys.readouterr().out.strip() == OVERRIDE_MSG
    assert sched.base_lr == 0.3 and opt.learning_rate == 0.3
    sched.base_lr = 0.4
    assert opt.learning_rate == 0.4
    # equal rates: no message
    FTML(learning_rate=0.4, lr_scheduler=lr_scheduler.FactorScheduler(step=1, base_lr=0.4))
    assert capsys.readouterr().out == ""


def test_set_learning_rate():
    opt = Optimizer(learning_rate=0.01)
    opt.set_learning_rate(0.2)
    assert opt.learning_rate == 0.2
    with pytest.raises(ValueError, match="-1"):
        opt.set_learning_rate(-1)
    assert opt.lr == 0.2


def test_set_learning_rate_with_scheduler_raises_user_warning():
    opt = FTML(lr_scheduler=lr_scheduler.FactorScheduler(step=1, base_lr=0.1))
    with pytest.raises(UserWarning, match="LRScheduler of the optimizer has already been defined"):
        opt.set_learning_rate(0.5)
    assert opt.lr is None


def test_set_lr_scale_is_deprecated():
    with pytest.raises(DeprecationWarning):
        FTML().set_lr_scale({0: 2.0})


def test_any_callable_is_a_scheduler(ref):
    calls = []

    def sched(n):
        calls.append(n)
        return 0.1 / n

    opt = FTML(lr_scheduler=sched)
    w = np.array([1.0, -1.0], dtype=np.float32)
    state = opt.create_state(0, w)
    for t in (1, 2, 3):
        g = np.array([0.5, 0.25], dtype=np.float32) * t
        exp = ref.emulate(w, g, *state, lr=0.1 / t, t=t)
        opt.update(0, w, g, state)
        assert ref.bits_equal(w, exp[0])
    assert calls[-1] == 3  # evaluated after the count increment


# --------------------------------------------------------------------------- lr_mult / wd_mult
class FakeSymbol:
    def __init__(self, attrs, args):
        self._attrs, self._args = attrs, args

    def attr_dict(self):
        return self._attrs

    def list_arguments(self):
        return self._args


def test_wd_mult_name_rule():
    names = {0: "fc_weight", 1: "fc_bias", 2: "bn_gamma", 3: "bn_beta"}
    opt = FTML(wd=0.1, param_idx2name=names)
    assert opt.wd_mult == {"fc_bias": 0.0, "bn_beta": 0.0}
    assert [opt._get_wd(i) for i in range(4)] == [0.1, 0.0, 0.1, 0.0]
    assert opt._get_wd(99) == 0.1  # an index without a name gets the full wd


def test_lr_mult_by_index_and_name():
    opt = FTML(learning_rate=0.01, param_idx2name={0: "fc_weight", 1: "fc_bias", 2: "out_weight"})
    opt.set_lr_mult({0: 2.0, "fc_bias": 3.0})
    assert [opt._get_lr(i) for i in range(3)] == [0.02, 0.03, 0.01]
    opt.set_lr_mult({})  # replaces, does not merge
    assert opt.lr_mult == {}


def test_symbol_attributes_seed_the_multipliers():
    sym = FakeSymbol(
        {"fc1_weight": {"__lr_mult__": "0"}, "fc1_bias": {"__lr_mult__": "1.0"},
         "fc2_weight": {"__wd_mult__": "0.5"}, "fc2_bias": {"__wd_mult__": "0.5"}, "data": {}},
        ["data", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"],
    )
    names = {0: "fc1_weight", 1: "fc1_bias", 2: "fc2_weight", 3: "fc2_bias"}
    opt = FTML(sym=sym, param_idx2name=names, wd=0.1, learning_rate=0.5)
    assert opt.lr_mult == {"fc1_bias": 1.0, "fc1_weight": 0.0}
    assert opt.wd_mult == {"fc2_bias": 0.5, "fc2_weight": 0.5, "fc1_bias": 0.0}  # 1.x expectation (§5.1)
    assert opt.sym_info == (sym.attr_dict(), sym.list_arguments())
    # After one update through each index, fc1_weight (lr_mult 0) is unchanged (frozen, counted).
    ws = [np.full(3, 1.0, np.float32) for _ in range(4)]
    states = [opt.create_state(i, w) for i, w in enumerate(ws)]
    for i, (w, s) in enumerate(zip(ws, states)):
        opt.update(i, w, np.full(3, 0.3, np.float32), s)
    assert np.all(ws[0] == 1.0) and np.all(states[0][0] == 0)
    assert opt._index_update_count[0] == 1
    assert np.all(ws[1] != 1.0) and np.all(ws[2] != 1.0)


def test_sym_without_interface_rejected():
    with pytest.raises(TypeError, match="attr_dict"):
        FTML(sym=object())


def test_param_dict_precedence():
    class Param:
        def __init__(self, lr_mult, wd_mult):
            self.lr_mult, self.wd_mult = lr_mult, wd_mult

    pd = {0: Param(5.0, 0.25)}
    opt = FTML(learning_rate=0.1, wd=0.2, param_dict=pd, param_idx2name={0: "a_bias", 1: "b_bias"})
    opt.set_lr_mult({0: 100.0, "b_bias": 3.0})
    opt.set_wd_mult({0: 100.0})
    assert opt.param_dict is pd  # not copied
    assert opt._get_lr(0) == pytest.approx(0.5) and opt._get_wd(0) == pytest.approx(0.05)
    assert opt._get_lr(1) == pytest.approx(0.3) and opt._get_wd(1) == 0.0


def test_pickling_drops_param_dict():
    sched = lr_scheduler.FactorScheduler(step=2, factor=0.5, base_lr=0.1)
    param = SimpleNamespace(lr_mult=1.0, wd_mult=1.0)
    opt = FTML(lr_scheduler=sched, param_dict={0: param}, param_idx2name={0: "w_weight"}, wd=0.01)
    w = np.ones(3, np.float32)
    opt.update(0, w, np.ones(3, np.float32), opt.create_state(0, w))
    clone = pickle.loads(pickle.dumps(opt))
    assert clone.param_dict == {} and "param_dict" not in opt.__getstate__()
    assert clone._all_index_update_counts == {0: {0: 1}} and clone.num_update == 1
    assert clone.lr_scheduler.base_lr == 0.1 and clone.idx2name == {0: "w_weight"}
    assert opt.param_dict  # the original keeps it


# --------------------------------------------------------------------------- counting
def test_begin_num_update_and_counts():
    opt = FTML(begin_num_update=5)
    w = np.ones(2, np.float32)
    s = opt.create_state(0, w)
    opt.update(0, w, np.ones(2, np.float32), s)
    assert opt._index_update_count == {0: 6} and opt.num_update == 6


def test_per_device_counts():
    opt = FTML(begin_num_update=5)
    w = np.ones(2, np.float32)
    s0, s1 = opt.create_state(0, w), opt.create_state(0, w.copy())
    opt.update(0, w, np.ones(2, np.float32), s0)
    opt._set_current_context(1)
    opt.update(0, w.copy(), np.ones(2, np.float32), s1)
    assert opt._all_index_update_counts == {0: {0: 6}, 1: {0: 6}} and opt.num_update == 6
    opt.update(1, w.copy(), np.ones(2, np.float32), opt.create_state(1, w))
    opt._set_current_context(0)
    assert opt._index_update_count == {0: 6}


def test_update_count_accepts_lists():
    opt = FTML()
    opt._update_count([0, 1, 1])
    assert opt._index_update_count == {0: 1, 1: 2} and opt.num_update == 2


def test_scheduler_sees_count_after_increment():
    seen = []
    opt = FTML(lr_scheduler=lambda n: seen.append(n) or 0.1, begin_num_update=3)
    w = np.ones(2)
    opt.update(0, w, np.ones(2), opt.create_state(0, w))
    assert seen == [4]


# --------------------------------------------------------------------------- multi-precision
def test_multi_precision_state_layout_and_update(ref):
    opt = FTML(multi_precision=True, learning_rate=0.1)
    w = np.array([1.0, 2.0, -3.0], dtype=np.float16)
    state = opt.create_state_multi_precision(0, w)
    master, (d, v, z) = state
    assert master.dtype == np.float32 and ref.bits_equal(master, w.astype(np.float32))
    assert all(a.dtype == np.float32 for a in (d, v, z))
    g = np.array([0.5, 0.0, -1.0], dtype=np.float16)
    exp = ref.emulate(master, g.astype(np.float32), d, v, z, lr=0.1, t=1)
    opt.update_multi_precision(0, w, g, state)
    assert ref.bits_equal(master, exp[0]) and ref.bits_equal(w, exp[0].astype(np.float16))
    assert opt._index_update_count == {0: 1}  # counted once
    # float32 weight with multi_precision: plain (d, v, z)
    w32 = np.ones(2, np.float32)
    s32 = opt.create_state_multi_precision(1, w32)
    assert isinstance(s32, tuple) and len(s32) == 3 and s32[0].dtype == np.float32


def test_float16_without_multi_precision_warns_and_stays_finite(ref):
    opt = FTML(learning_rate=0.1)
    w = np.array([1.0, 2.0], dtype=np.float16)
    for _ in range(2):  # the warning is emitted on every call
        with pytest.warns(UserWarning) as rec:
            state = opt.create_state_multi_precision(0, w)
        assert [str(r.message) for r in rec] == [FP16_WARNING]
    assert all(s.dtype == np.float16 for s in state)
    g = np.array([0.0, 1.0], dtype=np.float16)
    exp = ref.fp16(w, g, *state, lr=0.1, t=1)
    opt.update_multi_precision(0, w, g, state)
    assert ref.bits_equal(w, exp[0]) and np.all(np.isfinite(w))  # MXNet gives [nan, 1.9]


def test_float32_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FTML().create_state_multi_precision(0, np.ones(2, np.float32))
        FTML(multi_precision=True).create_state_multi_precision(0, np.ones(2, np.float16))


# --------------------------------------------------------------------------- clip_gradient truthiness
@pytest.mark.parametrize(("clip", "kernel_clip"), [(None, -1.0), (0, -1.0), (0.0, -1.0), (0.5, 0.5), (-0.5, -0.5)])
def test_clip_gradient_truthiness(clip, kernel_clip, ref):
    opt = FTML(learning_rate=0.1, clip_gradient=clip, beta2=0.5)
    w = np.array([1.0, -2.0, 0.0], dtype=np.float32)
    g = np.array([3.0, -0.25, 0.0], dtype=np.float32)
    state = opt.create_state(0, w)
    exp = ref.emulate(w, g, *state, lr=0.1, t=1, beta2=0.5, clip_grad=kernel_clip)
    opt.update(0, w, g, state)
    for got, e in zip((w, *state), exp):
        assert ref.bits_equal(got, e)
    expected_v0 = np.float32(0.5) * np.float32(0.25 if clip == 0.5 else 9.0)
    assert state[1][0] == expected_v0


@pytest.mark.parametrize(("clip", "expected"), [(None, -0.5), (0, -0.5), (0.0, -0.5), (-0.5, -0.5), (0.5, 0.75)])
def test_sgd_clip_gradient_truthiness(clip, expected):
    """MXNet's SGD passes clip_gradient to its kernel only when truthy (and the kernel clips only
    when it is >= 0): 0 must not zero the gradient. w = 1 - 0.5 * g with g = 3, or g clipped to 0.5."""
    opt = create("sgd", learning_rate=0.5, clip_gradient=clip)
    w = np.array([1.0, 1.0])
    g = np.array([3.0, -3.0])
    opt.update(0, w, g, opt.create_state(0, w))
    assert w.tolist() == [expected, 2.0 - expected]


# --------------------------------------------------------------------------- lr == 0 is "no step"
def test_zero_learning_rate_keeps_w_d_z_folds_v_and_counts():
    """The rule's convention (tests/mxnet/test_lr_zero.py checks the bits): v takes the gradient, the rest stays."""
    sched_values = {1: 0.1, 2: 0.0, 3: 0.1}
    opt = FTML(lr_scheduler=lambda n: sched_values[n])
    w = np.array([1.0, 2.0], np.float32)
    state = opt.create_state(0, w)
    opt.update(0, w, np.ones(2, np.float32), state)
    snap = [a.copy() for a in (w, *state)]
    opt.update(0, w, np.ones(2, np.float32), state)
    for a, b in zip((w, state[0], state[2]), (snap[0], snap[1], snap[3])):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(state[1], 0.999 * snap[2] + 0.001, rtol=1e-5)
    assert opt._index_update_count[0] == 2
    opt.update(0, w, np.ones(2, np.float32), state)
    assert opt._index_update_count[0] == 3 and not np.array_equal(w, snap[0])


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(("kwargs", "exc", "shown"), [
    ({"beta1": 1.0}, ValueError, "beta1"), ({"beta1": -0.1}, ValueError, "beta1"),
    ({"beta2": 1.5}, ValueError, "beta2"), ({"epsilon": -1e-8}, ValueError, "epsilon"),
    ({"epsilon": float("nan")}, ValueError, "epsilon"), ({"learning_rate": 0.0}, ValueError, "learning_rate"),
    ({"learning_rate": -0.1}, ValueError, "learning_rate"), ({"learning_rate": float("inf")}, ValueError, "inf"),
    ({"rescale_grad": -1.0}, ValueError, "rescale_grad"), ({"wd": float("nan")}, ValueError, "wd"),
    ({"clip_gradient": float("nan")}, ValueError, "clip_gradient"), ({"begin_num_update": -1}, ValueError, "-1"),
    ({"begin_num_update": 1.5}, TypeError, "begin_num_update"), ({"lr_scheduler": 0.1}, TypeError, "lr_scheduler"),
    ({"param_idx2name": [1, 2]}, TypeError, "param_idx2name"), ({"learning_rate": "0.1"}, TypeError, "'0.1'"),
])
def test_constructor_validation(kwargs, exc, shown):
    with pytest.raises(exc, match=shown if shown != "inf" else None) as info:
        FTML(**kwargs)
    assert shown in str(info.value)


def test_learning_rate_with_callable_lacking_base_lr_is_an_error(capsys):
    with pytest.raises(ValueError, match="base_lr"):
        FTML(learning_rate=0.1, lr_scheduler=lambda n: 0.1)


def test_constructor_error_leaves_scheduler_untouched(capsys):
    sched = lr_scheduler.FactorScheduler(step=1, base_lr=0.1)
    with pytest.raises(ValueError):
        FTML(learning_rate=0.5, lr_scheduler=sched, beta1=2.0)
    with pytest.raises(ValueError):
        FTML(learning_rate=0.5, lr_scheduler=sched, rescale_grad=-1.0)
    assert sched.base_lr == 0.1 and capsys.readouterr().out == ""


def _setup():
    opt = FTML(learning_rate=0.1)
    w = np.array([1.0, 2.0, 3.0], np.float32)
    state = opt.create_state(0, w)
    opt.update(0, w, np.ones(3, np.float32), state)  # so that state is non-trivial
    return opt, w, state


BAD_UPDATES = [
    ("grad shape", lambda w, g, s: (w, np.ones(4, np.float32), s), ValueError, "grad"),
    ("grad dtype", lambda w, g, s: (w, g.astype(np.float64), s), TypeError, "grad"),
    ("int grad", lambda w, g, s: (w, g.astype(np.int32), s), TypeError, "grad"),
    ("int weight", lambda w, g, s: (w.astype(np.int64), g, s), TypeError, "weight"),
    ("list grad", lambda w, g, s: (w, [1.0, 1.0, 1.0], s), TypeError, "grad"),
    ("short state", lambda w, g, s: (w, g, s[:2]), ValueError, "state"),
    ("state dtype", lambda w, g, s: (w, g, (s[0].astype(np.float64), s[1], s[2])), ValueError, "state d"),
    ("state shape", lambda w, g, s: (w, g, (s[0], s[1], np.zeros(2, np.float32))), ValueError, "state z"),
    ("None state", lambda w, g, s: (w, g, None), ValueError, "state"),
]


@pytest.mark.parametrize(("label", "make", "exc", "shown"), BAD_UPDATES)
def test_update_validation_before_mutation(label, make, exc, shown):
    opt, w, state = _setup()
    snap = [a.copy() for a in (w, *state)]
    counts = dict(opt._index_update_count)
    weight, grad, st = make(w, np.ones(3, np.float32), state)
    with pytest.raises(exc, match=shown):
        opt.update(0, weight, grad, st)
    with pytest.raises(exc):
        opt.update_multi_precision(0, weight, grad, st)
    for a, b in zip((w, *state), snap):
        np.testing.assert_array_equal(a, b)
    assert opt._index_update_count == counts and opt.num_update == 1


def test_bad_scheduler_value_rolls_back_the_count():
    rate = {"value": 0.1}
    opt = FTML(lr_scheduler=lambda n: rate["value"])
    w = np.ones(2, np.float32)
    state = opt.create_state(0, w)
    opt.update(0, w, np.ones(2, np.float32), state)
    snap = [a.copy() for a in (w, *state)]
    for bad in (-1.0, float("nan"), float("inf")):
        rate["value"] = bad
        for index in (0, 1):  # an existing index and a new one
            with pytest.raises(ValueError, match="learning rate"):
                opt.update(index, w, np.ones(2, np.float32), state)
            assert opt._index_update_count == {0: 1} and opt.num_update == 1
    for a, b in zip((w, *state), snap):
        np.testing.assert_array_equal(a, b)


def test_multi_precision_bad_state_rejected():
    opt = FTML(multi_precision=True)
    w = np.ones(3, np.float16)
    snap = w.copy()
    with pytest.raises(ValueError, match="master"):
        opt.update_multi_precision(0, w, np.ones(3, np.float16), (np.ones(3, np.float16), (None,) * 3))
    with pytest.raises(ValueError, match="pair"):
        opt.update_multi_precision(0, w, np.ones(3, np.float16), (np.zeros(3, np.float32),) * 3)
    np.testing.assert_array_equal(w, snap)
    assert opt.num_update == 0


def test_checked_rate_helper():
    assert base_mod.checked_rate(0, "x") == 0.0
    with pytest.raises(ValueError, match="x must be >= 0"):
        base_mod.checked_rate(-1e-9, "x")


def test_positional_order_of_the_base_constructor():
    """MXNet 1.9: rescale_grad, param_idx2name, wd, clip_gradient, learning_rate, lr_scheduler, sym,
    begin_num_update, multi_precision, param_dict."""
    opt = Optimizer(0.5, {0: "a_weight"}, 0.1, 2.0, 0.3, None, None, 7, True, None)
    assert (opt.rescale_grad, opt.idx2name, opt.wd, opt.clip_gradient, opt.lr) == (0.5, {0: "a_weight"}, 0.1, 2.0, 0.3)
    assert opt.begin_num_update == opt.num_update == 7 and opt.multi_precision is True
    with pytest.raises(TypeError):
        Optimizer(1.0, None, 0.0, None, 0.1, None, None, 0, False, None, "extra")


def test_idx2name_is_copied_and_param_dict_is_not():
    names, pd = {0: "w_weight"}, {5: SimpleNamespace(lr_mult=1.0, wd_mult=1.0)}
    opt = FTML(param_idx2name=names, param_dict=pd)
    names[1] = "b_bias"
    assert opt.idx2name == {0: "w_weight"}
    pd[0] = SimpleNamespace(lr_mult=0.5, wd_mult=1.0)
    assert opt._get_lr(0) == pytest.approx(0.005)  # the caller's (non-empty) dict is the optimizer's dict


def test_base_optimizer_update_is_abstract_and_state_is_none():
    opt = Optimizer()
    w = np.ones(2)
    assert opt.create_state(0, w) is None
    with pytest.raises(NotImplementedError):
        opt.update(0, w, w.copy(), None)
