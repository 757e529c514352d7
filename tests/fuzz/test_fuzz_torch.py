"""Property-based fuzzing of ``ftmlopt.torch.FTML``: construction, param groups, non-finite gradients,
``GradScaler``, foreign or damaged state dicts, dtypes and devices.

Contract: bad input raises ``TypeError``/``ValueError``/``RuntimeError`` naming what is wrong, before
any parameter or state tensor changes; non-finite gradients propagate element-wise on every
implementation (for-loop, foreach, fused) unless ``GradScaler`` skips the step, in which case
nothing changes at all.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from _bad_values import bad_flag, bad_learning_rate, bad_nonnegative, bad_unit, non_finite, not_real
from hypothesis import given, settings
from hypothesis import strategies as st

from ftmlopt.torch import FTML

FUZZ = settings(max_examples=30, deadline=None)
IMPLS = {"loop": {"foreach": False, "fused": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def _params(seed: int, dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(3, 2, generator=gen, dtype=dtype)),
            torch.nn.Parameter(torch.randn(5, generator=gen, dtype=dtype))]


def _set_grads(params: list[torch.Tensor], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def _fingerprint(params: list[torch.Tensor], opt: torch.optim.Optimizer) -> tuple:
    state = {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
             for i, p in enumerate(params)}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return [p.detach().clone() for p in params], state, copy.deepcopy(groups)


def _same(a: tuple, b: tuple) -> bool:
    pa, sa, ga = a
    pb, sb, gb = b
    if ga != gb or sa.keys() != sb.keys() or any(not torch.equal(x, y) for x, y in zip(pa, pb)):
        return False
    for i in sa:
        if sa[i].keys() != sb[i].keys():
            return False
        for k in sa[i]:
            x, y = sa[i][k], sb[i][k]
            if torch.is_tensor(x) != torch.is_tensor(y) or (torch.is_tensor(x) and not torch.equal(x, y)):
                return False
    return True


def _stepped(impl: str, seed: int = 0, **kw: Any) -> tuple[list[torch.nn.Parameter], FTML]:
    params = _params(seed)
    opt = FTML(params, lr=0.05, **IMPLS[impl], **kw)
    for s in range(2):
        _set_grads(params, seed + 10 * s)
        opt.step()
    return params, opt


# --------------------------------------------------------------------------- construction
CTOR = {
    "lr": (bad_learning_rate, "learning rate"),
    "eps": (bad_nonnegative, "eps"),
    "weight_decay": (bad_nonnegative, "weight_decay"),
    "clip_gradient": (not_real | non_finite | st.floats(max_value=0.0, allow_nan=False), "clip_gradient"),
    "beta1": (bad_unit, "beta"),
    "beta2": (bad_unit, "beta"),
    "compact": (bad_flag, "compact"),
    "decoupled_weight_decay": (bad_flag, "decoupled_weight_decay"),
    "maximize": (bad_flag, "maximize"),
    "multi_precision": (bad_flag, "multi_precision"),
    "state_dtype": (st.sampled_from([torch.int64, torch.bool, torch.complex64, "float32", 32, True]), "state_dtype"),
}


def _kwargs(name: str, bad: Any) -> dict[str, Any]:
    if name == "beta1":
        return {"betas": (bad, 0.999)}
    if name == "beta2":
        return {"betas": (0.6, bad)}
    return {name: bad}


@FUZZ
@given(data=st.data(), name=st.sampled_from(list(CTOR)))
def test_constructor_rejects_bad_hyperparameters(data: st.DataObject, name: str) -> None:
    strategy, mention = CTOR[name]
    bad = data.draw(strategy)
    if name == "clip_gradient" and bad is None:
        return  # None means "off"
    with pytest.raises((TypeError, ValueError)) as info:
        FTML(_params(0), **_kwargs(name, bad))
    assert mention in str(info.value) or (mention == "eps" and "epsilon" in str(info.value)), str(info.value)


@FUZZ
@given(data=st.data(), name=st.sampled_from(list(CTOR)), impl=st.sampled_from(list(IMPLS)))
def test_add_param_group_rejects_bad_values_without_change(data: st.DataObject, name: str, impl: str) -> None:
    strategy, _ = CTOR[name]
    bad = data.draw(strategy)
    if name == "clip_gradient" and bad is None:
        return
    params, opt = _stepped(impl)
    before = _fingerprint(params, opt)
    with pytest.raises((TypeError, ValueError)):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], **_kwargs(name, bad)})
    assert len(opt.param_groups) == 1 and _same(_fingerprint(params, opt), before)


#: The numeric hyper-parameters, which are checked again at step time (a hand edit of ``param_groups``).
NUMERIC = ["lr", "eps", "weight_decay", "clip_gradient", "beta1", "beta2"]


@FUZZ
@given(data=st.data(), name=st.sampled_from(NUMERIC), impl=st.sampled_from(list(IMPLS)),
       compact=st.booleans())
def test_bad_values_edited_into_param_groups_are_refused_at_step(
    data: st.DataObject, name: str, impl: str, compact: bool
) -> None:
    strategy, mention = CTOR[name]
    bad = data.draw(strategy)
    if name == "clip_gradient" and bad is None:
        return
    params, opt = _stepped(impl, compact=compact)
    opt.param_groups[0].update(_kwargs(name, bad))
    _set_grads(params, 5)
    before = _fingerprint(params, opt)
    with pytest.raises((TypeError, ValueError)) as info:
        opt.step()
    assert mention in str(info.value) or (mention == "eps" and "epsilon" in str(info.value)), str(info.value)
    after = _fingerprint(params, opt)
    assert _same((*after[:2], []), (*before[:2], []))  # params and state (a deep copy of object() is another one)


@FUZZ
@given(fused=st.booleans(), foreach=st.booleans())
def test_fused_and_foreach_together_are_refused(fused: bool, foreach: bool) -> None:
    if fused and foreach:
        with pytest.raises(RuntimeError, match="fused"):
            FTML(_params(0), fused=fused, foreach=foreach)
    else:
        FTML(_params(0), fused=fused, foreach=foreach)


# --------------------------------------------------------------------------- non-finite gradients
@FUZZ
@given(
    seed=st.integers(0, 2**16),
    mask_bits=st.lists(st.booleans(), min_size=6, max_size=6).filter(any),
    bad=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    impl=st.sampled_from(list(IMPLS)),
    extra=st.sampled_from(
        [
            {},
            {"weight_decay": 0.01},
            {"compact": False},
            {"compact": False, "weight_decay": 0.1, "decoupled_weight_decay": True},
            {"maximize": True},
            {"weight_decay": 0.1, "decoupled_weight_decay": True},
        ]
    ),
)
def test_nonfinite_gradients_propagate_elementwise(seed, mask_bits, bad, impl, extra) -> None:
    """Every implementation lets NaN/Inf reach exactly the elements whose gradient had them."""
    mask = torch.tensor(mask_bits).reshape(3, 2)
    runs = []
    for replace in (False, True):
        params, opt = _stepped(impl, seed, **extra)
        _set_grads(params, seed + 99)
        g = params[0].grad
        if replace:
            g[mask] = 0.0
        else:
            g[mask] = bad
        opt.step()
        runs.append((params, opt))
    (bad_p, bad_o), (ok_p, ok_o) = runs
    assert torch.equal(bad_p[0][~mask], ok_p[0][~mask])
    assert torch.equal(bad_p[1], ok_p[1])  # the other parameter is untouched by the first one's NaNs
    assert not torch.isfinite(bad_p[0][mask]).any(), "a non-finite gradient was hidden"
    for key in bad_o.state[bad_p[0]]:
        if key != "step":
            assert torch.equal(bad_o.state[bad_p[0]][key][~mask], ok_o.state[ok_p[0]][key][~mask])


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_grad_scaler_skips_the_whole_step(impl: str, bad: float) -> None:
    """With ``GradScaler`` an inf/NaN gradient skips the step: parameters, state and counts unchanged.

    The fused path takes GradScaler's fused protocol (``grad_scale``/``found_inf`` handed to the
    kernel); the others are unscaled and skipped by the scaler itself.
    """
    params, opt = _stepped(impl)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    before = _fingerprint(params, opt)
    loss = (params[0] * torch.tensor([[1.0, bad], [1.0, 1.0], [1.0, 1.0]])).sum() + params[1].sum()
    opt.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert _same(_fingerprint(params, opt), before)
    assert scaler.get_scale() < 2.0**8
    assert getattr(opt, "_step_supports_amp_scaling", False) == (impl == "fused")

    # A finite gradient afterwards steps normally (and equals the same step taken without a scaler).
    ref_params, ref_opt = _stepped(impl)
    for p, q in ((params, opt), (ref_params, ref_opt)):
        q.zero_grad()
        loss = (p[0] ** 2).sum() + p[1].sum()
        (scaler.scale(loss) if q is opt else loss).backward()
        scaler.step(q) if q is opt else q.step()
    scaler.update()
    for a, b in zip(params, ref_params):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- state dicts
def _adam_state_dict() -> dict[str, Any]:
    params = _params(3)
    adam = torch.optim.Adam(params, lr=0.01)
    _set_grads(params, 3)
    adam.step()
    return adam.state_dict()


def _corrupt(sd: dict[str, Any], case: str) -> dict[str, Any]:
    sd = copy.deepcopy(sd)
    st0 = sd["state"][0]
    if case == "adam":
        return _adam_state_dict()
    if case == "missing_v":
        del st0["v"]
    elif case == "missing_d":
        del st0["d"]
    elif case == "missing_step":
        del st0["step"]
    elif case == "extra_key":
        st0["exp_avg"] = torch.zeros(3, 2)
    elif case == "misshaped_d":
        st0["d"] = torch.zeros(5)
    elif case == "misshaped_z_numel":
        st0["z"] = torch.zeros(2, 3)
    elif case == "compact_with_d":
        st0["d"] = torch.zeros(3, 2)
    elif case == "not_a_tensor":
        st0["v"] = [0.0] * 6
    elif case == "group_count":
        sd["param_groups"] = sd["param_groups"] * 2
    elif case == "group_size":
        sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:1]
    elif case == "nan_lr":
        sd["param_groups"][0]["lr"] = float("nan")
    elif case == "beta_one":
        sd["param_groups"][0]["betas"] = (1.0, 0.999)
    elif case == "negative_step":
        st0["step"] = torch.tensor(-2.0)
    return sd


COMMON_CASES = ["adam", "missing_v", "missing_step", "extra_key", "not_a_tensor", "group_count", "group_size",
                "nan_lr", "beta_one", "negative_step"]
#: (case, compact): the MXNet form's d and z, and a compact checkpoint that carries them anyway
STATE_CASES = [(c, compact) for c in COMMON_CASES for compact in (True, False)] + [
    ("missing_d", False), ("misshaped_d", False), ("misshaped_z_numel", False), ("compact_with_d", True),
]


@pytest.mark.parametrize(("case", "compact"), STATE_CASES)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_bad_state_dict_is_refused_before_anything_changes(case: str, compact: bool, impl: str) -> None:
    params, opt = _stepped(impl, compact=compact)
    sd = _corrupt(opt.state_dict(), case)
    before = _fingerprint(params, opt)
    with pytest.raises((TypeError, ValueError, KeyError)):
        opt.load_state_dict(sd)
    assert _same(_fingerprint(params, opt), before)


@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_good_state_dict_round_trips(impl: str, compact: bool) -> None:
    """The control for the test above: an untouched state dict loads and continues identically."""
    params, opt = _stepped(impl, compact=compact)
    sd = copy.deepcopy(opt.state_dict())
    params2, opt2 = _stepped(impl, seed=5, compact=compact)
    with torch.no_grad():
        for a, b in zip(params2, params):
            a.copy_(b)
    opt2.load_state_dict(sd)
    for p in (params, params2):
        _set_grads(p, 77)
    opt.step()
    opt2.step()
    assert all(torch.equal(a, b) for a, b in zip(params, params2))


# --------------------------------------------------------------------------- dtypes and devices
@pytest.mark.parametrize("impl", list(IMPLS))
def test_integer_parameters_are_refused_before_state_is_created(impl: str) -> None:
    x = torch.zeros(3, dtype=torch.int64)
    opt = FTML([x], **IMPLS[impl])
    x.grad = torch.ones(3, dtype=torch.int64)
    with pytest.raises(TypeError, match="int64"):
        opt.step()
    assert len(opt.state) == 0 and torch.equal(x, torch.zeros(3, dtype=torch.int64))


def test_fused_refuses_devices_without_a_kernel() -> None:
    p = torch.nn.Parameter(torch.zeros(3, device="meta"))
    opt = FTML([p], fused=True)
    p.grad = torch.ones(3, device="meta")
    with pytest.raises(RuntimeError, match="meta"):
        opt.step()
    assert all(len(s) == 0 for s in opt.state.values())


@FUZZ
@given(seed=st.integers(0, 2**16), dtypes=st.lists(st.sampled_from([torch.float32, torch.float64]), min_size=2,
                                                   max_size=2))
def test_mixed_dtypes_step_each_group_like_alone(seed: int, dtypes: list[torch.dtype]) -> None:
    """Params of several dtypes in one group: each steps exactly as it would alone (per-dtype groups)."""
    gen = torch.Generator().manual_seed(seed)
    values = [torch.randn(4, generator=gen, dtype=dt) for dt in dtypes]
    grads = [torch.randn(4, generator=gen, dtype=dt) for dt in dtypes]
    for impl in IMPLS:
        together = [torch.nn.Parameter(v.clone()) for v in values]
        opt = FTML(together, lr=0.1, **IMPLS[impl])
        for p, g in zip(together, grads):
            p.grad = g.clone()
        opt.step()
        for v, g, p in zip(values, grads, together):
            alone = torch.nn.Parameter(v.clone())
            o = FTML([alone], lr=0.1, **IMPLS[impl])
            alone.grad = g.clone()
            o.step()
            assert p.dtype == alone.dtype and torch.equal(p, alone)
