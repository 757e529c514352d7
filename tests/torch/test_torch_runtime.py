"""Dispatch, GradScaler (fused AMP protocol), ``torch.compile``, ``differentiable`` gradcheck, docstrings."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import ftmlopt.torch._fused as fused_module
import ftmlopt.torch._validation as validation_module
import ftmlopt.torch.functional as functional_module
from ftmlopt.torch import FTML


# ----------------------------------------------------------------------------- dispatch
@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record which implementation ``ftml()`` picks (the real one still runs)."""
    seen: list[str] = []
    for name in ("_single_tensor_ftml", "_multi_tensor_ftml", "_fused_with_lr0_fallback"):
        real = getattr(functional_module, name)

        def spy(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> None:
            seen.append(_name)
            _real(*args, **kwargs)

        monkeypatch.setattr(functional_module, name, spy)
    return seen


def _one_step(**kwargs: Any) -> FTML:
    p = torch.nn.Parameter(torch.randn(3))
    if kwargs.get("differentiable"):  # as in torch, differentiable steps update non-leaf tensors in place
        p = p.clone()
    opt = FTML([p], **kwargs)
    p.grad = torch.randn(3)
    opt.step()
    return opt


@pytest.mark.parametrize(
    ("kwargs", "kernel_available", "expected"),
    [
        ({}, True, "_fused_with_lr0_fallback"),  # CPU default: fused when the kernel says it can
        ({}, False, "_single_tensor_ftml"),  # never foreach by default on the CPU
        ({"differentiable": True}, True, "_single_tensor_ftml"),
        ({"foreach": True}, True, "_multi_tensor_ftml"),
        ({"foreach": False}, True, "_single_tensor_ftml"),
        ({"fused": True}, False, "_fused_with_lr0_fallback"),
        ({"fused": False}, True, "_single_tensor_ftml"),
    ],
)
def test_dispatch(calls: list[str], monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, Any],
                  kernel_available: bool, expected: str) -> None:
    monkeypatch.setattr(fused_module, "fused_supported", lambda params: kernel_available, raising=False)
    if kwargs.get("fused") and not fused_module.fused_supported([torch.zeros(1)]):
        monkeypatch.setattr(fused_module, "_fused_ftml", lambda *a, **k: None)  # only the choice is under test
    _one_step(**kwargs)
    assert calls == [expected]


def test_dispatch_works_without_fused_supported(calls: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(fused_module, "fused_supported", raising=False)
    _one_step()
    assert calls == ["_single_tensor_ftml"]


def test_fused_flag_sets_amp_protocol_only_when_fused() -> None:
    p = torch.nn.Parameter(torch.randn(2))
    assert FTML([p], fused=True)._step_supports_amp_scaling is True
    assert getattr(FTML([p]), "_step_supports_amp_scaling", False) is False
    step = _one_step(fused=True).state
    assert next(iter(step.values()))["step"].dtype == torch.float32


@pytest.mark.parametrize("foreach", [False, True], ids=["forloop", "foreach"])
@pytest.mark.parametrize("kwargs", [{"compact": False}, {"weight_decay": 0.1, "decoupled_weight_decay": True}],
                         ids=["mxnet", "compact-decoupled"])
def test_capturable_tensor_math_matches_float_math(monkeypatch: pytest.MonkeyPatch, foreach: bool,
                                                   kwargs: dict[str, Any]) -> None:
    """The capturable branch (bias corrections as tensors, tensor lr on foreach), run on the CPU.

    Capturable is meant for CUDA graphs; only its device check is lifted here, so that the tensor
    arithmetic can be compared with the float64-scalar path on this machine.
    """
    monkeypatch.setattr(validation_module, "_get_capturable_supported_devices", lambda *a, **k: ["cpu"])
    torch.manual_seed(3)
    w0 = [torch.randn(5, 2, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    runs = []
    for capturable in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in w0]
        lr = torch.tensor(0.01, dtype=torch.float64) if capturable else 0.01
        opt = FTML(params, lr=lr, capturable=capturable, foreach=foreach, **kwargs)
        for k in range(5):
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(10 * k + i))
            opt.step()
        runs.append((params, opt))
    (p0, o0), (p1, o1) = runs
    assert all(o1.state[p]["step"].device.type == "cpu" and o1.state[p]["step"].dtype == torch.float32 for p in p1)
    for a, b in zip(p0, p1):
        # The capturable bias corrections are float32 tensors (``beta**step`` with the float32 step, as in
        # torch's capturable Adam): ``1 - 0.999**t`` then carries float32 rounding, up to ~6e-5 relative.
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-4, atol=1e-7)
        for key in o0.state[a]:
            torch.testing.assert_close(o1.state[b][key], o0.state[a][key], rtol=1e-4, atol=1e-7)


def test_capturable_refuses_cpu_params() -> None:
    p = torch.nn.Parameter(torch.randn(3))
    opt = FTML([p], capturable=True, foreach=False)
    p.grad = torch.randn(3)
    with pytest.raises(AssertionError, match="If capturable=True, params and state_steps must be on supported devices"):
        opt.step()


# ----------------------------------------------------------------------------- GradScaler
def _scaled_step(opt: FTML, p: torch.nn.Parameter, scaler: torch.amp.GradScaler, poison: bool) -> None:
    opt.zero_grad()
    loss = (p * torch.arange(1.0, 5.0)).sum() + (p**2).sum()
    scaler.scale(loss).backward()
    if poison:
        p.grad[1] = float("inf")
    scaler.step(opt)
    scaler.update()


def test_grad_scaler_fused_matches_unscaled_step() -> None:
    torch.manual_seed(0)
    w0 = torch.randn(4)
    p, q = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt_scaled = FTML([p], lr=0.01, fused=True)
    opt_plain = FTML([q], lr=0.01, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for _ in range(3):
        _scaled_step(opt_scaled, p, scaler, poison=False)
        opt_plain.zero_grad()
        ((q * torch.arange(1.0, 5.0)).sum() + (q**2).sum()).backward()
        opt_plain.step()
    # The scale is a power of two: unscaling inside the kernel is exact.
    assert torch.equal(p.detach(), q.detach())
    assert sorted(opt_scaled.state[p]) == ["step", "v"]
    for key in opt_plain.state[q]:
        assert torch.equal(opt_scaled.state[p][key], opt_plain.state[q][key]), key


@pytest.mark.parametrize("warm", [False, True], ids=["first-step", "mid-run"])
def test_grad_scaler_fused_skips_inf_step(warm: bool) -> None:
    p = torch.nn.Parameter(torch.randn(4))
    opt = FTML([p], lr=0.01, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    if warm:
        _scaled_step(opt, p, scaler, poison=False)
    before = p.detach().clone()
    state_before = {k: v.clone() for k, v in opt.state[p].items()}
    _scaled_step(opt, p, scaler, poison=True)
    assert torch.equal(p.detach(), before)
    assert scaler.get_scale() == 2.0**9  # the scaler saw the inf and backed off
    for key, value in opt.state[p].items():  # the step count is reverted, the rest untouched
        expected = state_before.get(key, torch.zeros_like(value))
        assert torch.equal(value, expected), key


def test_grad_scaler_non_fused_skips_inf_step() -> None:
    p = torch.nn.Parameter(torch.randn(4))
    opt = FTML([p], lr=0.01, fused=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = p.detach().clone()
    _scaled_step(opt, p, scaler, poison=True)
    assert torch.equal(p.detach(), before) and len(opt.state) == 0


# ----------------------------------------------------------------------------- torch.compile
def test_compiled_step_matches_eager() -> None:
    torch._dynamo.reset()
    torch.manual_seed(1)
    w0 = [torch.randn(8, 4), torch.randn(4)]
    eager = [torch.nn.Parameter(t.clone()) for t in w0]
    compiled = [torch.nn.Parameter(t.clone()) for t in w0]
    opt_e = FTML(eager, lr=0.01, weight_decay=0.01, foreach=False)
    opt_c = FTML(compiled, lr=0.01, weight_decay=0.01, foreach=False)
    step = torch.compile(opt_c.step)
    for _ in range(3):
        grads = [torch.randn_like(t) for t in w0]
        for pe, pc, g in zip(eager, compiled, grads):
            pe.grad, pc.grad = g.clone(), g.clone()
        opt_e.step()
        step()
    for pe, pc in zip(eager, compiled):
        # Compiled code evaluates the bias corrections as float32 tensors and may fuse ops.
        torch.testing.assert_close(pc.detach(), pe.detach(), rtol=1e-5, atol=1e-6)
        assert sorted(opt_c.state[pc]) == sorted(opt_e.state[pe])
        for key in opt_e.state[pe]:
            torch.testing.assert_close(opt_c.state[pc][key], opt_e.state[pe][key], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- differentiable
def _diff_step(p: torch.Tensor, grad: torch.Tensor, d: torch.Tensor, v: torch.Tensor, z: torch.Tensor,
               lr: torch.Tensor, kwargs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    p = p.clone()
    p.grad = grad
    opt = FTML([p], lr=lr, differentiable=True, **kwargs)
    state = {"step": torch.tensor(2.0), "v": v.clone()}
    if kwargs.get("compact") is False:
        state.update(d=d.clone(), z=z.clone())
    opt.state[p] = state
    opt.step()
    return (p, *(state[k] for k in sorted(state) if k != "step"))


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"weight_decay": 0.1, "clip_gradient": 5.0, "maximize": True},
        {"weight_decay": 0.1, "decoupled_weight_decay": True},
        {"compact": False},
        {"compact": False, "weight_decay": 0.1, "clip_gradient": 5.0, "maximize": True},
        {"compact": False, "weight_decay": 0.1, "decoupled_weight_decay": True},
    ],
    ids=["plain", "wd-clip-maximize", "decoupled", "mxnet", "mxnet-wd-clip-maximize", "mxnet-decoupled"],
)
def test_gradcheck_through_differentiable_step(kwargs: dict[str, Any]) -> None:
    torch.manual_seed(2)
    f64 = {"dtype": torch.float64, "requires_grad": True}
    p, grad = torch.randn(5, **f64), torch.randn(5, **f64)
    d = (torch.rand(5, dtype=torch.float64) + 0.5).requires_grad_()
    v = (torch.rand(5, dtype=torch.float64) + 0.5).requires_grad_()
    z = torch.randn(5, **f64)
    lr = torch.tensor(0.05, **f64)
    assert torch.autograd.gradcheck(lambda *a: _diff_step(*a, kwargs), (p, grad, d, v, z, lr))


def test_differentiable_gradient_matches_closed_form() -> None:
    """One step from zero state is w - (1-b1) g/d_1 with d_1 = (1-b1)/lr (|g| + eps): dw_1/dw_0 = 1."""
    p = torch.randn(4, dtype=torch.float64, requires_grad=True)
    grad = torch.rand(4, dtype=torch.float64) + 0.5
    zeros = torch.zeros(4, dtype=torch.float64)
    lr = torch.tensor(0.1, dtype=torch.float64)
    out = _diff_step(p, grad, zeros, zeros, zeros, lr, {})[0]
    (g_p,) = torch.autograd.grad(out.sum(), p)
    torch.testing.assert_close(g_p, torch.ones(4, dtype=torch.float64))
