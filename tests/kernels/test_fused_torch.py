"""``_fused_ftml`` (CPU, llvmlite) against the readable per-tensor reference, step by step, state included."""

from __future__ import annotations

import itertools

import pytest
import torch
from _ftml_torch_reference import HYPER, OPTIONS, SHAPES, Pair, _grads, _make

from ftmlopt.kernels import cpu
from ftmlopt.torch._constants import StepOptions, StepTensors
from ftmlopt.torch._fused import _fused_ftml, fused_supported


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("opt_index", range(len(OPTIONS)))
def test_fused_matches_reference_every_step(dtype, compact, opt_index, monkeypatch) -> None:
    if opt_index % 2:  # these workloads are small: force the multi-threaded path in half the cases
        monkeypatch.setattr(cpu, "PARALLEL_MIN", 0)
    gen = torch.Generator().manual_seed(100 * opt_index + compact)
    pair = Pair(_make(SHAPES, dtype, None, gen, transpose_every=2), compact=compact)
    kw = {**HYPER, **OPTIONS[opt_index]}
    for k in range(1, 5):
        grads = _grads(pair.fused_p, gen)
        # step 3 skips the 1-element and the (3, 5) params (no gradient): steps then differ per tensor
        idx = [0, 1, 3, 5] if k == 3 else None
        pair.step(grads, idx, **kw)
        pair.check(dtype, f"step {k}")


def test_non_contiguous_views_are_updated_in_place() -> None:
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(6, 8, generator=gen)
    pair = Pair([base[:, ::2], base[1:4, 2:7]], compact=False)
    pair.fused_p = [base[:, ::2], base[1:4, 2:7].clone()]  # a strided view of live storage, and a slice copy
    grads = _grads(pair.fused_p, gen)
    pair.step(grads, **HYPER, **OPTIONS[1])
    pair.check(torch.float32)
    assert base[:, ::2].data_ptr() == pair.fused_p[0].data_ptr()


@pytest.mark.parametrize("compact", [False, True])
def test_bf16_params_with_fp32_state(compact) -> None:
    gen = torch.Generator().manual_seed(11)
    pair = Pair(_make([(5, 9), (33,)], torch.bfloat16, None, gen), compact=compact, state_dtype=torch.float32)
    for k in range(3):
        pair.step(_grads(pair.fused_p, gen), **HYPER, **OPTIONS[1])
        assert pair.vs[0].dtype == torch.float32
        pair.check(torch.bfloat16, f"step {k}")


def test_many_tiny_tensors_in_one_call() -> None:
    gen = torch.Generator().manual_seed(5)
    shapes = [(1 + i % 13,) for i in range(300)]
    pair = Pair(_make(shapes, torch.float32, None, gen), compact=False)
    for _ in range(3):
        pair.step(_grads(pair.fused_p, gen), **HYPER, **OPTIONS[2])
    pair.check(torch.float32)


def test_grad_scale_divides_and_writes_back_the_unscaled_grad() -> None:
    gen = torch.Generator().manual_seed(9)
    pair = Pair(_make([(17,), (4, 4)], torch.float32, None, gen), compact=False)
    grads = _grads(pair.fused_p, gen, scale=1024.0)
    fg, rg = pair.step(grads, grad_scale=1024.0, **HYPER, **OPTIONS[1])
    pair.check(torch.float32)
    for f, r, g in zip(fg, rg, grads):
        torch.testing.assert_close(f, r)
        torch.testing.assert_close(f, g / 1024.0)


@pytest.mark.parametrize("compact", [False, True])
def test_found_inf_leaves_params_state_and_steps_unchanged(compact) -> None:
    gen = torch.Generator().manual_seed(13)
    pair = Pair(_make([(8,), (2, 3)], torch.float32, None, gen), compact=compact)
    pair.step(_grads(pair.fused_p, gen), **HYPER, **OPTIONS[0])
    before = [t.clone() for t in itertools.chain(pair.fused_p, pair.vs, pair.ds, pair.zs, pair.steps)]
    grads = _grads(pair.fused_p, gen)
    grads[0][0] = float("inf")
    pair.step(grads, grad_scale=2.0, found_inf=torch.tensor(1.0), **HYPER, **OPTIONS[0])
    after = list(itertools.chain(pair.fused_p, pair.vs, pair.ds, pair.zs, pair.steps))
    for b, a in zip(before, after):
        assert torch.equal(b, a)
    pair.check(torch.float32)
    # and a found_inf of 0 steps normally
    pair.step(_grads(pair.fused_p, gen), found_inf=torch.tensor(0.0), **HYPER, **OPTIONS[0])
    pair.check(torch.float32)
    assert float(pair.steps[0]) == 2.0


def test_complex_params_step_as_their_real_views() -> None:
    gen = torch.Generator().manual_seed(17)
    pc = torch.randn(6, dtype=torch.complex64, generator=gen)
    gc = torch.randn(6, dtype=torch.complex64, generator=gen)
    st = [torch.zeros_like(pc) for _ in range(3)]
    step = torch.zeros(())
    real = Pair([torch.view_as_real(pc).clone()], compact=False)
    _fused_ftml(StepTensors([pc], [gc.clone()], [st[0]], [st[1]], [st[2]], [step]),
                StepOptions(compact=False, **HYPER, **OPTIONS[1]), has_complex=True)
    real.step([torch.view_as_real(gc).clone()], **HYPER, **OPTIONS[1])
    torch.testing.assert_close(torch.view_as_real(pc), real.ref_p[0])
    torch.testing.assert_close(torch.view_as_real(st[2]), real.ref_states[0]["z"])


def test_tensor_lr_and_version_counter() -> None:
    p = torch.ones(4, requires_grad=True)
    g = torch.full((4,), 0.5)
    d, v, z = (torch.zeros(4) for _ in range(3))
    step = torch.zeros(())
    version = p._version
    _fused_ftml(StepTensors([p], [g], [d], [v], [z], [step]),
                StepOptions(lr=torch.tensor(0.1), beta1=0.6, beta2=0.999, eps=1e-8, weight_decay=0.0,
                            clip_gradient=None, decoupled_weight_decay=False, compact=False, maximize=False))
    # step 1 with zero state moves each element by lr * g / (|g| + eps * ...) ~= lr
    torch.testing.assert_close(p.detach(), torch.full((4,), 0.9))
    assert p._version > version
    assert float(step) == 1.0


def _call(params, grads, ds, vs, zs, steps, differentiable=False, **kw):
    opts = {**HYPER, **OPTIONS[0], "compact": False, **kw}
    _fused_ftml(StepTensors(params, grads, ds, vs, zs, steps), StepOptions(**opts), differentiable=differentiable)


def test_bad_input_raises_before_anything_changes() -> None:
    p, g = torch.ones(3), torch.ones(3)
    d, v, z, s = torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(())
    with pytest.raises(RuntimeError, match="differentiable"):
        _call([p], [g], [d], [v], [z], [s], differentiable=True)
    with pytest.raises(ValueError, match="grads has 0 tensors"):
        _call([p], [], [d], [v], [z], [s])
    with pytest.raises(ValueError, match="compact=True takes empty ds and zs"):
        _call([p], [g], [d], [v], [z], [s], compact=True)
    for clip in (-1.0, 0.0, float("nan")):  # rule.check_clip: None (off) or > 0, as on every other path
        with pytest.raises(ValueError, match=rf"^Invalid clip_gradient value: {clip} \(use None"):
            _call([p], [g], [d], [v], [z], [s], clip_gradient=clip)
    assert torch.equal(p, torch.ones(3)) and float(s) == 0.0 and not v.any()
    _call([], [], [], [], [], [])  # nothing to do


def test_fused_supported() -> None:
    assert fused_supported([torch.zeros(2), torch.zeros((), dtype=torch.float64)])
    assert not fused_supported([torch.zeros(2, dtype=torch.int32)])
    assert not fused_supported([torch.zeros(2, device="meta")])


def test_fused_refuses_state_of_another_size_before_writing_anything() -> None:
    """The kernel writes through raw addresses, so a state of the wrong size must be refused up front."""
    w = torch.ones(8)
    g = torch.ones(8)
    d, v, z = torch.zeros(8), torch.zeros(8), torch.zeros(5)
    step = torch.zeros((), dtype=torch.float32)
    before = [t.clone() for t in (w, g, d, v, z, step)]
    with pytest.raises(ValueError, match="does not belong"):
        _fused_ftml(
            StepTensors([w], [g], [d], [v], [z], [step]),
            StepOptions(lr=0.1, beta1=0.6, beta2=0.999, eps=1e-8, weight_decay=0.0, clip_gradient=None,
                        decoupled_weight_decay=False, compact=False, maximize=False),
        )
    assert all(torch.equal(a, b) for a, b in zip((w, g, d, v, z, step), before))


# ---------------------------------------------------------------------------- the CPU group plan cache
def test_plan_is_reused_and_follows_new_gradient_tensors() -> None:
    from ftmlopt.torch import _fused

    gen = torch.Generator().manual_seed(21)
    pair = Pair(_make([(70_000,), (9,)], torch.float32, None, gen), compact=True)
    kept = []  # old gradients stay alive, so each step's gradients live at new addresses
    pair.step(_grads(pair.fused_p, gen), **HYPER, **OPTIONS[1])
    plans = dict(_fused._PLANS)
    for k in range(3):
        fg, _ = pair.step(_grads(pair.fused_p, gen), **HYPER, **OPTIONS[1])
        kept.append(fg)
        pair.check(torch.float32, f"step {k + 2}")
    assert len({g.data_ptr() for fg in kept for g in fg[:1]}) == 3
    assert dict(_fused._PLANS) == plans  # the same plan served every later step


def test_plan_is_not_reused_for_tensors_of_another_size_at_the_same_address() -> None:
    gen = torch.Generator().manual_seed(22)
    buf = torch.randn(100, generator=gen)
    v = torch.zeros(100)
    step = torch.zeros(())
    opts = StepOptions(compact=True, **HYPER, **OPTIONS[0])
    _fused_ftml(StepTensors([buf], [torch.ones(100)], [], [v], [], [step]), opts)
    tail_w, tail_v = buf[50:].clone(), v[50:].clone()
    # the first half only: same addresses, half the elements; the tail must not move
    _fused_ftml(StepTensors([buf[:50]], [torch.ones(50)], [], [v[:50]], [], [step]), opts)
    assert torch.equal(buf[50:], tail_w) and torch.equal(v[50:], tail_v)
    assert not torch.equal(buf[:50], tail_w[:50])


@pytest.mark.parametrize("compact", [False, True])
def test_plan_follows_hyper_parameter_changes(compact) -> None:
    gen = torch.Generator().manual_seed(23)
    pair = Pair(_make([(300,), (4, 5)], torch.float32, None, gen), compact=compact)
    schedule = [
        dict(lr=0.05, grad_scale=None), dict(lr=0.01, grad_scale=None), dict(lr=0.01, grad_scale=2.0),
        dict(lr=0.2, grad_scale=8.0),
    ]
    for k, change in enumerate(schedule):
        kw = {**HYPER, **OPTIONS[2], "lr": change["lr"]}  # decoupled decay: the factor 1 - lr*wd moves with lr
        pair.step(_grads(pair.fused_p, gen), grad_scale=change["grad_scale"], **kw)
        pair.check(torch.float32, f"step {k + 1}")
