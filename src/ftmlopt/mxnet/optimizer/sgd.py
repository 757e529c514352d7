r"""``SGD``: plain (momentum) SGD with MXNet 1.x semantics, the baseline of the NumPy demo.

.. math::

    m \leftarrow \mu m - \eta\,(\mathrm{clip}(s\,g) + \lambda w), \qquad w \leftarrow w + m

(with ``momentum=0``: ``w <- w - lr * (clip(rescale_grad * g) + wd * w)``). Computed with
NumPy in the weight's dtype; it is a baseline, not a bit-exact port of ``sgd_update``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ftmlopt.mxnet.optimizer.base import Index, Optimizer, checked_rate, register
from ftmlopt.rule import check_beta, check_finite

__all__ = ["SGD"]


@register
class SGD(Optimizer):
    """Stochastic gradient descent, optionally with momentum; registered as ``'sgd'``.

    ``clip_gradient`` follows MXNet's rule: ``c > 0`` clips ``rescale_grad * grad`` to ``[-c, c]``;
    ``None``, ``0`` and negative values mean no clipping.

    Example:
        >>> import numpy as np
        >>> from ftmlopt.mxnet.optimizer import SGD
        >>> opt = SGD(learning_rate=0.5)
        >>> w = np.array([1.0])
        >>> opt.update(0, w, np.array([2.0]), opt.create_state(0, w))
        >>> w
        array([0.])
    """

    def __init__(self, momentum: float = 0.0, **kwargs: Any) -> None:
        check_beta(momentum, "momentum")
        super().__init__(**kwargs)
        self.momentum = momentum

    def create_state(self, index: Index, weight: np.ndarray) -> np.ndarray | None:
        """A zero momentum buffer, or ``None`` without momentum."""
        return np.zeros_like(weight) if self.momentum else None

    def update(self, index: Index, weight: np.ndarray, grad: np.ndarray, state: Any) -> None:
        """One SGD step on ``weight`` in place."""
        self.check_update_args(index, weight, grad, state)
        if self.momentum and not (isinstance(state, np.ndarray) and state.shape == weight.shape):
            raise ValueError("SGD with momentum needs a momentum array shaped like the weight as its state")
        self._update_count(index)
        lr = checked_rate(self._get_lr(index), "learning rate")
        wd = check_finite(self._get_wd(index), "wd")
        g = grad * self.rescale_grad
        if self.clip_gradient and self.clip_gradient > 0:
            # MXNet's SGD passes clip_gradient to its kernel only when it is truthy, and the kernel
            # clips only when it is >= 0: so None, 0 and negative values all mean "no clipping".
            np.clip(g, -self.clip_gradient, self.clip_gradient, out=g)
        step = -lr * (g + wd * weight)
        if self.momentum:
            state *= self.momentum
            state += step
            step = state
        weight += step.astype(weight.dtype, copy=False)
