r"""FTML for Keras 3, on any backend (tested on JAX, PyTorch and TensorFlow).

Importing this module imports ``keras`` (``pip install 'ftmlopt[keras]'``); set
``KERAS_BACKEND`` before that, as Keras requires. ``import ftmlopt`` alone never imports Keras.

The rule is :mod:`ftmlopt.rule`. Per element, with :math:`t` = ``optimizer.iterations + 1``:

.. math::

    g' &= \mathrm{clip}(g + \lambda w_{t-1},\ c), \qquad
    v_t = \beta_2 v_{t-1} + (1-\beta_2)\, g'^2 \\
    w_t &= w_{t-1} - \frac{\eta_t(1-\beta_1)}{1-\beta_1^t}\,
           \frac{g'}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}

That is the **compact** form (the default; state ``v``). ``compact=False`` gives MXNet's
three-state form (``d, v, z``, :math:`w = -z/d`), equal to it while nothing else writes the
weights; it is evaluated in :func:`ftmlopt.rule.mxnet_step`'s stable order. :math:`\lambda` is
``coupled_weight_decay`` (MXNet 1.9's ``wd``), :math:`c` is ``clip_gradient``.

Keras' own arguments keep their Keras meaning and run *before* the update, in Keras' order:
``clipnorm`` / ``clipvalue`` / ``global_clipnorm`` act on the raw gradient, and ``weight_decay``
is Keras' decoupled decay ``w <- w - w * weight_decay * lr`` on the variables Keras selects; in the
MXNet form ``z`` gets the same factor (otherwise the next step would undo most of the decay).
``use_ema``, ``loss_scale_factor``, ``gradient_accumulation_steps`` and ``LossScaleOptimizer``
work as for every Keras optimizer; sparse gradients (TensorFlow's ``IndexedSlices`` from an
``Embedding``, JAX's ``BCOO``, torch's sparse layouts) are made dense, since FTML's ``v`` decays
everywhere: the step equals the one for the same gradient given dense.

**lr 0 is "no step"** (a schedule that warms up from 0): the weights do not move, ``v`` takes
the gradient in, and Keras counts the step as it always does. float16/bfloat16 variables are
computed in float32 and rounded once; their state is float32 unless ``state_dtype`` says
otherwise, and a float64 ``state_dtype`` makes the step float64
(:func:`ftmlopt.rule.compute_dtype`). Hyper-parameters are combined in float64 (the betas in the
compute dtype, as ``beta**t`` is) and cast to the compute dtype, never to a half type.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from ftmlopt import rule

__all__ = ["FTML"]


def _dense(gradient: Any) -> Any:
    """A dense tensor for any gradient a Keras backend hands over.

    FTML's ``v`` decays everywhere (``v <- b2 v + (1 - b2) g'^2`` touches every row), so a sparse
    gradient is a dense one with zero rows, and the step is written for dense tensors
    (:mod:`ftmlopt.rule` uses ``+ - * /``; JAX's ``BCOO`` has no sparse-minus-dense). TensorFlow's
    ``IndexedSlices`` (an ``Embedding``'s gradient) and ``SparseTensor``, JAX's ``BCOO``/``BCSR``
    and torch's sparse layouts are all scattered out.
    """
    if type(gradient).__name__ == "IndexedSlices":
        import tensorflow as tf  # only the TensorFlow backend makes IndexedSlices

        return tf.convert_to_tensor(gradient)
    if type(gradient).__module__.startswith("torch") and str(getattr(gradient, "layout", "")) != "torch.strided":
        return gradient.to_dense()  # torch's sparse layouts: Keras' torch backend passes them through as they are
    return ops.convert_to_tensor(gradient, sparse=False)


@keras.saving.register_keras_serializable(package="ftmlopt")
class FTML(keras.optimizers.Optimizer):
    r"""FTML (Follow the Moving Leader, Zheng & Kwok, ICML 2017) as a Keras 3 optimizer.

    The update is in the module docstring and :mod:`ftmlopt.rule`.

    Args:
        learning_rate: :math:`\eta` >= 0 (0: no step), a
            ``keras.optimizers.schedules.LearningRateSchedule`` or a callable with no arguments.
        beta_1: :math:`\beta_1` in [0, 1).
        beta_2: :math:`\beta_2` in [0, 1).
        epsilon: :math:`\epsilon` >= 0, added outside the square root.
        coupled_weight_decay: :math:`\lambda` >= 0, MXNet's L2 ``wd``: ``g + wd * w`` before clipping.
        clip_gradient: None (off) or a finite bound > 0: element-wise clip of :math:`g'`.
        compact: True (default): the compact form, one state ``v`` per variable. False: MXNet's
            three-state form, ``d, v, z``.
        state_dtype: dtype of the state variables; None: the variable's dtype, float32 for
            float16/bfloat16 variables.
        weight_decay, clipnorm, clipvalue, global_clipnorm, use_ema, ema_momentum: Keras' standard
            optimizer arguments, with their Keras meaning.
        ema_overwrite_frequency, loss_scale_factor, gradient_accumulation_steps, name: the same
            (``name`` None: ``"ftml"``, ``"ftml_1"``, ... as Keras numbers its own optimizers).

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
        learning_rate: Any = rule.DEFAULT_LR,
        beta_1: float = rule.DEFAULT_BETA1,
        beta_2: float = rule.DEFAULT_BETA2,
        epsilon: float = rule.DEFAULT_EPS,
        coupled_weight_decay: float = 0.0,
        clip_gradient: float | None = None,
        compact: bool = True,
        state_dtype: str | None = None,
        weight_decay: float | None = None,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
        use_ema: bool = False,
        ema_momentum: float = 0.99,
        ema_overwrite_frequency: int | None = None,
        loss_scale_factor: float | None = None,
        gradient_accumulation_steps: int | None = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        # Validate everything before Keras creates any variable.
        if not callable(learning_rate) and not isinstance(learning_rate, keras.Variable):
            rule.check_lr(learning_rate, "learning_rate")
        beta_1 = rule.check_beta(beta_1, "beta_1")
        beta_2 = rule.check_beta(beta_2, "beta_2")
        epsilon = rule.check_eps(epsilon, "epsilon")
        coupled_weight_decay = rule.check_weight_decay(coupled_weight_decay, "coupled_weight_decay")
        clip = rule.check_clip(clip_gradient, "clip_gradient")
        compact = rule.check_bool(compact, "compact")
        state_dtype = rule.check_state_dtype(state_dtype, "state_dtype")
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
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.coupled_weight_decay = coupled_weight_decay
        self.clip_gradient = clip
        self.compact = compact
        self.state_dtype = state_dtype

    def build(self, var_list: list[Any]) -> None:
        """Create the state variables (zeros): ``v`` per trainable variable, and ``d``, ``z`` in the MXNet form."""
        if self.built:
            return
        super().build(var_list)
        names = ["v"] if self.compact else ["d", "v", "z"]
        for state in names:
            setattr(self, f"_{state}", [self._state_variable(var, state) for var in var_list])

    def _state_variable(self, variable: Any, state: str) -> Any:
        dtype = rule.state_dtype(variable.dtype, self.state_dtype)
        path = getattr(variable, "path", None) or str(variable.name)
        # The state is laid out like its variable under a Keras distribution. `layout=` is passed only
        # then: add_variable takes it from Keras 3.10 on, and the floor is older (docs/versions.md).
        layout = getattr(variable, "_layout", None)
        return self.add_variable(
            shape=variable.shape,
            initializer="zeros",
            dtype=dtype,
            name=f"{path.replace('/', '_').replace(':', '_')}_{state}",
            **({} if layout is None else {"layout": layout}),
        )

    def _constants(self, learning_rate: Any, ct: str) -> rule.Constants:
        def tensor(x: Any) -> Any:
            return ops.convert_to_tensor(x, dtype=ct) if isinstance(x, float | int) else ops.cast(x, ct)

        # t counts FTML steps: with gradient accumulation Keras' `iterations` already counts
        # accumulated steps, not micro-steps.
        c = rule.constants(
            lr=ops.cast(learning_rate, ct),
            t=ops.cast(self.iterations + 1, ct),
            # betas in the compute dtype, as beta**t is: 1 - beta and 1 - beta**t from the same beta
            beta1=ops.convert_to_tensor(self.beta_1, dtype=ct),
            beta2=ops.convert_to_tensor(self.beta_2, dtype=ct),
            eps=self.epsilon,
            weight_decay=self.coupled_weight_decay,
            clip=self.clip_gradient,
            power=ops.power,
        )
        return c.cast(tensor)

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """One FTML step for one variable (called by ``apply``; ``t = iterations + 1``)."""
        i = self._get_variable_index(variable)
        ct = rule.compute_dtype(variable.dtype, self._v[i].dtype)
        c = self._constants(learning_rate, ct)
        g = ops.cast(_dense(gradient), ct)
        w = ops.cast(ops.convert_to_tensor(variable), ct)
        v = self._v[i]
        v0 = ops.cast(ops.convert_to_tensor(v), ct)
        if self.compact:
            new_w, v_t = rule.compact_step(w, g, v0, c, sqrt=ops.sqrt, clip=ops.clip)
        else:
            d, z = self._d[i], self._z[i]
            new_w, d_t, v_t, z_t = rule.mxnet_step(
                w,
                g,
                ops.cast(ops.convert_to_tensor(d), ct),
                v0,
                ops.cast(ops.convert_to_tensor(z), ct),
                c,
                sqrt=ops.sqrt,
                clip=ops.clip,
                where=ops.where,
                stable=True,
            )
            self.assign(d, ops.cast(d_t, d.dtype))
            self.assign(z, ops.cast(z_t, z.dtype))
        self.assign(v, ops.cast(v_t, v.dtype))
        self.assign(variable, ops.cast(new_w, variable.dtype))

    def _apply_weight_decay(self, variables: list[Any]) -> None:
        # Keras' decoupled decay, w <- w - w * wd * lr, on the variables Keras selects; in the MXNet
        # form z gets the same factor so that w = -z / d still holds and the next step keeps the decay.
        if self.weight_decay is None:
            return
        for variable in variables:
            if self._use_weight_decay(variable):
                lr = ops.cast(self._get_current_learning_rate(), variable.dtype)
                # convert_to_tensor with a dtype, not cast: TensorFlow would round the Python float
                # to float32 first (measured: 3e-10 off for float64 variables).
                wd = ops.convert_to_tensor(self.weight_decay, dtype=variable.dtype)
                variable.assign(variable - variable * wd * lr)
                if not self.compact:
                    z = self._z[self._get_variable_index(variable)]
                    lr_z, wd_z = ops.cast(lr, z.dtype), ops.convert_to_tensor(self.weight_decay, dtype=z.dtype)
                    z.assign(z - z * wd_z * lr_z)

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, for ``from_config`` and ``.keras`` files."""
        config: dict[str, Any] = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "coupled_weight_decay": self.coupled_weight_decay,
                "clip_gradient": self.clip_gradient,
                "compact": self.compact,
                "state_dtype": self.state_dtype,
            }
        )
        return config
