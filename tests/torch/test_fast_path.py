"""``FTML.step``'s fast path (:mod:`ftmlopt.torch._fast_path`) against the documented path, bit for bit.

Every test steps two optimizers over identical copies of the same params: ``fast`` as users get
it, and ``documented``, whose record is dropped after each step so that every step goes through
the validation loop, ``_init_group`` and the functional. A spy counts the steps the fast path
took. Each change that must end the fast path is made to both twins between steps; the step
after it must go the documented way (or raise the documented error before anything changes),
and both twins must stay identical to the bit.
"""

from __future__ import annotations

import copy
import itertools
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest
import torch

from ftmlopt.torch import FTML, _fast_path

SHAPES = [(70,), (3, 5), (1,), (8, 8)]


@pytest.fixture
def fast_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many group steps the fast path took (its step still runs)."""
    taken: list[int] = []
    real = _fast_path.FastGroup.step

    def spy(self: Any, *args: Any, **kwargs: Any) -> None:
        taken.append(1)
        real(self, *args, **kwargs)

    monkeypatch.setattr(_fast_path.FastGroup, "step", spy)
    return taken


def _params(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]


class Twins:
    """Two optimizers over equal params: ``fast`` (fast path allowed) and ``documented`` (never)."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float32, **kw: Any) -> None:
        self.ps, self.qs = _params(seed, dtype), _params(seed, dtype)
        kw.setdefault("fused", True)
        self.fast, self.documented = FTML(self.ps, **kw), FTML(self.qs, **kw)
        self.gen = torch.Generator().manual_seed(seed + 1)

    def both(self, fn: Callable[[FTML, list[torch.nn.Parameter]], Any]) -> None:
        fn(self.fast, self.ps)
        fn(self.documented, self.qs)

    def grads(self, scale: float = 1.0, skip: tuple[int, ...] = ()) -> None:
        """Fresh gradient tensors (as after ``zero_grad(set_to_none=True)``), equal in both twins."""
        for i, (p, q) in enumerate(zip(self.ps, self.qs)):
            if i in skip:
                p.grad = q.grad = None
                continue
            g = torch.randn(p.shape, generator=self.gen).to(p.dtype) * scale
            p.grad, q.grad = g.clone(), g.clone()

    def step(self) -> None:
        self.fast.step()
        self.documented.step()
        self.documented._fast_groups = None  # the documented path again next time

    def check(self) -> None:
        for p, q in zip(self.ps, self.qs):
            assert torch.equal(p, q)
            assert (p.grad is None) == (q.grad is None)
            if p.grad is not None:
                assert torch.equal(p.grad, q.grad)
            assert self.fast.state[p].keys() == self.documented.state[q].keys()
            for key, value in self.fast.state[p].items():
                other = self.documented.state[q][key]
                assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key


def _run(twins: Twins, steps: int, **grad_kw: Any) -> None:
    for _ in range(steps):
        twins.grads(**grad_kw)
        twins.step()
        twins.check()


FORMS = [
    {},
    {"compact": False},
    {"weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True},
    {"weight_decay": 0.01, "clip_gradient": 0.5},
    {"compact": False, "weight_decay": 0.01, "clip_gradient": 0.5, "maximize": True},
    {"state_dtype": torch.float64},
    {"fused": None},  # the default dispatch: fused on the CPU
]


@pytest.mark.parametrize("kw", FORMS)
def test_fast_path_is_taken_and_gives_the_documented_bits(fast_steps: list[int], kw: dict[str, Any]) -> None:
    twins = Twins(lr=0.01, **kw)
    _run(twins, 5)
    assert len(fast_steps) == 4  # every step after the first


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes(fast_steps: list[int], dtype: torch.dtype) -> None:
    twins = Twins(dtype=dtype, lr=0.01)
    _run(twins, 4)
    assert len(fast_steps) == 3


@pytest.mark.parametrize("kw", [{"state_bits": 8}, {"state_bits": 4}, {"multi_precision": True}])
def test_low_bit_and_master_groups_stay_on_the_documented_path(fast_steps: list[int], kw: dict[str, Any]) -> None:
    twins = Twins(lr=0.01, **kw)
    twins.ps.append(torch.nn.Parameter(torch.randn(64, 128)))  # large enough for low-bit state
    twins.qs.append(torch.nn.Parameter(twins.ps[-1].detach().clone()))
    twins.fast.add_param_group({"params": [twins.ps[-1]]})
    twins.documented.add_param_group({"params": [twins.qs[-1]]})
    _run(twins, 3)
    assert len(fast_steps) == 0 if "state_bits" in kw else len(fast_steps) == 4  # float32 params: no master


def test_fast_path_matches_the_for_loop() -> None:
    ps = _params(3)
    qs = _params(3)
    fast, loop = FTML(ps, lr=0.01, fused=True), FTML(qs, lr=0.01, foreach=False, fused=False)
    gen = torch.Generator().manual_seed(4)
    for _ in range(4):
        for p, q in zip(ps, qs):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        fast.step()
        loop.step()
    assert fast._fast_groups[0] is not None
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=1e-6)


# ----------------------------------------------------------------------------- what ends the fast path
def _set(key: str, value: Any) -> Callable[[FTML, list], None]:
    def change(opt: FTML, ps: list) -> None:
        opt.param_groups[0][key] = value

    return change


def _data_elsewhere(opt: FTML, ps: list) -> None:
    ps[0].data = ps[0].data.clone()  # same values, another address


def _state_replaced(opt: FTML, ps: list) -> None:
    opt.state[ps[1]] = {k: v.clone() for k, v in opt.state[ps[1]].items()}


def _state_tensor_replaced(opt: FTML, ps: list) -> None:
    opt.state[ps[1]]["v"] = opt.state[ps[1]]["v"].clone()


def _reload(opt: FTML, ps: list) -> None:
    opt.load_state_dict(opt.state_dict())


def _param_appended(opt: FTML, ps: list) -> None:
    p = torch.nn.Parameter(torch.ones(6))
    ps.append(p)
    opt.param_groups[0]["params"].append(p)


def _transposed(opt: FTML, ps: list) -> None:
    ps[3].data = ps[3].data.t()  # same address and size, not contiguous


def _state_mapping_copied(opt: FTML, ps: list) -> None:
    opt.state = defaultdict(dict, opt.state)  # the same dicts and tensors in a new mapping


def _state_dict_copied(opt: FTML, ps: list) -> None:
    opt.state[ps[2]] = dict(opt.state[ps[2]])  # the same tensors in a new dict


def _extra_state_entry(opt: FTML, ps: list) -> None:
    opt.state[ps[2]]["note"] = 1


def _param_replaced_in_the_group(opt: FTML, ps: list) -> None:
    ps[1] = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 15).reshape(3, 5))
    opt.param_groups[0]["params"][1] = ps[1]


# (change, whether the step right after it may still take the fast path, whether later steps may again)
CHANGES: dict[str, tuple[Callable[[FTML, list], None], bool, bool]] = {
    "lr": (_set("lr", 0.02), True, True),  # numbers: checked again, then the same kernel
    "lr as int": (_set("lr", 1), False, True),  # another type: checked on the documented path first
    "betas": (_set("betas", (0.7, 0.99)), True, True),
    "eps": (_set("eps", 1e-6), True, True),
    "weight_decay on": (_set("weight_decay", 0.1), False, True),  # another kernel
    "clip on": (_set("clip_gradient", 0.1), False, True),
    "maximize": (_set("maximize", True), False, True),
    "decoupled": (_set("decoupled_weight_decay", True), False, True),
    "foreach": (_set("fused", False), False, False),
    "lr as tensor": (_set("lr", torch.tensor(0.01)), False, False),
    "param data moved": (_data_elsewhere, False, True),
    "param transposed in place": (_transposed, False, False),  # stepped through a contiguous copy from now on
    "state dict replaced": (_state_replaced, False, True),
    "state tensor replaced": (_state_tensor_replaced, False, True),
    "load_state_dict": (_reload, False, True),
    "param appended to the group": (_param_appended, False, True),
    "param replaced in the group": (_param_replaced_in_the_group, False, True),
    "state mapping copied": (_state_mapping_copied, False, True),
    "state dict copied": (_state_dict_copied, False, True),
    "extra state entry": (_extra_state_entry, False, False),  # not recorded while it is there
}


@pytest.mark.parametrize("name", list(CHANGES))
def test_a_change_ends_the_fast_path_and_both_paths_agree(fast_steps: list[int], name: str) -> None:
    change, stays, resumes = CHANGES[name]
    twins = Twins(lr=0.01, weight_decay=0.0)
    _run(twins, 3)
    assert len(fast_steps) == 2
    twins.both(change)
    _run(twins, 1)
    assert len(fast_steps) == (3 if stays else 2), name
    _run(twins, 2)  # recorded again after a documented step
    assert len(fast_steps) == (3 if stays else 2) + (2 if resumes else 0), name


def test_gradients_gone_or_back(fast_steps: list[int]) -> None:
    twins = Twins(lr=0.01)
    _run(twins, 2)
    assert len(fast_steps) == 1
    _run(twins, 1, skip=(1, 2))  # some params without a gradient this step: steps per tensor now differ
    assert len(fast_steps) == 1
    _run(twins, 2, skip=(1, 2))  # the same params without a gradient: recorded, and taken again
    assert len(fast_steps) == 3
    _run(twins, 2)  # all back: documented, then fast
    assert len(fast_steps) == 4
    _run(twins, 1, skip=(0,))
    assert len(fast_steps) == 4


def test_zero_grad_fresh_tensors_and_set_to_none_false(fast_steps: list[int]) -> None:
    twins = Twins(lr=0.01)
    _run(twins, 2)
    for _ in range(2):
        twins.both(lambda opt, ps: opt.zero_grad(set_to_none=False))  # same gradient tensors, zeroed
        for p, q in zip(twins.ps, twins.qs):
            g = torch.randn(p.shape, generator=twins.gen)
            p.grad.add_(g)
            q.grad.add_(g)
        twins.step()
        twins.check()
    assert len(fast_steps) == 3


def test_add_param_group_gets_its_own_record(fast_steps: list[int]) -> None:
    twins = Twins(lr=0.01)
    _run(twins, 2)
    extra_p, extra_q = torch.nn.Parameter(torch.randn(12)), None
    extra_q = torch.nn.Parameter(extra_p.detach().clone())
    twins.ps.append(extra_p)
    twins.qs.append(extra_q)
    twins.fast.add_param_group({"params": [extra_p], "lr": 0.03})
    twins.documented.add_param_group({"params": [extra_q], "lr": 0.03})
    _run(twins, 1)
    assert len(fast_steps) == 2  # the old group's fast step, the new group's documented one
    _run(twins, 1)
    assert len(fast_steps) == 4


def test_grad_scaler_protocol(fast_steps: list[int]) -> None:
    """GradScaler's fused protocol (``grad_scale``/``found_inf`` set on the optimizer for one step)."""
    twins = Twins(lr=0.01)
    _run(twins, 2)

    def scaled_step(found: float) -> None:
        for opt in (twins.fast, twins.documented):
            opt.grad_scale, opt.found_inf = torch.tensor(64.0), torch.tensor(found)
        twins.step()
        for opt in (twins.fast, twins.documented):
            del opt.grad_scale, opt.found_inf
        twins.check()

    twins.grads(scale=64.0)
    scaled_step(0.0)  # scale appears: documented path
    assert len(fast_steps) == 1
    twins.grads(scale=64.0)
    scaled_step(0.0)  # scaled again: fast, and the unscaled gradients are written back on both
    assert len(fast_steps) == 2
    before = [t.clone() for p in twins.ps for t in (p, *twins.fast.state[p].values())]
    versions = [p._version for p in twins.ps]
    twins.grads(scale=64.0)
    scaled_step(1.0)  # an inf: nothing changes (fast path, step skipped)
    assert len(fast_steps) == 3
    after = [t for p in twins.ps for t in (p, *twins.fast.state[p].values())]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(p._version > v for p, v in zip(twins.ps, versions))  # as the documented path bumps them
    _run(twins, 2)  # scale gone: documented, then fast
    assert len(fast_steps) == 4


def test_mxnet_form_at_lr_0_goes_the_documented_way(fast_steps: list[int]) -> None:
    twins = Twins(lr=0.01, compact=False)
    _run(twins, 2)
    twins.both(_set("lr", 0.0))
    _run(twins, 2)  # the lr-0 MXNet step is the foreach path's
    assert len(fast_steps) == 1
    twins.both(_set("lr", 0.01))
    _run(twins, 2)
    assert len(fast_steps) == 2


# ----------------------------------------------------------------------------- errors before any change
def _snapshot(opt: FTML, ps: list) -> list[torch.Tensor]:
    return [t.clone() for p in ps for t in itertools.chain((p,), opt.state[p].values()) if torch.is_tensor(t)]


def _unchanged(before: list[torch.Tensor], opt: FTML, ps: list) -> bool:
    after = [t for p in ps for t in itertools.chain((p,), opt.state[p].values()) if torch.is_tensor(t)]
    return len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))


def _sparse_grad(opt: FTML, ps: list) -> None:
    ps[3].grad = ps[3].grad.to_sparse()


def _negative_lr(opt: FTML, ps: list) -> None:
    opt.param_groups[0]["lr"] = -1.0


def _nan_beta(opt: FTML, ps: list) -> None:
    opt.param_groups[0]["betas"] = (float("nan"), 0.999)


def _dtype_changed(opt: FTML, ps: list) -> None:
    ps[3].data = ps[3].data.double()
    ps[3].grad = ps[3].grad.double()


def _grad_not_contiguous(opt: FTML, ps: list) -> None:
    ps[3].grad = ps[3].grad.t().contiguous().t()  # stepped through a staging copy: no error, no fast path


def _reinterpreted(opt: FTML, ps: list) -> None:
    ps[3].requires_grad_(False)  # (torch refuses integer data for a param that requires grad)
    ps[3].data = ps[3].data.view(torch.int32)  # same address and size, another dtype


def _resized_in_place(opt: FTML, ps: list) -> None:
    ps[3].data = ps[3].data.view(-1)[:10]  # same address, 10 of its 64 elements
    ps[3].grad = torch.ones(10)


def _wrong_state_loaded(opt: FTML, ps: list) -> None:
    sd = copy.deepcopy(opt.state_dict())  # (state_dict() shares the state dicts)
    sd["state"][3]["v"] = torch.zeros(5)
    opt.load_state_dict(sd)


def _wrong_state_by_hand(opt: FTML, ps: list) -> None:
    opt.state[ps[3]]["v"] = torch.zeros(5)


def _grad_of_another_size(opt: FTML, ps: list) -> None:
    ps[3].data = torch.zeros(10)  # the param resized by hand (its state still has 64 elements)
    ps[3].grad = torch.ones(10)


class _Sub(torch.Tensor):
    pass


ERRORS: dict[str, tuple[Callable[[FTML, list], None], type[Exception], str]] = {
    "sparse gradient": (_sparse_grad, RuntimeError, "^FTML does not support sparse gradients$"),
    "sparse gradient by hand": (lambda opt, ps: setattr(ps[0], "grad", ps[0].grad.to_sparse()), RuntimeError,
                                "^FTML does not support sparse gradients$"),
    "gradient of a tensor subclass": (lambda opt, ps: setattr(ps[1], "grad", ps[1].grad.as_subclass(_Sub)),
                                      TypeError, "tensor subclasses are not supported"),
    "weight_decay False": (_set("weight_decay", False), TypeError, "weight_decay value must be a real number"),
    "lr < 0": (_negative_lr, ValueError, "Invalid learning rate: -1.0"),
    "nan beta": (_nan_beta, ValueError, "Invalid beta parameter"),
    "param dtype changed": (_dtype_changed, RuntimeError, "dtype changed"),
    "param reinterpreted in place": (_reinterpreted, TypeError, "floating-point or complex parameters"),
    "param resized in place": (_resized_in_place, ValueError, "does not belong"),
    "wrong state loaded": (_wrong_state_loaded, ValueError, r"state 'v' of param 3 .* must be"),  # at load
    "wrong state by hand": (_wrong_state_by_hand, ValueError, "does not belong"),
    "param resized": (_grad_of_another_size, ValueError, "does not belong"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_input_raises_before_anything_changes(fast_steps: list[int], name: str) -> None:
    change, error, match = ERRORS[name]
    ps = _params(7)
    opt = FTML(ps, lr=0.01, fused=True)
    gen = torch.Generator().manual_seed(8)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    assert len(fast_steps) == 2
    before = _snapshot(opt, ps)
    with pytest.raises(error, match=match):
        change(opt, ps)
        before = _snapshot(opt, ps)  # (what a change that does not raise itself changed)
        opt.step()
    steps = [float(opt.state[p]["step"]) for p in ps]
    assert steps == [3.0] * len(ps)
    assert _unchanged(before, opt, ps), name
    assert len(fast_steps) == 2


def test_a_non_contiguous_gradient_is_staged_not_fast(fast_steps: list[int]) -> None:
    twins = Twins(lr=0.01)
    _run(twins, 2)
    twins.grads()
    twins.both(_grad_not_contiguous)
    twins.step()
    twins.check()
    assert len(fast_steps) == 1


def test_an_error_in_a_later_group_leaves_the_fast_group_unchanged(fast_steps: list[int]) -> None:
    ps, qs = _params(9), _params(10)
    opt = FTML([{"params": ps}, {"params": qs}], lr=0.01, fused=True)
    for _ in range(3):
        for p in ps + qs:
            p.grad = torch.randn(p.shape)
        opt.step()
    assert len(fast_steps) == 4
    qs[0].grad = qs[0].grad.to_sparse()
    before = _snapshot(opt, ps)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert _unchanged(before, opt, ps)


# ----------------------------------------------------------------------------- tracing
def test_compiled_step_stays_one_registered_op_after_eager_fast_steps(fast_steps: list[int]) -> None:
    twins = Twins(lr=0.01)
    _run(twins, 3)
    assert len(fast_steps) == 2
    graphs = []

    def backend(gm: Any, example_inputs: Any) -> Any:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(twins.fast.step, backend=backend)
    for _ in range(2):
        twins.grads()
        compiled()
        twins.documented.step()
        twins.documented._fast_groups = None
        twins.check()
    calls = [n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert calls.count(torch.ops.ftmlopt.fused_ftml_.default) >= 1
    assert len(fast_steps) == 2  # the compiled steps never took it


def test_a_dispatch_mode_sees_the_registered_op(fast_steps: list[int]) -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[Any] = []

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    twins = Twins(lr=0.01)
    _run(twins, 3)
    assert len(fast_steps) == 2
    twins.grads()
    with Log() as log:
        twins.step()
    twins.check()
    assert torch.ops.ftmlopt.fused_ftml_.default in log.ops
    assert len(fast_steps) == 2
