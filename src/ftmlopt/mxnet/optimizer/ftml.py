r"""``FTML``: MXNet 1.9's ``mxnet.optimizer.FTML`` over NumPy arrays.

Per update (spec §2.3): count the update, read ``lr`` and ``wd`` (after the count, so a scheduler
sees the new ``num_update``), then call :func:`ftmlopt.ftml_update` in place with
``t = update count of this index``:

.. math::

    d_t = \frac{1-\beta_1^t}{\eta_t}\Big(\sqrt{\frac{v_t}{1-\beta_2^t}} + \epsilon\Big),\quad
    z_t = \beta_1 z_{t-1} + (1-\beta_1) g_t - (d_t - \beta_1 d_{t-1}) w_{t-1},\quad
    w_t = -\frac{z_t}{d_t}

with ``g_t = clip(rescale_grad * grad + wd * w)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ftmlopt.mxnet.operator import fold_gradient, ftml_update
from ftmlopt.mxnet.optimizer.base import Index, Optimizer, checked_rate, register
from ftmlopt.rule import DEFAULT_BETA1, DEFAULT_BETA2, DEFAULT_EPS, check_beta, check_eps, check_finite

__all__ = ["FTML"]


@register
class FTML(Optimizer):
    """The FTML optimizer (Zheng & Kwok, 2017), registered as ``'ftml'``.

    Args:
        beta1: decay of the "leader" average, in [0, 1) (default ``rule.DEFAULT_BETA1``, 0.6).
        beta2: decay of the squared-gradient average, in [0, 1) (default ``rule.DEFAULT_BETA2``, 0.999).
        epsilon: added outside the square root, finite and >= 0 (default ``rule.DEFAULT_EPS``, 1e-8).
        **kwargs: forwarded to :class:`~ftmlopt.mxnet.optimizer.Optimizer` (``learning_rate`` defaults
            to 0.01 there, as in MXNet 1.9; the paper uses 0.0025).

    The state of each weight is ``(d, v, z)``, three zero arrays like the weight.
    ``clip_gradient`` follows MXNet's truthiness rule: ``None`` and ``0`` mean no clipping,
    a positive ``c`` clips to ``[-c, c]`` after weight decay is added, a negative value does
    nothing.

    **lr = 0** (``lr_mult=0``, or a schedule that starts from or reaches 0) follows
    :mod:`ftmlopt.rule`'s convention, "no step": the update is counted, ``v`` takes the gradient
    (:func:`ftmlopt.mxnet.operator.fold_gradient`), and the weight, ``d`` and ``z`` stay as they
    are. MXNet 1.9.1 defines no usable result there: its kernel divides by lr, writing ``d = inf``
    and NaN weights (and ``ftml_update`` here refuses lr 0 for that reason). What MXNet does compute
    at lr 0, the count and ``v``, is kept bit for bit; only the NaN is not. Because ``z = -d w``
    still holds, the next step is the one the rule's compact form takes.

    Example:
        >>> import numpy as np
        >>> from ftmlopt.mxnet.optimizer import FTML
        >>> opt = FTML(learning_rate=0.1)
        >>> w = np.array([1.0, 2.0], dtype=np.float32)
        >>> state = opt.create_state(0, w)
        >>> opt.update(0, w, np.array([0.5, -0.5], dtype=np.float32), state)
        >>> w.round(4)
        array([0.9, 2.1], dtype=float32)
    """

    def __init__(
        self, beta1: float = DEFAULT_BETA1, beta2: float = DEFAULT_BETA2, epsilon: float = DEFAULT_EPS, **kwargs: Any
    ) -> None:
        check_beta(beta1, "beta1")
        check_beta(beta2, "beta2")
        check_eps(epsilon, "epsilon")
        super().__init__(**kwargs)
        self.beta1 = beta1
        self.beta2 = beta2
        self.epsilon = epsilon

    def create_state(self, index: Index, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(d, v, z)``: zeros with the weight's shape and dtype."""
        return (np.zeros_like(weight), np.zeros_like(weight), np.zeros_like(weight))

    def check_update_args(self, index: Index, weight: np.ndarray, grad: np.ndarray, state: Any) -> None:
        """Raise unless ``grad`` and the ``(d, v, z)`` state match the weight's shape and dtype."""
        super().check_update_args(index, weight, grad, state)
        if grad.dtype != weight.dtype:
            raise TypeError(f"grad has dtype {grad.dtype}, which does not match weight's dtype {weight.dtype}")
        if not (isinstance(state, tuple | list) and len(state) == 3):
            raise ValueError(f"FTML state must be a (d, v, z) tuple, got {type(state).__name__}")
        for name, arr in zip("dvz", state):
            if not isinstance(arr, np.ndarray):
                raise TypeError(f"state {name} must be a numpy.ndarray, got {type(arr).__name__}")
            if arr.shape != weight.shape or arr.dtype != weight.dtype:
                raise ValueError(
                    f"state {name} has {arr.dtype} {arr.shape}, expected {weight.dtype} {weight.shape} like the weight"
                )

    def update(self, index: Index, weight: np.ndarray, grad: np.ndarray, state: Any) -> None:
        """One FTML step on ``weight`` (in place); ``state`` is ``(d, v, z)``."""
        self.check_update_args(index, weight, grad, state)
        before = (self._index_update_count.get(index), self.num_update)
        self._update_count(index)
        try:
            lr = checked_rate(self._get_lr(index), f"learning rate for index {index!r}")
            wd = check_finite(self._get_wd(index), f"wd for index {index!r}")
        except (TypeError, ValueError):
            count, self.num_update = before
            if count is None:
                del self._index_update_count[index]
            else:
                self._index_update_count[index] = count
            raise
        d, v, z = state
        if lr == 0.0:  # "no step" (the rule's convention; MXNet would write NaN): only v takes the gradient
            fold_gradient(
                weight, grad, v, beta2=self.beta2, wd=wd, rescale_grad=self.rescale_grad,
                clip_grad=self.clip_gradient if self.clip_gradient else -1.0,
            )
            return
        t = self._index_update_count[index]
        ftml_update(
            weight,
            grad,
            d,
            v,
            z,
            lr=lr,
            t=t,
            beta1=self.beta1,
            beta2=self.beta2,
            epsilon=self.epsilon,
            wd=wd,
            rescale_grad=self.rescale_grad,
            clip_grad=self.clip_gradient if self.clip_gradient else -1.0,
            out=weight,
        )
