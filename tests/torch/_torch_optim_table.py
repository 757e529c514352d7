"""What ``ftmlopt.torch.FTML`` supports, as data (in the spirit of torch's ``OptimizerInfo``).

The generic test bodies in ``test_torch_generic.py`` read this table; they say *how* to check,
the table says *what* to check: the constructor inputs, the implementations to compare with the
for-loop, the dtypes with their tolerances, the LR schedulers, and the inputs that must fail.

Nothing here imports the implementation under test except to name the class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ftmlopt.torch import FTML


@dataclass(frozen=True)
class OptimInput:
    """One constructor configuration (``lr`` etc.; never the cliquey ``foreach``/``fused``/``differentiable``)."""

    kwargs: dict[str, Any]
    desc: str
    #: implementations that accept it (a tensor lr needs capturable on foreach, which needs CUDA).
    impls: tuple[str, ...] = ("forloop", "foreach", "fused")

    def __repr__(self) -> str:  # used in test ids
        return self.desc


@dataclass(frozen=True)
class ErrorInput:
    """Inputs that must raise ``error_type`` matching ``error_regex`` when the optimizer is built."""

    make_params: Callable[[], Any]
    kwargs: dict[str, Any]
    error_type: type[BaseException]
    error_regex: str
    desc: str


@dataclass(frozen=True)
class OptimizerInfo:
    optim_cls: type[torch.optim.Optimizer]
    inputs: tuple[OptimInput, ...]
    error_inputs: tuple[ErrorInput, ...]
    #: schedulers used with the for-loop "goes the right direction" test (each: opt -> scheduler)
    schedulers: tuple[tuple[str, Callable[[torch.optim.Optimizer], Any]], ...]
    #: fast implementations checked against the for-loop, step by step, state included
    fast_impls: tuple[str, ...] = ("foreach", "fused")
    #: dtype -> (rtol, atol) for fast path vs for-loop. float64: only the op order differs (the fused
    #: kernel evaluates MXNet's order, foreach the for-loop's). float32: one rounding of float64
    #: scalars per op. Half types: every path computes in float32 and rounds once, so the states agree
    #: to one or two ulps at most (bfloat16: 2**-8 = 3.9e-3 relative; float16: 2**-11 = 4.9e-4).
    tolerances: dict[torch.dtype, tuple[float, float]] = field(default_factory=dict)
    #: the default (compact) form's state, and MXNet's three-state form's (``compact=False``)
    state_keys: tuple[str, ...] = ("step", "v")
    mxnet_state_keys: tuple[str, ...] = ("step", "d", "v", "z")


def _params() -> list[torch.Tensor]:
    return [torch.nn.Parameter(torch.randn(2, 3)), torch.nn.Parameter(torch.randn(3))]


_p = torch.nn.Parameter(torch.randn(2))

FTML_INFO = OptimizerInfo(
    optim_cls=FTML,
    inputs=(
        # the default, compact (Theorem 1) form: state step, v
        OptimInput({}, "default"),
        OptimInput({"lr": 0.02}, "lr"),
        OptimInput({"lr": torch.tensor(0.02)}, "tensor lr", impls=("forloop", "fused")),
        OptimInput({"betas": (0.9, 0.99), "eps": 1e-6}, "betas eps"),
        OptimInput({"weight_decay": 0.1}, "coupled weight decay"),
        OptimInput({"weight_decay": 0.1, "decoupled_weight_decay": True}, "decoupled weight decay"),
        OptimInput({"clip_gradient": 0.05, "weight_decay": 0.1}, "clip after weight decay"),
        OptimInput({"maximize": True, "weight_decay": 0.1, "clip_gradient": 0.3}, "maximize"),
        # MXNet's three-state form: state step, d, v, z
        OptimInput({"compact": False}, "mxnet"),
        OptimInput({"compact": False, "lr": torch.tensor(0.02)}, "mxnet tensor lr", impls=("forloop", "fused")),
        OptimInput({"compact": False, "weight_decay": 0.1}, "mxnet coupled weight decay"),
        OptimInput({"compact": False, "weight_decay": 0.1, "decoupled_weight_decay": True}, "mxnet decoupled"),
        OptimInput({"compact": False, "maximize": True, "clip_gradient": 0.05}, "mxnet maximize clip"),
    ),
    error_inputs=(
        ErrorInput(lambda: torch.nn.Parameter(torch.randn(2)), {}, TypeError,
                   "params argument given to the optimizer should be an iterable of Tensors or dicts", "bare tensor"),
        ErrorInput(lambda: [_p, _p], {}, UserWarning, "duplicate parameters", "duplicate params"),
        ErrorInput(lambda: [{"params": [_p]}, {"params": [_p]}], {}, ValueError,
                   "some parameters appear in more than one parameter group", "param in two groups"),
        # torch's exact wording, "Invalid <what>: <value>" (the whole message is matched)
        ErrorInput(_params, {"lr": -0.01}, ValueError, r"^Invalid learning rate: -0\.01$", "negative lr"),
        ErrorInput(_params, {"lr": -1.0}, ValueError, r"^Invalid learning rate: -1\.0$", "lr -1"),
        ErrorInput(_params, {"lr": float("nan")}, ValueError, r"^Invalid learning rate: nan$", "nan lr"),
        ErrorInput(_params, {"lr": float("inf")}, ValueError, r"^Invalid learning rate: inf$", "inf lr"),
        ErrorInput(_params, {"lr": torch.tensor(-1.0)}, ValueError, r"^Invalid learning rate: -1\.0$", "tensor lr -1"),
        ErrorInput(_params, {"lr": "0.1"}, TypeError, "^learning rate must be a real number", "string lr"),
        ErrorInput(_params, {"lr": torch.tensor([0.1, 0.2])}, ValueError, "^Tensor lr must be 1-element$", "2-elem lr"),
        ErrorInput(_params, {"betas": (1.0, 0.999)}, ValueError, r"^Invalid beta parameter at index 0: 1\.0$",
                   "beta1 = 1"),
        ErrorInput(_params, {"betas": (0.6, -0.1)}, ValueError, r"^Invalid beta parameter at index 1: -0\.1$",
                   "negative beta2"),
        ErrorInput(_params, {"betas": (0.6, 1.5)}, ValueError, r"^Invalid beta parameter at index 1: 1\.5$",
                   "beta2 > 1"),
        ErrorInput(_params, {"betas": 0.6}, TypeError, "betas must be a pair", "scalar betas"),
        ErrorInput(_params, {"eps": -1e-8}, ValueError, r"^Invalid epsilon value: -1e-08$", "negative eps"),
        ErrorInput(_params, {"eps": -1}, ValueError, r"^Invalid epsilon value: -1$", "eps -1"),
        ErrorInput(_params, {"weight_decay": -1.0}, ValueError, r"^Invalid weight_decay value: -1\.0$",
                   "negative weight decay"),
        ErrorInput(_params, {"clip_gradient": 0.0}, ValueError, r"^Invalid clip_gradient value: 0\.0 \(use None",
                   "zero clip"),
        ErrorInput(_params, {"clip_gradient": -1.0}, ValueError, r"^Invalid clip_gradient value: -1\.0 ",
                   "negative clip"),
        ErrorInput(_params, {"clip_gradient": float("inf")}, ValueError, r"^Invalid clip_gradient value: inf ",
                   "inf clip"),
        ErrorInput(_params, {"compact": 1}, TypeError, "compact must be a bool", "int flag"),
        ErrorInput(_params, {"fused": True, "foreach": True}, RuntimeError,
                   "`fused` and `foreach` cannot be `True` together", "fused and foreach"),
        ErrorInput(_params, {"fused": True, "differentiable": True}, RuntimeError,
                   "`fused` does not support `differentiable`", "fused differentiable"),
        ErrorInput(_params, {"lr": torch.tensor(0.1), "foreach": True}, ValueError,
                   "lr as a Tensor is not supported for capturable=False and foreach=True", "tensor lr foreach"),
    ),
    schedulers=(
        ("StepLR", lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)),
        ("CosineAnnealingLR", lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)),
        ("OneCycleLR", lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=25,
                                                                       cycle_momentum=False)),
        ("LambdaLR", lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.95**epoch)),
    ),
    tolerances={
        torch.float64: (1e-11, 1e-13),
        torch.float32: (2e-5, 1e-6),
        torch.bfloat16: (1e-2, 1e-2),
        torch.float16: (2e-3, 2e-3),
    },
)
