"""``FTML(..., state_bits=8 | 4)``: low-bit state in the torch front end, against the reference step by step.

The reference is :func:`ftmlopt.lowbit.compact_step` evaluated on NumPy arrays (float32), fed at
every step with the optimizer's *own* previous weights and state: the codes and scales must be
bit-identical (the reference's operations are correctly rounded on both libraries) and the weights
equal to float32 rounding (torch's CPU ``sqrt`` is not correctly rounded; the rule uses it).
"""

from __future__ import annotations

import copy
import io
import warnings
from typing import Any

import numpy as np
import pytest
import torch

from ftmlopt import lowbit, rule
from ftmlopt.torch import FTML

LR, BETAS, EPS = 0.01, (0.6, 0.999), 1e-8
PATHS = {"forloop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def _model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    # 61 x 83 = 5063 weights (quantized; 40 blocks, the last partial), a 61-element bias (float state)
    return torch.nn.Linear(83, 61).to(dtype)


def _grads(model: torch.nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(step)
    for p in model.parameters():
        scale = 10.0 ** (torch.rand(p.shape, generator=gen) * 4 - 3)  # 1e-3 .. 10: a wide range per block
        p.grad = (torch.randn(p.shape, generator=gen) * scale).to(p.dtype)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


# ----------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("bad", [5, 16, 0, -8, 64])
def test_unsupported_state_bits_is_a_value_error_before_anything_changes(bad: int) -> None:
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=rf"^Invalid state_bits: {bad}$"):
        FTML(model.parameters(), state_bits=bad)
    opt = FTML(model.parameters())
    with pytest.raises(ValueError, match=rf"^Invalid state_bits: {bad}$"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))], "state_bits": bad})
    assert len(opt.param_groups) == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_state_bits_of_the_wrong_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="state_bits"):
        FTML(_model().parameters(), state_bits=8.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("bits", [8, 4])
def test_low_bits_with_the_mxnet_form_is_refused(bits: int) -> None:
    with pytest.raises(ValueError, match=rf"^Invalid state_bits: {bits} with compact=False"):
        FTML(_model().parameters(), state_bits=bits, compact=False)
    opt = FTML(_model().parameters(), compact=False)
    with pytest.raises(ValueError, match="compact=False"):  # the group inherits compact=False from the defaults
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(5000))], "state_bits": bits})
    for flag in ("capturable", "differentiable"):
        with pytest.raises(ValueError, match=flag):
            FTML(_model().parameters(), state_bits=bits, **{flag: True})


# ----------------------------------------------------------------------------------------------- the step
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("options", [{}, {"weight_decay": 0.01, "clip_gradient": 3.0},
                                     {"weight_decay": 0.01, "decoupled_weight_decay": True, "maximize": True}])
def test_every_path_is_the_reference_step_by_step(path: str, bits: int, options: dict[str, Any]) -> None:
    """For-loop, foreach and fused: the weight's step and state are the reference's from the optimizer's
    own previous state; the small bias keeps float state and steps exactly as a float-state FTML."""
    model = _model()
    opt = FTML(model.parameters(), lr=LR, betas=BETAS, eps=EPS, state_bits=bits, **options, **PATHS[path])
    twin = copy.deepcopy(model)
    float_opt = FTML(twin.parameters(), lr=LR, betas=BETAS, eps=EPS, **options, **PATHS[path])
    w, b = model.weight, model.bias
    for t, lr in enumerate([LR, 0.03, 0.0, 0.02, LR], start=1):  # lr 0: no step, the gradient still enters v
        _grads(model, t)
        _grads(twin, t)
        for group in (*opt.param_groups, *float_opt.param_groups):
            group["lr"] = lr
        state = opt.state[w]
        old_state = (_np(state["codes"]), _np(state["scales"])) if state else lowbit.zeros_state(w.numel(), bits)
        prev = (_np(w), *old_state)
        opt.step()
        float_opt.step()
        state = opt.state[w]
        assert sorted(state) == ["codes", "scales", "seed", "step"] and sorted(opt.state[b]) == ["step", "v"]
        assert state["codes"].dtype == torch.uint8 and state["scales"].dtype == torch.float32
        assert state["seed"] == 0 and float(state["step"]) == t
        assert torch.equal(b, twin.bias) and torch.equal(opt.state[b]["v"], float_opt.state[twin.bias]["v"])
        c = rule.constants(lr, t, *BETAS, EPS, weight_decay=options.get("weight_decay", 0.0),
                           decoupled=options.get("decoupled_weight_decay", False),
                           clip=options.get("clip_gradient"), maximize=options.get("maximize", False))
        ref_w, ref_codes, ref_scales = lowbit.compact_step(prev[0], _np(w.grad), prev[1], prev[2],
                                                           c.cast(np.float32), bits=bits, seed=0, step=t)
        assert np.array_equal(_np(state["codes"]), ref_codes) and np.array_equal(_np(state["scales"]), ref_scales)
        np.testing.assert_allclose(_np(w), ref_w, rtol=2e-6, atol=1e-7)
        if lr == 0:
            assert np.array_equal(_np(w), prev[0])


# ----------------------------------------------------------------------------------------------- which params
@pytest.mark.parametrize("bits, limit", [(8, 1.05), (4, 0.55)])
def test_state_bytes_per_param_of_a_1m_tensor(bits: int, limit: float) -> None:
    p = torch.nn.Parameter(torch.zeros(1024, 1024))
    opt = FTML([p], state_bits=bits)
    p.grad = torch.ones_like(p)
    opt.step()
    state = opt.state[p]
    per_param = (state["codes"].nbytes + state["scales"].nbytes) / p.numel()
    assert per_param <= limit
    assert per_param == pytest.approx({8: 1 + 4 / 128, 4: 0.5 + 4 / 128}[bits])


def test_per_group_state_bits_and_small_params() -> None:
    """state_bits per param group; params under 4096 elements keep float state; empty params step too."""
    big8, big4, big32 = (torch.nn.Parameter(torch.randn(4096)) for _ in range(3))
    small, empty = torch.nn.Parameter(torch.randn(4095)), torch.nn.Parameter(torch.zeros(0, 7))
    opt = FTML([{"params": [big8, small, empty], "state_bits": 8}, {"params": [big4], "state_bits": 4},
                {"params": [big32]}], lr=0.01)
    before = [p.detach().clone() for p in (big8, big4, big32, small)]
    for p in (big8, big4, big32, small, empty):
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[big8]["codes"].numel() == 4096 and opt.state[big4]["codes"].numel() == 2048
    assert sorted(opt.state[big32]) == sorted(opt.state[small]) == sorted(opt.state[empty]) == ["step", "v"]
    assert [opt.state[p]["seed"] for p in (big8, big4)] == [0, 3]  # the param's index in the optimizer
    # the first step moves every element with a gradient of 1 by lr, whatever its state's width
    for p, w0 in zip((big8, big4, big32, small), before):
        torch.testing.assert_close(w0 - p.detach(), torch.full_like(w0, 0.01))


@pytest.mark.parametrize("bits", [8, 4])
def test_non_contiguous_odd_and_complex_params(bits: int) -> None:
    """A transposed (non-contiguous) param steps as its contiguous twin; a complex param as its real view."""
    torch.manual_seed(1)
    base = torch.randn(97, 131)
    nc = torch.nn.Parameter(base.t())  # 12707 elements, not a multiple of 128, not contiguous
    twin = torch.nn.Parameter(base.t().contiguous())
    assert not nc.is_contiguous()
    z = torch.nn.Parameter(torch.randn(2100, dtype=torch.complex64))  # 4200 real elements: quantized
    zr = torch.nn.Parameter(torch.view_as_real(z.detach()).clone())
    opt_nc, opt_tw = FTML([nc, z], lr=0.01, state_bits=bits), FTML([twin, zr], lr=0.01, state_bits=bits)
    for _ in range(3):
        g = torch.randn(131, 97)
        gz = torch.randn(2100, dtype=torch.complex64)
        nc.grad, twin.grad, z.grad, zr.grad = g, g.clone(), gz, torch.view_as_real(gz).clone()
        opt_nc.step()
        opt_tw.step()
        assert torch.equal(nc, twin) and torch.equal(torch.view_as_real(z.detach()), zr)
        for a, b in ((opt_nc.state[nc], opt_tw.state[twin]), (opt_nc.state[z], opt_tw.state[zr])):
            assert torch.equal(a["codes"], b["codes"]) and torch.equal(a["scales"], b["scales"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
def test_half_params_and_degenerate_values_never_nan(dtype: torch.dtype, bits: int) -> None:
    p = torch.nn.Parameter(torch.randn(5000).to(dtype))
    opt = FTML([p], lr=0.0, state_bits=bits)
    for g in (torch.zeros(5000), torch.full((5000,), 1e-30), torch.randn(5000) * 1e4):
        p.grad = g.to(dtype)
        opt.step()
        opt.param_groups[0]["lr"] = 0.01
    assert torch.isfinite(p).all() and torch.isfinite(opt.state[p]["scales"]).all()


# ----------------------------------------------------------------------------------------------- checkpoints
def _train(model: torch.nn.Module, opt: FTML, steps: range) -> None:
    for t in steps:
        _grads(model, t)
        opt.step()


def _roundtrip(sd: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
def test_state_dict_round_trips_bit_for_bit_and_resumes_bit_identically(dtype: torch.dtype, bits: int) -> None:
    """torch's loader casts every state tensor of a half param to its dtype: codes and scales come back as saved,
    and a resumed run equals the uninterrupted one bit for bit."""
    model = _model(dtype)
    opt = FTML(model.parameters(), lr=LR, state_bits=bits)
    _train(model, opt, range(1, 4))
    saved_model = copy.deepcopy(model.state_dict())
    sd = _roundtrip(opt.state_dict())
    _train(model, opt, range(4, 7))  # uninterrupted

    resumed = _model(dtype)
    resumed.load_state_dict(saved_model)
    opt2 = FTML(resumed.parameters(), lr=LR, state_bits=bits)
    opt2.load_state_dict(sd)
    st = opt2.state[resumed.weight]
    assert st["codes"].dtype == torch.uint8 and st["scales"].dtype == torch.float32
    assert torch.equal(st["codes"], sd["state"][0]["codes"]) and torch.equal(st["scales"], sd["state"][0]["scales"])
    assert st["seed"] == sd["state"][0]["seed"]
    again = opt2.state_dict()["state"][0]
    assert all(torch.equal(again[k], sd["state"][0][k]) for k in ("codes", "scales", "step"))
    _train(resumed, opt2, range(4, 7))
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for a, b in ((opt.state[model.weight], opt2.state[resumed.weight]),):
        assert torch.equal(a["codes"], b["codes"]) and torch.equal(a["scales"], b["scales"])


@pytest.mark.parametrize("bits", [8, 4])
def test_float_checkpoint_converts_to_low_bits_and_back(bits: int) -> None:
    model = _model()
    opt32 = FTML(model.parameters(), lr=LR)
    _train(model, opt32, range(1, 4))
    sd32 = opt32.state_dict()
    v = sd32["state"][0]["v"]

    low = FTML(model.parameters(), lr=LR, state_bits=bits)
    with pytest.warns(UserWarning, match="converted to this optimizer's state_bits"):
        low.load_state_dict(sd32)
    st = low.state[model.weight]
    ref_codes, ref_scales = lowbit.quantize(_np(v), bits, rounding="nearest")
    assert np.array_equal(_np(st["codes"]), ref_codes) and np.array_equal(_np(st["scales"]), ref_scales)
    assert st["seed"] == 0 and float(st["step"]) == 3 and torch.equal(low.state[model.bias]["v"], sd32["state"][1]["v"])
    _train(model, low, range(4, 8))  # training goes on
    assert float(low.state[model.weight]["step"]) == 7 and torch.isfinite(model.weight).all()

    back = FTML(model.parameters(), lr=LR)
    sd_low = low.state_dict()
    with pytest.warns(UserWarning, match="converted"):
        back.load_state_dict(sd_low)
    v_back = back.state[model.weight]["v"]
    decoded = lowbit.decode(_np(sd_low["state"][0]["codes"]), _np(sd_low["state"][0]["scales"]), v.numel(), bits)
    assert v_back.shape == model.weight.shape and np.array_equal(_np(v_back).reshape(-1), decoded)
    _train(model, back, range(8, 10))
    assert float(back.state[model.weight]["step"]) == 9


def test_eight_bit_checkpoint_into_four_bits() -> None:
    model = _model()
    opt8 = FTML(model.parameters(), lr=LR, state_bits=8)
    _train(model, opt8, range(1, 3))
    opt4 = FTML(model.parameters(), lr=LR, state_bits=4)
    with pytest.warns(UserWarning, match="8-bit state -> 4-bit"):
        opt4.load_state_dict(opt8.state_dict())
    assert opt4.state[model.weight]["codes"].numel() == (model.weight.numel() + 1) // 2
    _train(model, opt4, range(3, 5))


def test_same_layout_loads_without_a_warning() -> None:
    model = _model()
    opt = FTML(model.parameters(), lr=LR, state_bits=8)
    _train(model, opt, range(1, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FTML(model.parameters(), lr=LR, state_bits=8).load_state_dict(opt.state_dict())


def test_malformed_low_bit_state_dict_is_refused_before_loading() -> None:
    model = _model()
    opt = FTML(model.parameters(), lr=LR, state_bits=8)
    _train(model, opt, range(1, 3))
    sd = opt.state_dict()
    for key, bad in (("codes", sd["state"][0]["codes"][:-1]), ("scales", sd["state"][0]["scales"].double()),
                     ("seed", -1)):
        broken = copy.deepcopy(sd)
        broken["state"][0][key] = bad
        fresh = FTML(model.parameters(), lr=LR, state_bits=8)
        with pytest.raises(ValueError, match=key):
            fresh.load_state_dict(broken)
        assert not fresh.state


def test_editing_state_bits_after_the_state_exists_is_an_error() -> None:
    model = _model()
    opt = FTML(model.parameters(), lr=LR, state_bits=8)
    _train(model, opt, range(1, 2))
    before = model.weight.detach().clone()
    for bits in (32, 4):
        opt.param_groups[0]["state_bits"] = bits
        _grads(model, 2)
        with pytest.raises(RuntimeError, match="state_bits"):
            opt.step()
        assert torch.equal(model.weight, before)


@pytest.mark.parametrize("bits", [8, 4])
def test_multi_precision_keeps_a_float32_master(bits: int) -> None:
    model = _model(torch.bfloat16)
    opt = FTML(model.parameters(), lr=LR, state_bits=bits, multi_precision=True)
    _train(model, opt, range(1, 4))
    st = opt.state[model.weight]
    assert sorted(st) == ["codes", "master", "scales", "seed", "step"] and st["master"].dtype == torch.float32
    assert torch.equal(model.weight, st["master"].to(torch.bfloat16))


def test_replicas_with_the_same_gradients_stay_identical() -> None:
    """What DDP relies on: the rounding bits come from (seed, step, index), never from a global generator."""
    a, b = _model(), _model()
    oa, ob = FTML(a.parameters(), lr=LR, state_bits=4), FTML(b.parameters(), lr=LR, state_bits=4)
    for t in range(1, 5):
        _grads(a, t)
        _grads(b, t)
        torch.manual_seed(t)  # a different global generator state on each "replica"
        oa.step()
        torch.manual_seed(100 + t)
        ob.step()
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert torch.equal(oa.state[a.weight]["codes"], ob.state[b.weight]["codes"])


# ----------------------------------------------------------------------------------------------- dispatch
def _forbid(monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"{target} was called")

    module, name = target.rsplit(".", 1)
    monkeypatch.setattr(module + "." + name, fail)


@pytest.mark.parametrize("flags", [{"fused": True}, {}], ids=["fused", "default"])
def test_fused_and_default_dispatch_use_the_kernel(flags: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from ftmlopt.torch import _lowbit

    model = _model()
    assert _lowbit.fused_available([model.weight])
    _forbid(monkeypatch, "ftmlopt.lowbit.compact_step")
    opt = FTML(model.parameters(), lr=LR, state_bits=8, **flags)
    _train(model, opt, range(1, 3))
    assert float(opt.state[model.weight]["step"]) == 2


@pytest.mark.parametrize("flags", [{"foreach": False}, {"foreach": True}, {"fused": False}])
def test_forloop_and_foreach_use_the_reference(flags: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid(monkeypatch, "ftmlopt.torch._fused_lowbit.fused_ftml_lowbit")
    model = _model()
    opt = FTML(model.parameters(), lr=LR, state_bits=8, **flags)
    _train(model, opt, range(1, 3))
    assert float(opt.state[model.weight]["step"]) == 2


def _scaled_step(opt: FTML, p: torch.nn.Parameter, scaler: torch.amp.GradScaler, t: int, poison: bool) -> None:
    opt.zero_grad()
    x = torch.randn(p.shape, generator=torch.Generator().manual_seed(t))
    scaler.scale((p * x).sum() + (p**2).sum()).backward()
    if poison:
        p.grad[0, 1] = float("inf")
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "reference"])
@pytest.mark.parametrize("bits", [8, 4])
def test_grad_scaler_fused_protocol(kernel: bool, bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """GradScaler hands the fused optimizer the scale and the inf flag: a power-of-two scale gives the unscaled
    step exactly, and a step with an inf changes nothing (state, codes and the step count included)."""
    if not kernel:
        monkeypatch.setattr("ftmlopt.torch._lowbit.fused_available", lambda params: False)
    torch.manual_seed(0)
    w0 = torch.randn(70, 80)
    p, q = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt_scaled = FTML([p], lr=0.01, fused=True, state_bits=bits)
    opt_plain = FTML([q], lr=0.01, fused=True, state_bits=bits)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for t in range(3):
        _scaled_step(opt_scaled, p, scaler, t, poison=False)
        opt_plain.zero_grad()
        x = torch.randn(q.shape, generator=torch.Generator().manual_seed(t))
        ((q * x).sum() + (q**2).sum()).backward()
        opt_plain.step()
    assert torch.equal(p, q)
    for key in ("codes", "scales", "step"):
        assert torch.equal(opt_scaled.state[p][key], opt_plain.state[q][key]), key
    before = p.detach().clone()
    state_before = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt_scaled.state[p].items()}
    _scaled_step(opt_scaled, p, scaler, 9, poison=True)
    assert torch.equal(p, before) and scaler.get_scale() == 2.0**9
    for key, value in opt_scaled.state[p].items():
        assert torch.equal(value, state_before[key]) if torch.is_tensor(value) else value == state_before[key], key


@pytest.mark.parametrize("bits", [8, 4])
def test_mxnet_form_checkpoints_convert_to_and_from_low_bits(bits: int) -> None:
    """MXNet form (d, v, z) -> low bits: d and z dropped, v quantized; low bits -> MXNet form: v decoded, then
    d and z rebuilt (z = -d w), and training goes on in each."""
    model = _model()
    mx = FTML(model.parameters(), lr=LR, compact=False)
    _train(model, mx, range(1, 3))
    low = FTML(model.parameters(), lr=LR, state_bits=bits)
    with pytest.warns(UserWarning):
        low.load_state_dict(mx.state_dict())
    st = low.state[model.weight]
    assert sorted(st) == ["codes", "scales", "seed", "step"]
    ref_codes, _ = lowbit.quantize(_np(mx.state[model.weight]["v"]), bits, rounding="nearest")
    assert np.array_equal(_np(st["codes"]), ref_codes)
    _train(model, low, range(3, 5))

    back = FTML(model.parameters(), lr=LR, compact=False)
    with pytest.warns(UserWarning):
        back.load_state_dict(low.state_dict())
    st = back.state[model.weight]
    assert sorted(st) == ["d", "step", "v", "z"]
    torch.testing.assert_close(st["z"], -st["d"] * model.weight.detach())
    _train(model, back, range(5, 7))
    assert torch.isfinite(model.weight).all() and float(st["step"]) == 6


@pytest.mark.parametrize("flags", [{"fused": True}, {"foreach": False}], ids=["fused", "forloop"])
def test_compiled_step_equals_eager(flags: dict[str, Any]) -> None:
    """Under torch.compile the low-bit part runs eagerly (a graph break): the same codes, scales and weights
    as the eager step, bit for bit; the float-state bias is compiled as usual (close)."""
    torch._dynamo.reset()
    eager, compiled = _model(), _model()
    opt_e = FTML(eager.parameters(), lr=LR, state_bits=8, **flags)
    opt_c = FTML(compiled.parameters(), lr=LR, state_bits=8, **flags)
    step = torch.compile(opt_c.step)
    for t in range(1, 4):
        _grads(eager, t)
        _grads(compiled, t)
        opt_e.step()
        step()
    se, sc = opt_e.state[eager.weight], opt_c.state[compiled.weight]
    assert float(sc["step"]) == 3
    assert torch.equal(eager.weight, compiled.weight)
    assert torch.equal(se["codes"], sc["codes"]) and torch.equal(se["scales"], sc["scales"])
    torch.testing.assert_close(eager.bias, compiled.bias, rtol=1e-5, atol=1e-6)
