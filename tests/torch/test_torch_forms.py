"""The two forms of ``ftmlopt.torch.FTML`` and the problems that made the compact form the default.

Each test here reproduces a measured problem of the three-state default (NaN weights under a compiled
warmup, a step of ~20 after an lr jump, an edit pulled back, 1.5x Adam's memory, unchecked edited
hyper-parameters, float32 state silently kept after ``model.double()``) and checks the behaviour
now: the compact default against an independent float64 recurrence written out here, the MXNet
form (``compact=False``) where its behaviour is the documented difference. Also: lr = 0 on every
path, and checkpoints that cross forms.
"""

from __future__ import annotations

import copy
import re
import warnings
from typing import Any

import numpy as np
import pytest
import torch

import ftmlopt.torch._validation as validation_module
from ftmlopt.torch import FTML

IMPLS = {"forloop": {"foreach": False, "fused": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
FORMS = {"compact": {}, "mxnet": {"compact": False}}


def _compact_reference(w0: np.ndarray, grads: list[np.ndarray], lrs: list[float], *, b1: float = 0.6,
                       b2: float = 0.999, eps: float = 1e-8) -> list[np.ndarray]:
    """The paper's Theorem 1 recurrence in float64, written out independently of ftmlopt."""
    w, v, out = w0.astype(np.float64), np.zeros_like(w0, dtype=np.float64), []
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        v = b2 * v + (1 - b2) * g * g
        w = w - lr * (1 - b1) / (1 - b1**t) * g / (np.sqrt(v / (1 - b2**t)) + eps)
        out.append(w.copy())
    return out


# ----------------------------------------------------------------------------- lr jumps by 1e8
@pytest.mark.parametrize("impl", list(IMPLS))
def test_lr_jump_from_1e_10_to_1e_2_takes_an_lr_sized_step(impl: str) -> None:
    """20 steps at lr 1e-10 then one at 1e-2: the step is ~lr, as the recurrence says (was 21.9)."""
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(100).astype(np.float32)
    grads = [rng.standard_normal(100).astype(np.float32) for _ in range(21)]
    lrs = [1e-10] * 20 + [1e-2]
    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = FTML([p], lr=1e-10, **IMPLS[impl])
    for g, lr in zip(grads, lrs):
        opt.param_groups[0]["lr"] = lr
        before = p.detach().clone()
        p.grad = torch.from_numpy(g.copy())
        opt.step()
    step = (p.detach() - before).abs().max().item()
    expected = _compact_reference(w0, [g.astype(np.float64) for g in grads], lrs)
    assert step < 2e-2  # lr (1-b1)/(1-b1^21) |g|/sqrt(v_hat) is ~lr for any gradient history
    np.testing.assert_allclose(p.detach().numpy(), expected[-1], rtol=1e-6, atol=1e-7)


def test_lr_jump_is_where_the_mxnet_form_cancels() -> None:
    """The documented difference: the MXNet form's d ~ 1/lr makes the same jump a step of order 10."""
    rng = np.random.default_rng(0)
    p = torch.nn.Parameter(torch.from_numpy(rng.standard_normal(100).astype(np.float32)))
    opt = FTML([p], lr=1e-10, compact=False, foreach=False)
    for k in range(21):
        opt.param_groups[0]["lr"] = 1e-10 if k < 20 else 1e-2
        before = p.detach().clone()
        p.grad = torch.from_numpy(rng.standard_normal(100).astype(np.float32))
        opt.step()
    assert (p.detach() - before).abs().max().item() > 1.0


# ----------------------------------------------------------------------------- weights edited outside
def _train_then_zero(form: str, impl: str) -> tuple[torch.nn.Linear, torch.Tensor]:
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 32)
    opt = FTML(layer.parameters(), lr=1e-3, **FORMS[form], **IMPLS[impl])
    x = torch.randn(16, 32)
    for _ in range(30):
        opt.zero_grad()
        layer(x).pow(2).mean().backward()
        opt.step()
    with torch.no_grad():
        layer.weight.zero_()  # a reset: reset_parameters(), pruning, a weight-only restore
    opt.zero_grad()
    layer(x).pow(2).mean().backward()
    grad = layer.weight.grad.clone()
    opt.step()
    return layer, grad


@pytest.mark.parametrize("impl", list(IMPLS))
def test_an_edit_to_the_weights_persists_in_the_compact_form(impl: str) -> None:
    """After zeroing, the next step starts from 0 and moves each weight by at most ~lr (was 0.14)."""
    layer, grad = _train_then_zero("compact", impl)  # the default form
    moved = layer.weight.detach()
    assert moved.abs().max().item() < 5e-3
    nonzero = grad != 0
    assert torch.equal(torch.sign(moved[nonzero]), -torch.sign(grad[nonzero]))  # a descent step from 0


@pytest.mark.parametrize("impl", list(IMPLS))
def test_the_mxnet_form_pulls_an_edit_back(impl: str) -> None:
    """MXNet's three states remember the iterate in z: the zeroed layer jumps back towards it."""
    layer, _ = _train_then_zero("mxnet", impl)
    assert layer.weight.detach().abs().max().item() > 0.05


# ----------------------------------------------------------------------------- memory
def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def test_state_memory_is_half_of_adams() -> None:
    """256x256 linear: Adam keeps 526,336 B of moments; FTML's v is 263,168 B (was 789,504 B)."""
    sizes = {}
    for name, make in (("adam", lambda ps: torch.optim.Adam(ps)), ("ftml", lambda ps: FTML(ps)),
                       ("mxnet", lambda ps: FTML(ps, compact=False))):
        torch.manual_seed(0)
        layer = torch.nn.Linear(256, 256)
        opt = make(layer.parameters())
        layer(torch.randn(4, 256)).sum().backward()
        opt.step()
        steps = sum(s["step"].numel() * s["step"].element_size() for s in opt.state.values())
        sizes[name] = _state_bytes(opt) - steps
    assert sizes == {"adam": 526_336, "ftml": 263_168, "mxnet": 789_504}


# ----------------------------------------------------------------------------- torch.compile + warmup
@pytest.mark.parametrize("form", list(FORMS))
def test_compiled_step_tensor_lr_warmup_from_zero(form: str) -> None:
    """torch's recipe: ``lr=torch.tensor(...)``, a warmup from 0, ``torch.compile(opt.step)`` (was NaN)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    w0 = [torch.randn(4, 8), torch.randn(4)]
    runs = []
    for compiled in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in w0]
        opt = FTML(params, lr=torch.tensor(1e-2), foreach=False, **FORMS[form])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, k / 3))
        step = torch.compile(opt.step) if compiled else opt.step
        for k in range(5):
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * k + i))
            step()
            if k == 0:  # lr was 0: no step
                assert all(torch.equal(p.detach(), t) for p, t in zip(params, w0))
            sched.step()
        runs.append((params, opt))
    (pe, oe), (pc, oc) = runs
    for a, b in zip(pe, pc):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-5, atol=1e-6)
        assert oc.state[b]["step"].item() == oe.state[a]["step"].item() == 5  # lr 0 counts (rule.py)


# ----------------------------------------------------------------------------- lr = 0 everywhere
def _lr_zero_run(impl: dict[str, Any], form: str, lr: Any, capturable: bool = False) -> tuple[list, list, FTML]:
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(3, 2, dtype=torch.float64)), torch.nn.Parameter(torch.randn(2))]
    opt = FTML(params, lr=lr, capturable=capturable, weight_decay=0.1, decoupled_weight_decay=True,
               **impl, **FORMS[form])
    before = [p.detach().clone() for p in params]
    for k in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(k))
        opt.step()
    return params, before, opt


def _assert_no_step(params: list, before: list, opt: FTML, form: str) -> None:
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
        state = opt.state[p]
        # both forms: v and step advance, as Adam's state does at lr 0; the MXNet form keeps d = z = 0
        assert state["step"].item() == 3 and state["v"].gt(0).all()
        if form != "compact":
            assert not state["d"].any() and not state["z"].any()


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize(
    ("impl", "lr_kind"),  # a tensor lr on foreach needs capturable: test_lr_zero_capturable
    [("forloop", "float"), ("foreach", "float"), ("fused", "float"), ("forloop", "tensor"), ("fused", "tensor")],
)
def test_lr_zero_is_no_step(impl: str, form: str, lr_kind: str) -> None:
    lr = 0.0 if lr_kind == "float" else torch.tensor(0.0)
    _assert_no_step(*_lr_zero_run(IMPLS[impl], form, lr), form=form)


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("impl", ["forloop", "foreach"])
def test_lr_zero_capturable(monkeypatch: pytest.MonkeyPatch, impl: str, form: str) -> None:
    """The capturable branch (tensor math, a tensor lr masked without a host sync), run on the CPU."""
    monkeypatch.setattr(validation_module, "_get_capturable_supported_devices", lambda *a, **k: ["cpu"])
    _assert_no_step(*_lr_zero_run(IMPLS[impl], form, torch.tensor(0.0), capturable=True), form=form)


@pytest.mark.parametrize("foreach", [False, True], ids=["forloop", "foreach"])
@pytest.mark.parametrize("form", list(FORMS))
def test_lr_zero_compiled_fullgraph(form: str, foreach: bool) -> None:
    """The functional step compiles without graph breaks (``FTML.step`` itself breaks in torch's
    ``_use_grad`` wrapper, as every torch optimizer's does); a tensor lr of 0 is masked in the graph."""
    from ftmlopt.torch.functional import ftml

    torch._dynamo.reset()
    compact = form == "compact"
    w, g, v, step = torch.randn(3, 2), torch.randn(3, 2), torch.zeros(3, 2), torch.tensor(0.0)
    ds, zs = ([], []) if compact else ([torch.zeros(3, 2)], [torch.zeros(3, 2)])
    lr = torch.tensor(0.0)
    before = w.clone()

    def run() -> None:
        ftml([w], [g], ds, [v], zs, [step], foreach=foreach, capturable=foreach, lr=lr, beta1=0.6, beta2=0.999,
             eps=1e-8, compact=compact)

    compiled = torch.compile(run, fullgraph=True)
    compiled()
    compiled()
    assert torch.equal(w, before)
    assert step.item() == 2 and v.gt(0).all()  # both forms count the step and fold g into v
    if not compact:
        assert not ds[0].any() and not zs[0].any()


def test_differentiable_mxnet_form_at_tensor_lr_zero_has_finite_gradients() -> None:
    p = torch.randn(4, dtype=torch.float64, requires_grad=True)
    w = p.clone()
    w.grad = torch.rand(4, dtype=torch.float64) + 0.5
    lr = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    opt = FTML([w], lr=lr, compact=False, differentiable=True)
    opt.step()
    g_p, g_lr = torch.autograd.grad(w.sum(), (p, lr))
    assert torch.equal(w.detach(), p.detach()) and torch.isfinite(g_lr) and torch.equal(g_p, torch.ones(4).double())


# ----------------------------------------------------------------------------- checks at step time
@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("betas", (1.5, 0.999), r"^Invalid beta parameter at index 0: 1\.5 \(param group 1, checked at step time\)$"),
        ("eps", -1, r"^Invalid epsilon value: -1 \(param group 1"),
        ("weight_decay", -0.5, r"^Invalid weight_decay value: -0\.5 \(param group 1"),
        ("clip_gradient", 0.0, r"^Invalid clip_gradient value: 0\.0"),
        ("lr", float("nan"), r"^Invalid learning rate: nan \(param group 1"),
        ("lr", torch.tensor(-1.0), r"^Invalid learning rate: -1\.0 \(param group 1"),
    ],
)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_hyperparameters_edited_by_hand_are_checked_before_anything_moves(
    impl: str, key: str, value: Any, message: str
) -> None:
    torch.manual_seed(2)
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = FTML([{"params": [a]}, {"params": [b]}], lr=0.01, **IMPLS[impl])
    for p in (a, b):
        p.grad = torch.randn(3)
    opt.step()
    snapshot = copy.deepcopy((a.detach(), b.detach(), dict(opt.state[a]), dict(opt.state[b])))
    opt.param_groups[1][key] = value
    with pytest.raises(ValueError, match=message):
        opt.step()
    after = (a.detach(), b.detach(), dict(opt.state[a]), dict(opt.state[b]))
    assert torch.equal(after[0], snapshot[0]) and torch.equal(after[1], snapshot[1])  # group 0 did not step either
    for got, want in ((after[2], snapshot[2]), (after[3], snapshot[3])):
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_lr_zero_at_construction_is_allowed_like_adam() -> None:
    p = torch.nn.Parameter(torch.randn(2))
    assert FTML([p], lr=0.0).param_groups[0]["lr"] == 0.0
    assert torch.optim.Adam([p], lr=0.0).param_groups[0]["lr"] == 0.0


# ----------------------------------------------------------------------------- model.double()
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_param_dtype_changed_after_state_is_a_clear_error(impl: str, form: str) -> None:
    """Adam fails inside an op ("expected dtype float for `end`"); FTML names the cause, changes nothing,
    and ``load_state_dict(state_dict())`` (which casts state to the params' dtypes) is the fix."""
    torch.manual_seed(3)
    model = torch.nn.Linear(3, 2)
    opt = FTML(model.parameters(), lr=0.01, **IMPLS[impl], **FORMS[form])
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    model.double()
    opt.zero_grad()
    model(torch.ones(1, 3, dtype=torch.float64)).sum().backward()
    before = model.weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"FTML state 'v' is torch.float32 but this torch.float64 parameter"):
        opt.step()
    assert torch.equal(model.weight.detach(), before) and opt.state[model.weight]["step"].item() == 1
    opt.load_state_dict(opt.state_dict())
    opt.step()
    assert opt.state[model.weight]["v"].dtype == torch.float64 and opt.state[model.weight]["step"].item() == 2
    assert not torch.equal(model.weight.detach(), before)


# ----------------------------------------------------------------------------- checkpoints across forms
def _run(opt: FTML, params: list[torch.nn.Parameter], seeds: range) -> None:
    for k in seeds:
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(100 * k + i))
        opt.step()


@pytest.mark.parametrize(("saved", "loaded"), [("mxnet", "compact"), ("compact", "mxnet")])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_checkpoint_of_the_other_form_is_converted(impl: str, saved: str, loaded: str) -> None:
    """A checkpoint loads into the other form with a warning; training continues on the same trajectory
    (Theorem 1: the forms agree while only the optimizer writes the weights; float64 here)."""
    torch.manual_seed(4)
    w0 = [torch.randn(4, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    hyper = {"lr": 0.02, "weight_decay": 0.05}
    straight = [torch.nn.Parameter(t.clone()) for t in w0]
    ref = FTML(straight, **hyper, **IMPLS[impl], **FORMS[saved])
    _run(ref, straight, range(8))

    first = [torch.nn.Parameter(t.clone()) for t in w0]
    opt1 = FTML(first, **hyper, **IMPLS[impl], **FORMS[saved])
    _run(opt1, first, range(4))
    sd = copy.deepcopy(opt1.state_dict())
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt2 = FTML(resumed, **hyper, **IMPLS[impl], **FORMS[loaded])
    with pytest.warns(UserWarning, match="converted to this optimizer's form"):
        opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["compact"] is (loaded == "compact")
    for p, q in zip(first, resumed):
        state = opt2.state[q]
        assert sorted(state) == (["step", "v"] if loaded == "compact" else ["d", "step", "v", "z"])
        assert torch.equal(state["v"], opt1.state[p]["v"]) and state["step"].item() == 4
        if loaded == "mxnet":  # w = -z/d holds for the rebuilt state
            torch.testing.assert_close(-state["z"] / state["d"], q.detach(), rtol=1e-14, atol=0.0)
    _run(opt2, resumed, range(4, 8))
    for a, b in zip(straight, resumed):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-10, atol=1e-12)


def test_checkpoint_of_the_same_form_loads_without_warning() -> None:
    p = torch.nn.Parameter(torch.randn(3))
    for kwargs in ({}, {"compact": False}):
        opt = FTML([p], **kwargs)
        _run(opt, [p], range(2))
        sd = opt.state_dict()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            FTML([p], **kwargs).load_state_dict(sd)


def test_state_dict_is_deterministic_and_round_trips() -> None:
    torch.manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(2, 2)), torch.nn.Parameter(torch.randn(2))]
    opt = FTML([{"params": params[:1]}, {"params": params[1:], "compact": False, "lr": 0.1}])
    _run(opt, params, range(3))
    one, two = opt.state_dict(), opt.state_dict()
    assert one["param_groups"] == two["param_groups"]
    assert one["state"].keys() == two["state"].keys()
    for k in one["state"]:
        assert sorted(one["state"][k]) == sorted(two["state"][k])
        assert all(torch.equal(one["state"][k][n], two["state"][k][n]) for n in one["state"][k])
    again = FTML([{"params": params[:1]}, {"params": params[1:], "compact": False, "lr": 0.1}])
    again.load_state_dict(copy.deepcopy(one))
    three = again.state_dict()
    assert three["param_groups"] == one["param_groups"]
    for k in one["state"]:
        assert all(torch.equal(three["state"][k][n], one["state"][k][n]) for n in one["state"][k])


def test_switching_a_group_to_the_mxnet_form_by_hand_is_refused_before_anything_moves() -> None:
    p = torch.nn.Parameter(torch.randn(3))
    opt = FTML([p])
    _run(opt, [p], range(1))
    opt.param_groups[0]["compact"] = False
    before = p.detach().clone()
    p.grad = torch.randn(3)
    with pytest.raises(RuntimeError, match="created with compact=True"):
        opt.step()
    assert torch.equal(p.detach(), before) and opt.state[p]["step"].item() == 1


# ----------------------------------------------------------------------------- state dtype of half params
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_half_params_get_float32_state_by_default(impl: str, form: str) -> None:
    """bfloat16 state cannot hold FTML's second moment: ``0.999 * v`` rounds back to ``v`` (bfloat16 has
    8 significant bits), so ``v`` never decays. The default state of half params is float32
    (``ftmlopt.rule.state_dtype``); ``state_dtype=torch.bfloat16`` asks for the low-precision state."""
    decays = {}
    for state_dtype in (None, torch.bfloat16):
        p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
        opt = FTML([p], lr=1e-3, state_dtype=state_dtype, **IMPLS[impl], **FORMS[form])
        p.grad = torch.ones(4, dtype=torch.bfloat16)
        opt.step()
        v1 = opt.state[p]["v"].double().clone()
        for _ in range(10):
            p.grad = torch.zeros(4, dtype=torch.bfloat16)
            opt.step()
        state = opt.state[p]
        assert all(state[k].dtype == (state_dtype or torch.float32) for k in state if k != "step")
        decays[state_dtype] = (state["v"].double() / v1).max().item()
    assert decays[None] == pytest.approx(0.999**10, rel=1e-6)  # float32 state decays as it should
    assert decays[torch.bfloat16] == 1.0  # the bfloat16 state is stuck


@pytest.mark.parametrize("impl", list(IMPLS))
def test_float32_state_of_half_params_survives_a_checkpoint(impl: str) -> None:
    """torch's loader would cast the state to the param's bfloat16; it is kept float32, bit for bit."""
    torch.manual_seed(7)
    p = torch.nn.Parameter(torch.randn(6).bfloat16())
    opt = FTML([p], **IMPLS[impl])
    _run(opt, [p], range(3))
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["v"] = sd["state"][0]["v"] + 1e-7  # not representable in bfloat16 next to v
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = FTML([q], **IMPLS[impl])
    opt2.load_state_dict(sd)
    assert opt2.state[q]["v"].dtype == torch.float32 and torch.equal(opt2.state[q]["v"], sd["state"][0]["v"])
    # A checkpoint of the previous release (bfloat16 state, no state_dtype flag) is widened to float32.
    sd_old = copy.deepcopy(opt.state_dict())
    sd_old["state"][0]["v"] = sd_old["state"][0]["v"].bfloat16()
    del sd_old["param_groups"][0]["state_dtype"]
    opt3 = FTML([q], **IMPLS[impl])
    opt3.load_state_dict(sd_old)
    assert opt3.state[q]["v"].dtype == torch.float32
    assert torch.equal(opt3.state[q]["v"], sd_old["state"][0]["v"].float())


@pytest.mark.parametrize("bad", [torch.int64, torch.complex64, "float32", 32])
def test_state_dtype_must_be_a_floating_torch_dtype(bad: Any) -> None:
    with pytest.raises(TypeError, match=rf"^Invalid state_dtype: {re.escape(repr(bad))} "):
        FTML([torch.nn.Parameter(torch.zeros(2))], state_dtype=bad)
