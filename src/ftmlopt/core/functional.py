r"""The FTML rule as pure functions over any array type with arithmetic operators.

This is the one definition of the step that the functional front ends (:mod:`ftmlopt.optax`,
:mod:`ftmlopt.keras`) share. It uses only ``+ - * /`` plus the ``sqrt`` and ``clip`` functions it
is handed, so the same code runs on NumPy arrays, JAX arrays (traced or not) and Keras/PyTorch
tensors. Nothing is updated in place: every function returns new arrays.

Per element, with :math:`t = 1, 2, \dots` and states :math:`d_0 = v_0 = z_0 = 0`:

.. math::

    g' &= \mathrm{clip}(g + \lambda w_{t-1},\ c) \qquad
          (\text{coupled L2 before clipping, MXNet 1.9 order; clip only when } c \text{ is set}) \\
    v_t &= \beta_2 v_{t-1} + (1-\beta_2)\, g'^2 \\
    d_t &= \frac{1-\beta_1^t}{\eta_t}\Big(\sqrt{v_t/(1-\beta_2^t)} + \epsilon\Big) \\
    z_t &= \beta_1 z_{t-1} + (1-\beta_1)\, g' - (d_t - \beta_1 d_{t-1})\, w_{t-1} \\
    w_t &= -z_t / d_t

The compact form (the paper's Theorem 1) keeps only :math:`v`:

.. math::

    w_t = w_{t-1} - \frac{\eta_t (1-\beta_1)}{1-\beta_1^t}\,
          \frac{g'}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}

Both are equal in exact arithmetic while nothing else edits the weights. The operations are in
the order of MXNet's kernel (:func:`ftmlopt.mxnet.operator._numpy_kernel`), so in one dtype the
results agree with :func:`ftmlopt.ftml_update` to the last bit or within an ulp or two (pow and
division may be implemented differently by each library).

Example:
    >>> import numpy as np
    >>> from ftmlopt.core.functional import full_step, step_scalars
    >>> w = np.array([1.0, -2.0]); g = np.array([0.5, 0.0]); zero = np.zeros(2)
    >>> s = step_scalars(lr=0.1, t=1.0, beta1=0.6, beta2=0.999, epsilon=1e-8, wd=0.0, clip=None)
    >>> new_w, d, v, z = full_step(w, g, zero, zero, zero, s, sqrt=np.sqrt, clip=np.clip)
    >>> np.round(new_w, 6)
    array([ 0.9, -2. ])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = ["StepScalars", "compact_delta", "coupled_gradient", "full_step", "step_scalars"]

Array = Any
UnaryFn = Callable[[Array], Array]
ClipFn = Callable[[Array, Array, Array], Array]


class StepScalars(NamedTuple):
    """The scalars of one step, in the compute dtype (arrays of that dtype, or Python floats).

    ``wd`` is None when there is no coupled weight decay and ``clip`` is None when clipping is
    off, so that those passes are skipped altogether.
    """

    lr: Array
    beta1: Array
    one_minus_beta1: Array
    beta2: Array
    one_minus_beta2: Array
    epsilon: Array
    wd: Array | None
    clip: Array | None
    #: ``(1 - beta1**t) / lr``
    d_scale: Array
    #: ``1 - beta2**t``
    bias2: Array
    #: ``1 - beta1**t``
    bias1: Array


def step_scalars(
    lr: Array,
    t: Array,
    beta1: Array,
    beta2: Array,
    epsilon: Array,
    wd: Array | None,
    clip: Array | None,
) -> StepScalars:
    """Derive the per-step constants from hyper-parameters already cast to the compute dtype.

    ``t`` is the 1-based step number in the same dtype; ``beta ** t`` uses the array type's
    ``__pow__``.
    """
    one = 1.0
    bias1 = one - beta1**t
    return StepScalars(
        lr=lr,
        beta1=beta1,
        one_minus_beta1=one - beta1,
        beta2=beta2,
        one_minus_beta2=one - beta2,
        epsilon=epsilon,
        wd=wd,
        clip=clip,
        d_scale=bias1 / lr,
        bias2=one - beta2**t,
        bias1=bias1,
    )


def coupled_gradient(g: Array, w: Array, s: StepScalars, clip: ClipFn) -> Array:
    """``g' = clip(g + wd * w, -c, c)``: coupled L2 first, then element-wise clipping (MXNet 1.9)."""
    if s.wd is not None:
        g = g + w * s.wd
    if s.clip is not None:
        g = clip(g, -s.clip, s.clip)
    return g


def full_step(
    w: Array, g: Array, d: Array, v: Array, z: Array, s: StepScalars, *, sqrt: UnaryFn, clip: ClipFn
) -> tuple[Array, Array, Array, Array]:
    """One FTML step; returns ``(new_w, d_t, v_t, z_t)``. ``w`` is the weight before the step."""
    gp = coupled_gradient(g, w, s, clip)
    v = v * s.beta2 + (gp * gp) * s.one_minus_beta2
    d_t = (sqrt(v / s.bias2) + s.epsilon) * s.d_scale
    z = z * s.beta1 + gp * s.one_minus_beta1 - (d_t - d * s.beta1) * w
    return -z / d_t, d_t, v, z


def compact_delta(w: Array, g: Array, v: Array, s: StepScalars, *, sqrt: UnaryFn, clip: ClipFn) -> tuple[Array, Array]:
    """The compact step; returns ``(delta, v_t)`` with ``w_t = w_{t-1} + delta``."""
    gp = coupled_gradient(g, w, s, clip)
    v = v * s.beta2 + (gp * gp) * s.one_minus_beta2
    step = s.lr * s.one_minus_beta1 / s.bias1
    return -(gp * step) / (sqrt(v / s.bias2) + s.epsilon), v
