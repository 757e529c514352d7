"""Generic test bodies run over the table in ``_torch_optim_table.py`` (torch's ``TestOptimRenewed`` idea).

Every fast implementation is compared with the for-loop at every step, state included; the for-loop
itself is checked against the independent references in ``test_torch_parity.py``.
"""

from __future__ import annotations

import copy
import io
import warnings
from typing import Any

import pytest
import torch
from _torch_optim_table import FTML_INFO, OptimInput

from ftmlopt.torch import FTML

INFO = FTML_INFO
DTYPES = list(INFO.tolerances)
IMPL_KWARGS = {"forloop": {"foreach": False, "fused": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def _kwargs(inp: OptimInput, impl: str) -> dict[str, Any]:
    kwargs = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inp.kwargs.items()}
    return {**kwargs, **IMPL_KWARGS[impl]}


def _mlp(dtype: torch.dtype) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """torch's comparison model: a 2-3-1 MLP, plus a 0-dim and a non-contiguous parameter."""
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1), torch.nn.Sigmoid())
    model.to(dtype)
    scalar = torch.nn.Parameter(torch.tensor(0.7, dtype=dtype))
    noncontig = torch.nn.Parameter(torch.randn(4, 3, dtype=dtype).t())  # a transposed view: strides (1, 3)
    assert not noncontig.is_contiguous()
    return model, [*model.parameters(), scalar, noncontig]


def _run_trajectory(inp: OptimInput, impl: str, dtype: torch.dtype, iterations: int = 7) -> list[list[torch.Tensor]]:
    """Snapshots (params then every state tensor) after each step of torch's comparison schedule."""
    model, params = _mlp(dtype)
    scalar, noncontig = params[-2:]
    opt = FTML(params, **_kwargs(inp, impl))
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(3)).to(dtype)
    snapshots = []
    for i in range(iterations):
        opt.zero_grad(set_to_none=True)
        if i == 3:  # a frozen layer: no grad, so the step must leave it and its state alone
            model[2].requires_grad_(False)
        if i == 5:
            model[2].requires_grad_(True)
        if i != 2:  # iteration 2 skips backward: a step with no gradients is a no-op
            loss = model(x).sum() + (scalar * 1.5).sin() + (noncontig**2).sum() * 0.1
            loss.backward()
        opt.step()
        snap = [p.detach().clone() for p in params]
        for p in params:
            state = opt.state.get(p, {})
            snap += [state[k].detach().clone() for k in sorted(state)]
        snapshots.append(snap)
    return snapshots


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("inp", "impl"),
    [(inp, impl) for inp in INFO.inputs for impl in INFO.fast_impls if impl in inp.impls],
    ids=lambda x: repr(x) if isinstance(x, OptimInput) else x,
)
def test_impl_matches_forloop(inp: OptimInput, impl: str, dtype: torch.dtype) -> None:
    rtol, atol = INFO.tolerances[dtype]
    ref = _run_trajectory(inp, "forloop", dtype)
    got = _run_trajectory(inp, impl, dtype)
    for step, (a, b) in enumerate(zip(ref, got)):
        assert len(a) == len(b), f"step {step}: different state keys"
        for i, (x, y) in enumerate(zip(a, b)):
            assert x.dtype == y.dtype and x.device == y.device and x.shape == y.shape
            torch.testing.assert_close(y, x, rtol=rtol, atol=atol, msg=lambda m, s=step, i=i: f"step {s} t{i}: {m}")


def test_foreach_is_bitwise_forloop_on_cpu() -> None:
    """On the CPU foreach runs the for-loop's ops in the same order, so it rounds identically."""
    for inp in INFO.inputs:
        if "foreach" in inp.impls:
            ref, got = _run_trajectory(inp, "forloop", torch.float32), _run_trajectory(inp, "foreach", torch.float32)
            for a, b in zip(ref, got):
                assert all(torch.equal(x, y) for x, y in zip(a, b)), inp.desc


def test_frozen_params_keep_state_untouched() -> None:
    model, params = _mlp(torch.float64)
    opt = FTML(params, lr=0.01)
    model(torch.ones(1, 2, dtype=torch.float64)).sum().backward()
    opt.step()
    frozen = model[2].weight
    before = frozen.detach().clone(), {k: v.clone() for k, v in opt.state[frozen].items()}
    model[2].requires_grad_(False)
    opt.zero_grad()
    model(torch.ones(1, 2, dtype=torch.float64)).sum().backward()
    opt.step()
    assert torch.equal(frozen, before[0])
    assert all(torch.equal(opt.state[frozen][k], v) for k, v in before[1].items())
    assert opt.state[model[0].weight]["step"].item() == 2.0


# ------------------------------------------------------------------------- the loss goes down
def _regression(dtype: torch.dtype = torch.float32, contiguous: bool = True) -> tuple[list[torch.Tensor], Any]:
    torch.manual_seed(0)
    weight = torch.randn(10, 5, dtype=dtype)
    if not contiguous:
        weight = torch.randn(5, 10, dtype=dtype).t()
    weight.requires_grad_()
    bias = torch.randn(10, dtype=dtype, requires_grad=True)
    x = torch.randn(5, dtype=dtype)

    def loss_fn() -> torch.Tensor:
        return (weight.mv(x) + bias).pow(2).sum()

    return [weight, bias], loss_fn


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("inp", INFO.inputs, ids=repr)
def test_forloop_goes_right_direction(inp: OptimInput, contiguous: bool) -> None:
    params, loss_fn = _regression(contiguous=contiguous)
    opt = FTML(params, **_kwargs(inp, "forloop"))
    initial = loss_fn().item()
    for _ in range(20):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    final = loss_fn().item()
    if inp.kwargs.get("maximize"):
        assert final > initial
    else:
        assert final < initial


@pytest.mark.parametrize("name_sched", INFO.schedulers, ids=lambda s: s[0])
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_schedulers_goes_right_direction(name_sched: tuple[str, Any], tensor_lr: bool) -> None:
    _, make = name_sched
    params, loss_fn = _regression()
    lr = torch.tensor(0.05) if tensor_lr else 0.05
    opt = FTML([{"params": params[:1]}, {"params": params[1:], "lr": 0.02, "weight_decay": 0.01}], lr=lr)
    sched = make(opt)
    initial = loss_fn().item()
    lrs = []
    for _ in range(20):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        sched.step()
        lrs.append(float(opt.param_groups[0]["lr"]))
    assert loss_fn().item() < initial
    assert len(set(lrs)) > 1, "the scheduler did not change lr"
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) == tensor_lr


def test_param_groups_weight_decay_and_lr() -> None:
    params, loss_fn = _regression()
    opt = FTML([{"params": params[:1], "weight_decay": 0.01}, {"params": params[1:], "lr": 0.05}], lr=0.02)
    initial = loss_fn().item()
    for _ in range(20):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    assert loss_fn().item() < initial


@pytest.mark.parametrize("impl", ["forloop", "foreach", "fused"])
@pytest.mark.parametrize("compact", [False, True])
def test_group_with_tiny_lr_does_not_move(impl: str, compact: bool) -> None:
    params, loss_fn = _regression()
    frozen_before = params[1].detach().clone()
    moving_before = params[0].detach().clone()
    opt = FTML([{"params": params[:1]}, {"params": params[1:], "lr": 1e-28}], lr=0.01, compact=compact,
               **IMPL_KWARGS[impl])
    for _ in range(5):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    # The three-state form rebuilds w = -z/d with d ~ 1e28: w comes back within float32 rounding.
    torch.testing.assert_close(params[1].detach(), frozen_before, rtol=2e-7, atol=0.0)
    assert (params[0].detach() - moving_before).abs().max() > 1e-3


@pytest.mark.parametrize("impl", ["forloop", "foreach", "fused"])
def test_params_without_grad_untouched_and_stateless(impl: str) -> None:
    a = torch.nn.Parameter(torch.randn(3))
    b = torch.nn.Parameter(torch.randn(3))
    b_before = b.detach().clone()
    opt = FTML([a, b], lr=0.1, **IMPL_KWARGS[impl])
    for _ in range(3):
        a.grad = torch.randn(3)
        opt.step()
    assert torch.equal(b, b_before)
    assert b not in opt.state and sorted(opt.state[a]) == sorted(INFO.state_keys)


@pytest.mark.parametrize("impl", ["forloop", "foreach", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_zero_gradient_keeps_the_weight_exactly_in_the_compact_form(impl: str, dtype: torch.dtype) -> None:
    """g = 0 from the start: v = 0 and the step is 0 * step_size / eps = 0, exactly, in every dtype.

    float16: in float16 arithmetic eps = 1e-8 underflows to 0 and the step would be 0/0 = NaN; the
    step is computed in float32.
    """
    p = torch.nn.Parameter(torch.randn(5).to(dtype))
    before = p.detach().clone()
    opt = FTML([p], **IMPL_KWARGS[impl])
    for _ in range(3):
        p.grad = torch.zeros_like(p)
        opt.step()
    assert torch.equal(p.detach(), before)


def test_zero_gradient_keeps_the_weight_in_the_mxnet_form() -> None:
    """With g = 0 from the start, v = 0 and d = eps (1-b1^t)/lr: w = -z/d comes back to w within rounding.

    float16 params get float32 state by default; a float16 *state* (``state_dtype=torch.float16``) holds
    d ~ 1e-6 as a subnormal with few bits: the weight drifts by a few percent, but stays finite.
    """
    cases = ((torch.float32, {}, 1e-6), (torch.float16, {"multi_precision": True}, 1e-3), (torch.float16, {}, 1e-3),
             (torch.float16, {"state_dtype": torch.float16}, None))
    for dtype, kwargs, rtol in cases:
        p = torch.nn.Parameter(torch.randn(5).to(dtype))
        before = p.detach().clone()
        opt = FTML([p], compact=False, **kwargs)
        for _ in range(3):
            p.grad = torch.zeros_like(p)
            opt.step()
        assert torch.isfinite(p).all(), dtype
        if rtol is not None:
            torch.testing.assert_close(p.detach(), before, rtol=rtol, atol=0.0)


# ------------------------------------------------------------------------- complex, tensor lr, closure
@pytest.mark.parametrize("impl", ["forloop", "foreach", "fused"])
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"maximize": True}, {"weight_decay": 0.1, "clip_gradient": 0.2}, {"compact": False},
     {"compact": False, "weight_decay": 0.1, "decoupled_weight_decay": True}],
    ids=["default", "maximize", "wd-clip", "mxnet", "mxnet-decoupled"],
)
def test_complex_matches_view_as_real(impl: str, kwargs: dict[str, Any]) -> None:
    torch.manual_seed(4)
    pc = torch.randn(3, 2, dtype=torch.complex64, requires_grad=True)
    pr = torch.view_as_real(pc.detach()).clone().requires_grad_()
    opt_c = FTML([pc], lr=0.01, **kwargs, **IMPL_KWARGS[impl])
    opt_r = FTML([pr], lr=0.01, **kwargs, **IMPL_KWARGS[impl])
    for _ in range(5):
        g = torch.randn(3, 2, dtype=torch.complex64)
        pc.grad, pr.grad = g.clone(), torch.view_as_real(g).clone()
        opt_c.step()
        opt_r.step()
        assert torch.equal(torch.view_as_real(pc.detach()), pr.detach())
        for key, value in opt_c.state[pc].items():
            real = value if key == "step" else torch.view_as_real(value)
            assert torch.equal(real, opt_r.state[pr][key]), key


@pytest.mark.parametrize("compact", [True, False], ids=["compact", "mxnet"])
@pytest.mark.parametrize("impl", ["forloop", "fused"])
def test_tensor_lr_matches_float_lr(impl: str, compact: bool) -> None:
    runs = []
    for lr in (0.01, torch.tensor(0.01, dtype=torch.float64)):  # the same value (a float32 0.01 is not)
        params, loss_fn = _regression(torch.float64)
        opt = FTML(params, lr=lr, weight_decay=0.1, decoupled_weight_decay=True, compact=compact, **IMPL_KWARGS[impl])
        for _ in range(5):
            opt.zero_grad()
            loss_fn().backward()
            opt.step()
        runs.append([p.detach().clone() for p in params])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_closure_runs_once_with_grad_and_returns_loss() -> None:
    params, loss_fn = _regression()
    opt = FTML(params)
    calls = []

    def closure() -> torch.Tensor:
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert calls == [True]
    assert isinstance(loss, torch.Tensor) and opt.state[params[0]]["step"].item() == 1.0


def test_sparse_gradient_is_rejected_before_any_group_steps() -> None:
    q = torch.nn.Parameter(torch.randn(4))
    p = torch.nn.Parameter(torch.randn(4))
    q.grad = torch.ones(4)
    p.grad = torch.sparse_coo_tensor([[1]], [1.0], (4,), check_invariants=True)
    q_before = q.detach().clone()
    opt = FTML([{"params": [q]}, {"params": [p]}])
    with pytest.raises(RuntimeError, match="FTML does not support sparse gradients"):
        opt.step()
    assert len(opt.state) == 0 and torch.equal(q.detach(), q_before)


def test_state_layout() -> None:
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    q = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = FTML([{"params": [p]}, {"params": [q], "compact": False}])
    p.grad, q.grad = torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    opt.step()
    assert sorted(opt.state[p]) == sorted(INFO.state_keys) == ["step", "v"]
    assert sorted(opt.state[q]) == sorted(INFO.mxnet_state_keys)
    step = opt.state[p]["step"]
    assert step.dim() == 0 and step.dtype == torch.float32 and step.device.type == "cpu" and step.item() == 1.0
    assert opt.state[p]["v"].dtype == torch.float64
    assert all(opt.state[q][k].dtype == torch.float64 for k in ("d", "v", "z"))


# ------------------------------------------------------------------------- checkpoints
def _train(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[list[torch.Tensor]]) -> None:
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone().to(p.dtype)
        opt.step()


@pytest.mark.parametrize("impl", ["forloop", "foreach", "fused"])
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"compact": False}, {"multi_precision": True}, {"multi_precision": True, "compact": False}],
    ids=["compact", "mxnet", "mp", "mp-mxnet"],
)
def test_state_dict_round_trip_mid_trajectory_is_bit_identical(impl: str, kwargs: dict[str, Any]) -> None:
    torch.manual_seed(5)
    dtype = torch.bfloat16 if kwargs.get("multi_precision") else torch.float32
    init = [torch.randn(4, 3).to(dtype), torch.randn(3).to(dtype)]
    grads = [[torch.randn(4, 3), torch.randn(3)] for _ in range(8)]
    make = lambda ps: FTML(ps, lr=0.01, weight_decay=0.01, **kwargs, **IMPL_KWARGS[impl])  # noqa: E731

    straight = [torch.nn.Parameter(t.clone()) for t in init]
    opt = make(straight)
    _train(opt, straight, grads)

    first = [torch.nn.Parameter(t.clone()) for t in init]
    opt1 = make(first)
    _train(opt1, first, grads[:4])
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "opt": opt1.state_dict()}, buffer)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    resumed = [torch.nn.Parameter(t.clone()) for t in ckpt["params"]]
    opt2 = make(resumed)
    opt2.load_state_dict(ckpt["opt"])
    if kwargs.get("multi_precision"):
        assert all(opt2.state[p][k].dtype == torch.float32 for p in resumed for k in opt2.state[p] if k != "step")
        assert all("master" in opt2.state[p] for p in resumed)
    _train(opt2, resumed, grads[4:])
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
    for a, b in zip(straight, resumed):
        for key in opt.state[a]:
            assert torch.equal(opt.state[a][key], opt2.state[b][key]), key


def test_cpu_checkpoint_loads_into_another_dtype_like_torch() -> None:
    """As torch's loader does: floating state takes the param's dtype, ``step`` keeps float32 on the CPU."""
    p = torch.nn.Parameter(torch.randn(3))
    opt = FTML([p])
    p.grad = torch.randn(3)
    opt.step()
    sd = opt.state_dict()
    q = torch.nn.Parameter(p.detach().double())
    opt64 = FTML([q])
    opt64.load_state_dict(sd)
    state = opt64.state[q]
    assert state["v"].dtype == torch.float64
    assert state["step"].dtype == torch.float32 and state["step"].device.type == "cpu"
    torch.testing.assert_close(state["v"], opt.state[p]["v"].double())
    q.grad = torch.randn(3, dtype=torch.float64)
    opt64.step()
    assert state["step"].item() == 2.0


def test_float_step_and_older_state_dict_load() -> None:
    """A checkpoint of the previous release: three-state (its default then), no flags, a float step.

    It loads into today's default (compact) optimizer converted, with a warning: ``d`` and ``z`` are
    dropped, the group is compact, and the next step is the one the three-state optimizer would take.
    """
    torch.manual_seed(6)
    w0, g1, g2 = (torch.randn(3, dtype=torch.float64) for _ in range(3))
    p = torch.nn.Parameter(w0.clone())
    old = FTML([p], lr=0.01, compact=False)
    p.grad = g1.clone()
    old.step()
    sd = copy.deepcopy(old.state_dict())
    sd["state"][0]["step"] = 1.0  # a Python float
    for flag in ("clip_gradient", "decoupled_weight_decay", "compact", "multi_precision", "maximize", "foreach",
                 "fused", "capturable", "differentiable"):
        del sd["param_groups"][0][flag]  # written before the flag existed
    q = torch.nn.Parameter(p.detach().clone())
    new = FTML([q], lr=0.01)
    with pytest.warns(UserWarning, match="MXNet three-state -> compact"):
        new.load_state_dict(sd)
    state = new.state[q]
    assert sorted(state) == ["step", "v"] and torch.equal(state["v"], old.state[p]["v"])
    assert torch.is_tensor(state["step"]) and state["step"].item() == 1.0 and state["step"].dtype == torch.float32
    assert new.param_groups[0]["compact"] is True and new.param_groups[0]["clip_gradient"] is None
    p.grad, q.grad = g2.clone(), g2.clone()
    old.step()
    new.step()
    assert new.state[q]["step"].item() == 2.0
    torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-12, atol=1e-14)


def test_multi_precision_state_dict_is_not_downcast() -> None:
    p = torch.nn.Parameter(torch.randn(6).to(torch.float16))
    opt = FTML([p], multi_precision=True)
    p.grad = torch.randn(6).half()
    opt.step()
    sd = opt.state_dict()
    assert all(sd["state"][0][k].dtype == torch.float32 for k in ("master", "v"))
    # Plain torch would round these to float16 on load (the checkpoint gotcha this guards against).
    sd["state"][0]["v"] = sd["state"][0]["v"] + 1e-7
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = FTML([q], multi_precision=True)
    opt2.load_state_dict(sd)
    assert torch.equal(opt2.state[q]["v"], sd["state"][0]["v"])
    assert opt2.state[q]["v"].dtype == torch.float32


# ------------------------------------------------------------------------- hooks, copies, repr
def test_state_dict_load_state_dict_and_step_hooks() -> None:
    p = torch.nn.Parameter(torch.randn(2))
    opt = FTML([p])
    calls: list[str] = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd_post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    opt.register_step_pre_hook(lambda o, a, k: calls.append("step_pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("step_post"))
    p.grad = torch.ones(2)
    opt.step()
    opt.load_state_dict(opt.state_dict())
    assert calls == ["step_pre", "step_post", "sd_pre", "sd_post", "load_pre", "load_post"]


def test_deepcopy_and_repr() -> None:
    p = torch.nn.Parameter(torch.randn(2))
    opt = FTML([p], lr=0.01, clip_gradient=0.5, compact=False)
    p.grad = torch.ones(2)
    opt.step()
    clone = copy.deepcopy(opt)
    for name in (a for a in vars(opt) if not a.startswith("_")):
        assert name in vars(clone), name
    assert clone.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    assert torch.equal(next(iter(clone.state.values()))["v"], opt.state[p]["v"])
    text = repr(opt)
    assert text.startswith("FTML (") and "clip_gradient: 0.5" in text and "compact: False" in text


# ------------------------------------------------------------------------- errors
@pytest.mark.parametrize("err", INFO.error_inputs, ids=lambda e: e.desc)
def test_error_inputs_at_construction(err: Any) -> None:
    params = err.make_params()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's table: a warning counts as the error
        with pytest.raises(err.error_type, match=err.error_regex):
            INFO.optim_cls(params, **err.kwargs)


def test_bad_param_group_is_rejected_before_it_is_added() -> None:
    p, q = torch.nn.Parameter(torch.randn(2)), torch.nn.Parameter(torch.randn(2))
    opt = FTML([p])
    with pytest.raises(ValueError, match=r"Invalid beta parameter at index 1: .*1\.5"):
        opt.add_param_group({"params": [q], "betas": (0.6, 1.5)})
    with pytest.raises(ValueError, match="Invalid clip_gradient"):
        FTML([{"params": [p]}, {"params": [q], "clip_gradient": -2.0}])
    assert len(opt.param_groups) == 1 and len(opt.state) == 0


@pytest.mark.parametrize("compact", [True, False], ids=["compact", "mxnet"])
@pytest.mark.parametrize("impl", ["forloop", "foreach", "fused"])
def test_group_at_lr_zero_does_not_step_and_negative_lr_is_rejected(impl: str, compact: bool) -> None:
    """Warmup schedules start at lr = 0, which is "no step" (ftmlopt.rule): the weights stay, bit for bit.

    Both forms: ``v`` and ``step`` advance (as Adam's state does at lr 0); the MXNet form keeps
    ``d`` and ``z`` (zero here), so ``z = -d w`` holds and the next step is the compact one.
    """
    params, loss_fn = _regression()
    opt = FTML([{"params": params[:1]}, {"params": params[1:]}], lr=0.01, compact=compact, **IMPL_KWARGS[impl])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda k: 1.0, lambda k: float(k)])  # group 1 warms up from 0
    assert opt.param_groups[1]["lr"] == 0.0
    bias_before = params[1].detach().clone()
    loss_fn().backward()
    grad = params[1].grad.clone()
    opt.step()
    state = opt.state[params[1]]
    assert torch.equal(params[1].detach(), bias_before)
    assert state["step"].item() == 1
    torch.testing.assert_close(state["v"], (1 - 0.999) * grad * grad, rtol=1e-6, atol=0.0)
    if not compact:
        assert not state["d"].any() and not state["z"].any()
    assert opt.state[params[0]]["step"].item() == 1
    sched.step()
    opt.zero_grad()
    loss_fn().backward()
    opt.step()
    assert state["step"].item() == 2 and torch.isfinite(params[1]).all()
    assert not torch.equal(params[1].detach(), bias_before)
    opt.param_groups[1]["lr"] = -0.1
    snapshot = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"^Invalid learning rate: -0\.1 \(param group 1, checked at step time\)$"):
        opt.step()
    assert all(torch.equal(a, b.detach()) for a, b in zip(snapshot, params))  # nothing moved, group 0 neither
    assert opt.state[params[0]]["step"].item() == 2
