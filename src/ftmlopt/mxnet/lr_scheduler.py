r"""Learning-rate schedulers, numerically as ``mxnet.lr_scheduler`` (identical in 1.9.1 and 2.0).

A scheduler is called as ``sched(num_update) -> lr`` and is **stateful**: ``base_lr`` and
``count`` change as updates progress, exactly as in MXNet. Any plain callable
``f(num_update) -> lr`` may also be passed to an optimizer as ``lr_scheduler``.

Warmup (all schedulers): for ``n < warmup_steps`` the rate is
``warmup_begin_lr + (base_lr - warmup_begin_lr) * n / warmup_steps`` (``'linear'``) or
``warmup_begin_lr`` (``'constant'``).

Example:
    >>> from ftmlopt.mxnet.lr_scheduler import FactorScheduler
    >>> s = FactorScheduler(step=2, factor=0.5, base_lr=1.0)
    >>> [s(n) for n in range(8)]
    [1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.125]
"""

from __future__ import annotations

import logging
import numbers
from math import cos, pi
from typing import Any

from ftmlopt.rule import check_finite

__all__ = ["CosineScheduler", "FactorScheduler", "LRScheduler", "MultiFactorScheduler", "PolyScheduler"]

_log = logging.getLogger(__name__)


def _as_int(value: Any, name: str) -> int:
    """``value`` as an int; it must be an integer (a bool is not). Typed ``Any``: callers pass user input."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return int(value)


def _check_int(value: Any, name: str, minimum: int) -> int:
    value = _as_int(value, name)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


class LRScheduler:
    """Base class: holds ``base_lr`` and the warmup settings.

    Args:
        base_lr: the rate after warmup.
        warmup_steps: number of warmup updates (an int >= 0).
        warmup_begin_lr: the rate at update 0; must not exceed ``base_lr``.
        warmup_mode: ``'linear'`` or ``'constant'``.
    """

    def __init__(
        self, base_lr: float = 0.01, warmup_steps: int = 0, warmup_begin_lr: float = 0, warmup_mode: str = "linear"
    ) -> None:
        check_finite(base_lr, "base_lr")
        check_finite(warmup_begin_lr, "warmup_begin_lr")
        steps = _as_int(warmup_steps, "warmup_steps")
        self.base_lr = base_lr
        self.warmup_steps = steps
        self.warmup_final_lr = base_lr
        self.warmup_begin_lr = warmup_begin_lr
        if self.warmup_begin_lr > self.warmup_final_lr:
            raise ValueError("Base lr has to be higher than warmup_begin_lr")
        if self.warmup_steps < 0:
            raise ValueError("Warmup steps has to be positive or 0")
        if warmup_mode not in ("linear", "constant"):
            raise ValueError("Supports only linear and constant modes of warmup")
        self.warmup_mode = warmup_mode

    def get_warmup_lr(self, num_update: int) -> float:
        """The warmup rate at ``num_update`` (< ``warmup_steps``)."""
        if not num_update < self.warmup_steps:
            raise ValueError(f"num_update={num_update} is not inside the warmup ({self.warmup_steps} steps)")
        if self.warmup_mode == "linear":
            increase = (self.warmup_final_lr - self.warmup_begin_lr) * float(num_update) / float(self.warmup_steps)
            return self.warmup_begin_lr + increase
        return self.warmup_begin_lr

    def __call__(self, num_update: int) -> float:
        raise NotImplementedError("must override this")


class FactorScheduler(LRScheduler):
    r"""Multiply the rate by ``factor`` every ``step`` updates, never below ``stop_factor_lr``.

    For ``n >= 1`` (no warmup) the rate is ``base_lr * factor ** floor((n - 1) / step)``: the decay
    happens strictly after each step boundary.
    """

    def __init__(
        self,
        step: int,
        factor: float = 1,
        stop_factor_lr: float = 1e-8,
        base_lr: float = 0.01,
        warmup_steps: int = 0,
        warmup_begin_lr: float = 0,
        warmup_mode: str = "linear",
    ) -> None:
        super().__init__(base_lr, warmup_steps, warmup_begin_lr, warmup_mode)
        check_finite(step, "step")
        check_finite(factor, "factor")
        check_finite(stop_factor_lr, "stop_factor_lr")
        if step < 1:
            raise ValueError("Schedule step must be greater or equal than 1 round")
        if factor > 1.0:
            raise ValueError("Factor must be no more than 1 to make lr reduce")
        self.step = step
        self.factor = factor
        self.stop_factor_lr = stop_factor_lr
        self.count = 0

    def __call__(self, num_update: int) -> float:
        if num_update < self.warmup_steps:
            return self.get_warmup_lr(num_update)
        # a loop, not an if: a resumed run may jump several steps at once
        while num_update > self.count + self.step:
            self.count += self.step
            self.base_lr *= self.factor
            if self.base_lr < self.stop_factor_lr:
                self.base_lr = self.stop_factor_lr
                _log.info(
                    "Update[%d]: now learning rate arrived at %0.5e, will not change in the future",
                    num_update,
                    self.base_lr,
                )
            else:
                _log.info("Update[%d]: Change learning rate to %0.5e", num_update, self.base_lr)
        return self.base_lr


class MultiFactorScheduler(LRScheduler):
    """Multiply the rate by ``factor`` each time ``num_update`` passes (strictly) a listed step."""

    def __init__(
        self,
        step: list[int],
        factor: float = 1,
        base_lr: float = 0.01,
        warmup_steps: int = 0,
        warmup_begin_lr: float = 0,
        warmup_mode: str = "linear",
    ) -> None:
        super().__init__(base_lr, warmup_steps, warmup_begin_lr, warmup_mode)
        given: Any = step  # user input: checked at run time whatever the annotation says
        if not isinstance(given, list) or len(given) < 1:
            raise TypeError(f"step must be a non-empty list, got {step!r}")
        for i, s in enumerate(step):
            check_finite(s, f"step[{i}]")
            if i != 0 and step[i] <= step[i - 1]:
                raise ValueError("Schedule step must be an increasing integer list")
            if s < 1:
                raise ValueError("Schedule step must be greater or equal than 1 round")
        check_finite(factor, "factor")
        if factor > 1.0:
            raise ValueError("Factor must be no more than 1 to make lr reduce")
        self.step = step
        self.cur_step_ind = 0
        self.factor = factor
        self.count = 0

    def __call__(self, num_update: int) -> float:
        if num_update < self.warmup_steps:
            return self.get_warmup_lr(num_update)
        while self.cur_step_ind <= len(self.step) - 1:
            if num_update > self.step[self.cur_step_ind]:
                self.count = self.step[self.cur_step_ind]
                self.cur_step_ind += 1
                self.base_lr *= self.factor
                _log.info("Update[%d]: Change learning rate to %0.5e", num_update, self.base_lr)
            else:
                return self.base_lr
        return self.base_lr


class _DecayToFinal(LRScheduler):
    """Shared part of Poly and Cosine: ``final_lr + (base_lr - final_lr) * shape(n)`` up to ``max_update``.

    After ``max_update`` the last computed value is kept (MXNet's behaviour), and an optimizer's
    ``learning_rate`` override of ``base_lr`` is lost at the first call, because the schedule
    starts from ``base_lr_orig`` (MXNet's quirk, kept).
    """

    def __init__(
        self,
        max_update: int,
        base_lr: float,
        final_lr: float,
        warmup_steps: int,
        warmup_begin_lr: float,
        warmup_mode: str,
    ) -> None:
        super().__init__(base_lr, warmup_steps, warmup_begin_lr, warmup_mode)
        _check_int(max_update, "max_update", 1)
        check_finite(final_lr, "final_lr")
        self.base_lr_orig = self.base_lr
        self.max_update = max_update
        self.final_lr = final_lr
        self.max_steps = self.max_update - self.warmup_steps

    def _shape(self, num_update: int) -> float:
        raise NotImplementedError

    def __call__(self, num_update: int) -> float:
        if num_update < self.warmup_steps:
            return self.get_warmup_lr(num_update)
        if num_update <= self.max_update:
            self.base_lr = self.final_lr + (self.base_lr_orig - self.final_lr) * self._shape(num_update)
        return self.base_lr


class PolyScheduler(_DecayToFinal):
    r"""Polynomial decay to ``final_lr`` at ``max_update``:
    ``final_lr + (base_lr - final_lr) * (1 - (n - warmup_steps) / (max_update - warmup_steps)) ** pwr``.
    """

    def __init__(
        self,
        max_update: int,
        base_lr: float = 0.01,
        pwr: float = 2,
        final_lr: float = 0,
        warmup_steps: int = 0,
        warmup_begin_lr: float = 0,
        warmup_mode: str = "linear",
    ) -> None:
        check_finite(pwr, "pwr")
        super().__init__(max_update, base_lr, final_lr, warmup_steps, warmup_begin_lr, warmup_mode)
        self.power = pwr

    def _shape(self, num_update: int) -> float:
        # builtin pow, as MXNet: float ** float is typed Any (it may be complex for a negative base)
        return float(pow(1 - float(num_update - self.warmup_steps) / float(self.max_steps), self.power))


class CosineScheduler(_DecayToFinal):
    r"""Cosine decay to ``final_lr`` at ``max_update``:
    ``final_lr + (base_lr - final_lr) * (1 + cos(pi * (n - warmup_steps) / (max_update - warmup_steps))) / 2``.
    """

    def __init__(
        self,
        max_update: int,
        base_lr: float = 0.01,
        final_lr: float = 0,
        warmup_steps: int = 0,
        warmup_begin_lr: float = 0,
        warmup_mode: str = "linear",
    ) -> None:
        super().__init__(max_update, base_lr, final_lr, warmup_steps, warmup_begin_lr, warmup_mode)

    def _shape(self, num_update: int) -> float:
        # (1 + cos) / 2: halving is exact, so this equals MXNet's ((base - final) * (1 + cos)) / 2
        return (1 + cos(pi * (num_update - self.warmup_steps) / self.max_steps)) / 2
