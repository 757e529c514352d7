r"""FTML for Keras 3, on any backend (tested on JAX and PyTorch).

Importing this module imports ``keras`` (``pip install 'ftmlopt[keras]'``); set
``KERAS_BACKEND`` before that, as Keras requires. ``import ftmlopt`` alone never imports Keras.

Per element, with :math:`t` = ``optimizer.iterations + 1`` and states :math:`d, v, z` starting at 0:

.. math::

    g' &= \mathrm{clip}(g + \lambda w_{t-1},\ c) \\
    v_t &= \beta_2 v_{t-1} + (1-\beta_2)\, g'^2 \\
    d_t &= \frac{1-\beta_1^t}{\eta_t}\Big(\sqrt{v_t/(1-\beta_2^t)} + \epsilon\Big) \\
    z_t &= \beta_1 z_{t-1} + (1-\beta_1)\, g' - (d_t - \beta_1 d_{t-1})\, w_{t-1} \\
    w_t &= -z_t / d_t

:math:`\lambda` is ``coupled_weight_decay`` (MXNet 1.9's ``wd``, added to the gradient inside the
update, before the element-wise clip :math:`c` = ``clip_gradient``). The arithmetic is
:mod:`ftmlopt.core.functional`, shared with the optax front end.

Keras' own arguments keep their Keras meaning and run *before* the update, in Keras' order:
``clipnorm`` / ``clipvalue`` / ``global_clipnorm`` act on the raw gradient (so before the coupled
decay), and ``weight_decay`` is Keras' decoupled decay ``w <- w - w * weight_decay * lr``, applied
to the variables Keras selects (see ``exclude_from_weight_decay``). Because FTML rebuilds the
weight from :math:`z` (:math:`w = -z/d`), the same factor is applied to :math:`z` too; otherwise
the next step would undo most of the decay. ``use_ema``, ``loss_scale_factor`` and
``gradient_accumulation_steps`` work as for every Keras optimizer.
"""

from __future__ import annotations

import numbers
from typing import Any

import keras
from keras import ops

from ftmlopt.core import functional as F
from ftmlopt.core.validation import check_beta, check_epsilon, check_lr, check_nonnegative

__all__ = ["FTML"]


def _check_clip_gradient(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"clip_gradient must be None or a real number, got {value!r} of type {type(value).__name__}")
    x = float(value)
    if not (x > 0.0 and x != float("inf")):
        raise ValueError(f"Invalid clip_gradient: must be None or finite and > 0, got {value!r}")
    return x


@keras.saving.register_keras_serializable(package="ftmlopt")
class FTML(keras.optimizers.Optimizer):
    r"""FTML (Follow the Moving Leader, Zheng & Kwok, ICML 2017) as a Keras 3 optimizer.

    The update is in the module docstring: MXNet 1.9's FTML with epsilon outside the square
    root, coupled L2 (``coupled_weight_decay``) before element-wise clipping (``clip_gradient``).
    Each trainable variable gets three state variables of its shape and dtype: ``d``, ``v``, ``z``.

    Args:
        learning_rate: :math:`\eta`, a float > 0, a
            ``keras.optimizers.schedules.LearningRateSchedule`` or a callable with no arguments.
        beta_1: :math:`\beta_1` in [0, 1).
        beta_2: :math:`\beta_2` in [0, 1).
        epsilon: :math:`\epsilon` >= 0, added outside the square root.
        coupled_weight_decay: :math:`\lambda` >= 0, MXNet's L2 ``wd``: ``g + wd * w`` before clipping.
        clip_gradient: None (off) or a finite bound > 0: element-wise clip of :math:`g'`.
        weight_decay, clipnorm, clipvalue, global_clipnorm, use_ema, ema_momentum,
        ema_overwrite_frequency, loss_scale_factor, gradient_accumulation_steps, name: Keras'
            standard optimizer arguments, with their Keras meaning (``weight_decay`` is decoupled
            and also scales ``z``, see the module docstring).

    Raises:
        TypeError, ValueError: on a bad argument, naming it.

    Example:
        >>> import keras, numpy as np
        >>> from ftmlopt.keras import FTML
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        >>> model.compile(optimizer=FTML(learning_rate=0.01), loss="mse")
        >>> x = np.random.default_rng(0).normal(size=(64, 3)).astype("float32")
        >>> history = model.fit(x, x.sum(1, keepdims=True), epochs=2, verbose=0)
    """

    def __init__(
        self,
        learning_rate: Any = 2.5e-3,
        beta_1: float = 0.6,
        beta_2: float = 0.999,
        epsilon: float = 1e-8,
        coupled_weight_decay: float = 0.0,
        clip_gradient: float | None = None,
        weight_decay: float | None = None,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
        use_ema: bool = False,
        ema_momentum: float = 0.99,
        ema_overwrite_frequency: int | None = None,
        loss_scale_factor: float | None = None,
        gradient_accumulation_steps: int | None = None,
        name: str = "ftml",
        **kwargs: Any,
    ) -> None:
        # Validate everything before Keras creates any variable.
        if isinstance(learning_rate, (numbers.Real, bool)):
            check_lr(learning_rate, "learning_rate")
        check_beta(beta_1, "beta_1")
        check_beta(beta_2, "beta_2")
        check_epsilon(epsilon, "epsilon")
        check_nonnegative(coupled_weight_decay, "coupled_weight_decay")
        clip_gradient = _check_clip_gradient(clip_gradient)
        super().__init__(
            learning_rate=learning_rate,
            name=name,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            **kwargs,
        )
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.epsilon = float(epsilon)
        self.coupled_weight_decay = float(coupled_weight_decay)
        self.clip_gradient = clip_gradient

    def build(self, var_list: list[Any]) -> None:
        """Create the ``d``, ``v`` and ``z`` state variables (zeros) for each trainable variable."""
        if self.built:
            return
        super().build(var_list)
        self._d, self._v, self._z = self.add_optimizer_variables(var_list, ["d", "v", "z"])

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """One FTML step for one variable (called by ``apply``; ``t = iterations + 1``)."""
        dtype = variable.dtype

        def c(x: Any) -> Any:
            return ops.cast(x, dtype)

        s = F.step_scalars(
            lr=c(learning_rate),
            t=c(self.iterations + 1),
            beta1=c(self.beta_1),
            beta2=c(self.beta_2),
            epsilon=c(self.epsilon),
            wd=None if self.coupled_weight_decay == 0.0 else c(self.coupled_weight_decay),
            clip=None if self.clip_gradient is None else c(self.clip_gradient),
        )
        i = self._get_variable_index(variable)
        d, v, z = self._d[i], self._v[i], self._z[i]
        new_w, d_t, v_t, z_t = F.full_step(
            ops.convert_to_tensor(variable),
            c(gradient),
            ops.convert_to_tensor(d),
            ops.convert_to_tensor(v),
            ops.convert_to_tensor(z),
            s,
            sqrt=ops.sqrt,
            clip=ops.clip,
        )
        self.assign(d, d_t)
        self.assign(v, v_t)
        self.assign(z, z_t)
        self.assign(variable, new_w)

    def _apply_weight_decay(self, variables: list[Any]) -> None:
        # Keras' decoupled decay, w <- w - w * wd * lr, on the variables Keras selects; z gets the
        # same factor so that w = -z / d still holds and the next step keeps the decay.
        if self.weight_decay is None:
            return
        for variable in variables:
            if self._use_weight_decay(variable):
                lr = ops.cast(self._get_current_learning_rate(), variable.dtype)
                wd = ops.cast(self.weight_decay, variable.dtype)
                variable.assign(variable - variable * wd * lr)
                z = self._z[self._get_variable_index(variable)]
                z.assign(z - z * wd * lr)

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, for ``from_config`` and ``.keras`` files."""
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "coupled_weight_decay": self.coupled_weight_decay,
                "clip_gradient": self.clip_gradient,
            }
        )
        return config
