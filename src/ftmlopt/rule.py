r"""The FTML rule, written once: both forms, every option, per-step constants, validation, dtypes.

**Who calls what.** The validation (``check_*``), the dtype policy, the defaults
(``DEFAULT_*``) and the per-step constants (:func:`constants`, brought to a compute dtype with
:meth:`Constants.cast`) are used by every implementation. The step itself
(:func:`compact_step` / :func:`mxnet_step`) is called by the PyTorch for-loop
(``ftmlopt.torch``), optax, Keras, and the MXNet system's lr-0 step (``v`` only:
:func:`gradient`, :func:`second_moment`). Four paths spell the per-element step out again, each
for a reason the functions here cannot serve, and each is held to this module (or to MXNet) by
a test:

* ``ftmlopt.mxnet.operator._numpy_kernel`` (MXNet's ``ftml_update``): MXNet 1.9.1's order of
  operations, rounded in the array dtype into preallocated buffers, for bit-exactness with MXNet;
  its constants are :func:`constants` on MXNet-parsed float32 scalars (``prepare_scalars``).
  Checked bit for bit against MXNet's own results (``tests/mxnet``, ``tests/data``) and against
  this module (``tests/conformance``, ``ftml_update[numpy]``).
* ``ftmlopt.torch``'s foreach path: the same operations in the same order as ``torch._foreach_*``
  calls over lists of tensors (one call per list, not per tensor); constants from
  :func:`constants`. Checked bit for bit against the for-loop on CPU
  (``tests/torch/test_torch_generic.py``) and against this module (``tests/conformance``,
  ``torch[foreach]``).
* the CPU kernels (``ftmlopt.kernels.cpu``, and MXNet's operator form bound in
  ``ftmlopt.mxnet._kernel``): the step as LLVM IR, one pass over memory, no FMA, this module's
  order; constants from :func:`constants` via ``k_vector``. Checked bit for bit in float64
  against :func:`compact_step` / :func:`mxnet_step` (``tests/kernels/test_cpu_kernel.py``), the
  operator form against ``_numpy_kernel`` and MXNet (``tests/kernels/test_operator_kernel.py``),
  and in ``tests/conformance`` (``torch[fused]``, ``ftml_update[default]``).
* the Triton kernel (``ftmlopt.kernels.triton_cuda``): the step as a GPU kernel over many tensors
  in one launch. Its wrapper takes the step-independent constants from :func:`constants`; the
  lr- and step-dependent ones (``bias1``, ``bias2``, ``step_size``, ``d_scale``, ``decay``) are
  derived in the kernel with the same formulas, because ``lr`` and the step counts live on the
  device and reading them would sync. Checked under ``TRITON_INTERPRET=1``
  (``tests/kernels/test_triton_interpret.py``, ``tests/conformance``, ``triton[interpreter]``).

Per element, at step :math:`t = 1, 2, \dots` with learning rate :math:`\eta_t`:

.. math::

    g' &= \mathrm{clip}\big(s\,\sigma\, g + \lambda_c w_{t-1},\ c\big)
          \qquad (\sigma = -1 \text{ when maximizing}, \ s = \text{gradient scale},\
          \lambda_c = \text{coupled L2}, \ \text{clip only when } c \text{ is set}) \\
    v_t &= \beta_2 v_{t-1} + (1-\beta_2)\, g'^2 \\
    \hat\sigma_t &= \sqrt{v_t / (1-\beta_2^t)} + \epsilon

**Compact form** (the default of the framework front ends; the paper's Theorem 1). State: ``v``.

.. math::

    w_t = \delta\, w_{t-1} - \frac{\eta_t (1-\beta_1)}{1-\beta_1^t}\, \frac{g'}{\hat\sigma_t}

It evaluates :math:`\hat\sigma_t` as :math:`\sqrt{v_t}\, r_t + \epsilon` with the step's constant
:math:`r_t = 1/\sqrt{1-\beta_2^t}` (``bias2_rsqrt``): one square root and one multiplication per
element instead of a division and a square root. Equal in exact arithmetic, within an ulp or two
of the other order; and when :math:`v_t` is rounded to float32 anyway (the low-bit state stores
:math:`u = \sqrt{v_t}`), the step and the encoding share the one square root. A CPU divides and
takes square roots on one unit, which bounds a step when the data is in cache and the low-bit
steps always. (The MXNet form keeps MXNet's :math:`\sqrt{v_t / (1-\beta_2^t)}`.)

**MXNet form** (``ftml_update``; three states ``d, v, z`` with ``w = -z/d``):

.. math::

    d_t &= \frac{1-\beta_1^t}{\eta_t}\, \hat\sigma_t \\
    z_t &= \beta_1 \delta z_{t-1} + (1-\beta_1)\, g' - (d_t - \beta_1 d_{t-1})\, \delta w_{t-1} \\
    w_t &= -z_t / d_t

Here :math:`\delta = 1 - \eta_t \lambda_d` is the decoupled weight decay (AdamW's convention; 1
when it is off). While nothing but the optimizer writes the weights, both forms give the same
weights for any learning-rate schedule (Theorem 1). They differ when something else edits the
weights (the MXNet form pulls the edit back through ``z``), when ``lr`` jumps by orders of
magnitude (``d`` scales with ``1/lr`` and cancels), and in memory (one buffer against three).

**lr = 0 is "no step".** The weights do not move; the gradient is still folded into ``v`` and the
step is counted, exactly as Adam does at lr 0 (so a warmup from 0 warms ``v`` up too, and a
schedule driven by the step count moves on). The MXNet form cannot compute ``d_t`` at lr 0 (it
would be infinite), so :func:`mxnet_step` keeps ``d`` and ``z``: as ``z = -d w`` still holds, the
next step is the same as the compact form's, and the two forms stay equal through a warmup.
Every path follows this, the MXNet system included: MXNet 1.9.1 itself folds ``g`` into ``v`` at
lr 0 and then writes ``d = inf`` and NaN weights, so ``ftmlopt.mxnet.optimizer.FTML`` keeps
MXNet's count and MXNet's bits of ``v`` and this module's ``w``, ``d``, ``z`` instead of the NaN
(``tests/mxnet/test_lr_zero.py``). Only the bare operator ``ftml_update`` refuses lr 0 (it has no
count and no caller that means "no step"; MXNet's would return NaN).

**dtypes.** float16/bfloat16 parameters are computed in float32 and rounded once on the way out
(:func:`compute_dtype`); their state is float32 unless the user asks otherwise
(:func:`state_dtype`); hyper-parameters are never rounded to a half type: :func:`constants` works
in float64 for Python numbers, and front ends cast its results to the compute dtype.

The step functions use only ``+ - * /`` and the ``sqrt``/``clip``/``where`` functions they are
handed, so the same code runs on NumPy, JAX, PyTorch and Keras tensors, traced or not.

Example:
    >>> import numpy as np
    >>> from ftmlopt import rule
    >>> w, g, v = np.array([1.0, -2.0]), np.array([0.5, 0.0]), np.zeros(2)
    >>> c = rule.constants(lr=0.1, t=1, beta1=0.6, beta2=0.999, eps=1e-8)
    >>> new_w, new_v = rule.compact_step(w, g, v, c, sqrt=np.sqrt, clip=np.clip)
    >>> np.round(new_w, 6)
    array([ 0.9, -2. ])
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import numbers
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = [
    "DEFAULT_BETA1",
    "DEFAULT_BETA2",
    "DEFAULT_EPS",
    "DEFAULT_LR",
    "FLOAT_DTYPES",
    "HALF_DTYPES",
    "Constants",
    "c_pow",
    "c_powf",
    "check_beta",
    "check_betas",
    "check_bool",
    "check_clip",
    "check_eps",
    "check_finite",
    "check_grad_scale",
    "check_lr",
    "check_state_dtype",
    "check_step",
    "check_weight_decay",
    "compact_step",
    "compute_dtype",
    "constants",
    "dtype_name",
    "gradient",
    "mxnet_step",
    "second_moment",
    "state_dtype",
]

Array = Any
UnaryFn = Callable[[Array], Array]
ClipFn = Callable[[Array, Array, Array], Array]


# ============================================================================ defaults
# The front ends' defaults (the paper's settings for FTML, MXNet 1.9's ``FTML`` defaults for the
# betas and eps). Every front end takes them from here.
DEFAULT_LR = 2.5e-3
DEFAULT_BETA1 = 0.6
DEFAULT_BETA2 = 0.999
DEFAULT_EPS = 1e-8


# ============================================================================ validation
# One function per hyper-parameter. Each raises TypeError for a value of the wrong kind and
# ValueError for a value out of range, *before* anything is mutated, with a message of the form
# ``Invalid <what>: <value>`` (torch.optim's wording; ``what`` lets a front end use its own name).


def _real(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a real number, got {value!r} of type {type(value).__name__}")
    return float(value)


def check_finite(value: Any, what: str) -> float:
    """``value`` as a float; it must be a finite real number."""
    x = _real(value, what)
    if not math.isfinite(x):
        raise ValueError(f"Invalid {what}: {value}")
    return x


def check_lr(value: Any, what: str = "learning rate", *, positive: bool = False) -> float:
    """A learning rate: finite and >= 0 (0 is "no step"); > 0 when ``positive`` (MXNet's operator)."""
    x = _real(value, what)
    if not math.isfinite(x) or x < 0.0 or (positive and x == 0.0):
        raise ValueError(f"Invalid {what}: {value}")
    return x


def check_beta(value: Any, what: str) -> float:
    """A decay rate in ``[0, 1)``; 1 would divide by ``1 - beta**t = 0``."""
    x = _real(value, what)
    if not 0.0 <= x < 1.0:
        raise ValueError(f"Invalid {what}: {value}")
    return x


def check_betas(value: Any, what: str = "beta parameter at index") -> tuple[float, float]:
    """A pair ``(beta1, beta2)``, each in ``[0, 1)`` (torch's ``betas``)."""
    if isinstance(value, str | bytes) or not isinstance(value, tuple | list) or len(value) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2) of floats, got {value!r}")
    return check_beta(value[0], f"{what} 0"), check_beta(value[1], f"{what} 1")


def check_eps(value: Any, what: str = "epsilon value") -> float:
    """Epsilon, added outside the square root: finite and >= 0."""
    x = _real(value, what)
    if not math.isfinite(x) or x < 0.0:
        raise ValueError(f"Invalid {what}: {value}")
    return x


def check_weight_decay(value: Any, what: str = "weight_decay value") -> float:
    """Weight decay (coupled or decoupled): finite and >= 0."""
    x = _real(value, what)
    if not math.isfinite(x) or x < 0.0:
        raise ValueError(f"Invalid {what}: {value}")
    return x


def check_grad_scale(value: Any, what: str = "rescale_grad value") -> float:
    """The factor the gradient is multiplied by (MXNet's ``rescale_grad``): finite and >= 0."""
    x = _real(value, what)
    if not math.isfinite(x) or x < 0.0:
        raise ValueError(f"Invalid {what}: {value}")
    return x


def check_clip(value: Any, what: str = "clip_gradient value") -> float | None:
    """An element-wise clipping bound: ``None`` (off) or a finite value > 0. Returns it as a float.

    The MXNet system keeps MXNet's own conventions on top of this (its ``Optimizer`` treats any
    falsy value as off, its operator clips whenever ``clip_grad >= 0``); see
    :mod:`ftmlopt.mxnet.optimizer.base` and :mod:`ftmlopt.mxnet.operator`.
    """
    if value is None:
        return None
    x = _real(value, what)
    if not math.isfinite(x) or x <= 0.0:
        raise ValueError(f"Invalid {what}: {value} (use None to turn clipping off)")
    return x


def check_step(value: Any, what: str = "t") -> int:
    """An update count: an int >= 1 (the bias corrections divide by ``1 - beta**t``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int, got {value!r} of type {type(value).__name__}")
    if value < 1:
        raise ValueError(f"Invalid {what}: {value} (the update count must be >= 1)")
    return int(value)


def check_bool(value: Any, what: str) -> bool:
    """A flag: exactly ``True`` or ``False`` (or a NumPy bool)."""
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        raise TypeError(f"{what} must be a bool, got {value!r} of type {type(value).__name__}")
    return bool(value)


# ============================================================================ dtype policy
#: Parameter dtypes that are computed in float32 and get float32 state by default.
HALF_DTYPES = frozenset({"float16", "bfloat16"})
#: The floating dtypes a parameter or its state may have.
FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})


def dtype_name(dtype: Any) -> str:
    """A framework-neutral dtype name: ``torch.bfloat16``, ``jnp.bfloat16``, ``'float16'`` -> ``'bfloat16'``..."""
    name = getattr(dtype, "name", None)
    if not isinstance(name, str):
        name = str(dtype)
    return name.rsplit(".", 1)[-1].replace("'>", "").replace("<class '", "")


def check_state_dtype(value: Any, what: str = "state_dtype") -> str | None:
    """A requested state dtype: ``None`` (the policy of :func:`state_dtype`) or a floating dtype of any
    framework (``torch.float64``, ``jnp.float32``, ``'bfloat16'``); returned as its name."""
    if value is None:
        return None
    name = dtype_name(value)
    if name not in FLOAT_DTYPES:
        raise TypeError(f"Invalid {what}: {value!r} (a floating-point dtype is needed)")
    return name


def compute_dtype(param_dtype: Any, state_dtype: Any = None) -> str:
    """The dtype a step is computed in, for a parameter and (optionally) its state's dtype.

    float64 when either is float64 (a user who asks for float64 state gets float64 arithmetic on
    every path); else float32 for float16/bfloat16 parameters; else the parameter's own dtype.
    """
    name = dtype_name(param_dtype)
    if name == "float64" or (state_dtype is not None and dtype_name(state_dtype) == "float64"):
        return "float64"
    return "float32" if name in HALF_DTYPES else name


def state_dtype(param_dtype: Any, requested: Any = None) -> str:
    """The dtype of ``v`` (and ``d``, ``z``): ``requested`` when given, else :func:`compute_dtype`."""
    return dtype_name(requested) if requested is not None else compute_dtype(param_dtype)


# ============================================================================ C library powers
# MXNet's kernel takes beta**t with the C library's powf (float32) and pow (float64). NumPy's
# np.power is not that function (its SIMD paths differ in the last bit for ~1 in 10 pairs), and
# float32(math.pow(b, t)) is not powf either (glibc's powf is not correctly rounded). So the
# powers come from the C library itself. Python's math.pow *is* the C library's pow.


@functools.cache
def _libm() -> Any:
    name = ctypes.util.find_library("m") if sys.platform != "win32" else "ucrtbase"
    try:
        lib = ctypes.CDLL(name)  # None (Linux fallback) loads the running process, which links libm
        fn = lib.powf
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_float, ctypes.c_float)
    fn.restype = ctypes.c_float
    return fn


def c_powf(base: float, exponent: float) -> float:
    """The C library's ``powf(base, exponent)`` (float32 arguments and result, returned as a Python float).

    Falls back to float32-rounded ``math.pow`` where no C library exposes ``powf`` (none known).
    """
    fn = _libm()
    if fn is None:  # pragma: no cover - every supported platform has powf
        return float(ctypes.c_float(math.pow(ctypes.c_float(base).value, ctypes.c_float(exponent).value)).value)
    return float(fn(base, exponent))


def c_pow(base: float, exponent: float) -> float:
    """The C library's ``pow`` in double precision (Python's ``math.pow`` calls it directly)."""
    return math.pow(base, exponent)


# ============================================================================ per-step constants
class Constants(NamedTuple):
    """The scalars of one step. Python floats (float64) for Python inputs; arrays for traced inputs.

    ``wd`` (coupled), ``decay`` (decoupled factor ``1 - lr*wd``), ``clip`` and ``grad_scale`` are
    None when that option is off, so that those passes are skipped altogether.
    """

    lr: Array
    beta1: Array
    one_minus_beta1: Array
    beta2: Array
    one_minus_beta2: Array
    eps: Array
    #: ``-1`` when maximizing, ``1`` otherwise
    sign: float
    wd: Array | None
    decay: Array | None
    clip: Array | None
    grad_scale: Array | None
    #: ``1 - beta1**t``
    bias1: Array
    #: ``1 - beta2**t``
    bias2: Array
    #: ``1 / sqrt(1 - beta2**t)`` (compact form: ``sqrt(v) * bias2_rsqrt``)
    bias2_rsqrt: Array
    #: ``(1 - beta1**t) / lr`` (MXNet form; infinite at lr 0, which that form never uses)
    d_scale: Array
    #: ``lr (1 - beta1) / (1 - beta1**t)`` (compact form)
    step_size: Array

    def cast(self, convert: Callable[[Any], Any]) -> Constants:
        """The same constants with every scalar passed through ``convert`` (a cast to the compute dtype).

        ``None`` (an option that is off) stays ``None`` and ``sign`` stays a Python float, so the
        step functions can still test them without a device sync. This is the one way a front end
        or kernel brings the constants (float64 for Python inputs) to its compute dtype.
        """
        return Constants(
            *(value if value is None or name == "sign" else convert(value) for name, value in self._asdict().items())
        )


def _is_python_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and type(x).__module__ == "builtins"


def constants(
    lr: Array,
    t: Array,
    beta1: Array,
    beta2: Array,
    eps: Array,
    *,
    weight_decay: float = 0.0,
    decoupled: bool = False,
    clip: Array | None = None,
    maximize: bool = False,
    grad_scale: Array | None = None,
    power: Callable[[Any, Any], Any] | None = None,
) -> Constants:
    """Derive a step's constants from its hyper-parameters and the 1-based step number ``t``.

    Python numbers are combined in float64, with ``beta**t`` from the C library's ``pow``
    (:func:`c_pow`). Arrays or tensors (a traced step count, a tensor learning rate) use their own
    operators, so the result stays on the device and under the tracer; pass ``power`` to choose
    the power function (the MXNet operator passes :func:`c_powf` for float32). NumPy scalars
    (``np.float32(0.9)``) are combined with a ``1`` of the same type, so every constant is rounded
    in that dtype under NumPy 1.x and 2.x alike (``power`` must then return that type too).
    """
    if power is None:
        power = c_pow if _is_python_number(beta1) and _is_python_number(t) else _pow_operator
    # NumPy scalars (np.float32(0.9)...) are combined with a 1 of their own type, so that every
    # result is rounded in that dtype under NumPy 1.x too (where 1.0 - np.float32(x) is float64).
    scalar_type: Any = type(beta1)
    one: Any = scalar_type(1) if issubclass(scalar_type, _np_generic()) else 1.0
    bias1 = one - power(beta1, t)
    bias2 = one - power(beta2, t)
    has_wd = not _is_python_number(weight_decay) or weight_decay != 0.0
    return Constants(
        lr=lr,
        beta1=beta1,
        one_minus_beta1=one - beta1,
        beta2=beta2,
        one_minus_beta2=one - beta2,
        eps=eps,
        sign=-1.0 if maximize else 1.0,
        wd=weight_decay if has_wd and not decoupled else None,
        decay=one - lr * weight_decay if has_wd and decoupled else None,
        clip=clip,
        grad_scale=grad_scale,
        bias1=bias1,
        bias2=bias2,
        bias2_rsqrt=one / _sqrt(bias2),
        d_scale=_safe_divide(bias1, lr),
        step_size=lr * (one - beta1) / bias1,
    )


def _np_generic() -> type:
    """``numpy.generic`` when NumPy is imported, else a type nothing is an instance of."""
    np = sys.modules.get("numpy")
    return np.generic if np is not None else _NoType


class _NoType:
    pass


def _pow_operator(base: Any, exponent: Any) -> Any:
    return base**exponent


def _sqrt(x: Any) -> Any:
    """A correctly rounded square root for Python floats and NumPy scalars (of their own type);
    ``x ** 0.5`` for arrays and tensors (NumPy, torch and XLA evaluate it as a square root)."""
    if _is_python_number(x):
        return math.sqrt(x)
    scalar_type: Any = type(x)
    if issubclass(scalar_type, _np_generic()):
        # float64's root rounded to a float32 is float32's correctly rounded root (53 >= 2 * 24 + 2)
        return scalar_type(math.sqrt(float(x)))
    return x**0.5


def _safe_divide(num: Any, den: Any) -> Any:
    if _is_python_number(den) and den == 0:
        return math.inf
    return num / den


# ============================================================================ the step
def gradient(g: Array, w: Array, c: Constants, *, clip: ClipFn) -> Array:
    """``g' = clip(sign * grad_scale * g + wd * w, -c, c)`` (MXNet 1.9's order: L2 before the clip)."""
    if c.grad_scale is not None:
        g = g * c.grad_scale
    if c.sign < 0:
        g = -g
    if c.wd is not None:
        g = g + w * c.wd
    if c.clip is not None:
        g = clip(g, -c.clip, c.clip)
    return g


def second_moment(v: Array, gp: Array, c: Constants) -> Array:
    """``v_t = beta2 v + (1 - beta2) g'^2``."""
    return v * c.beta2 + (gp * gp) * c.one_minus_beta2


def compact_step(w: Array, g: Array, v: Array, c: Constants, *, sqrt: UnaryFn, clip: ClipFn) -> tuple[Array, Array]:
    """The compact (Theorem 1) step; returns ``(w_t, v_t)``. lr 0 leaves ``w`` as it is."""
    if c.decay is not None:
        w = w * c.decay
    gp = gradient(g, w, c, clip=clip)
    v = second_moment(v, gp, c)
    denom = sqrt(v) * c.bias2_rsqrt + c.eps
    return w - (gp * c.step_size) / denom, v


def mxnet_step(
    w: Array,
    g: Array,
    d: Array,
    v: Array,
    z: Array,
    c: Constants,
    *,
    sqrt: UnaryFn,
    clip: ClipFn,
    where: Callable[[Array, Array, Array], Array] | None = None,
    stable: bool = False,
) -> tuple[Array, Array, Array, Array]:
    r"""The MXNet (three-state) step; returns ``(w_t, d_t, v_t, z_t)`` in MXNet's evaluation order.

    At lr 0 only ``v`` changes (see "lr = 0" in the module docstring). For a Python ``lr`` that is a plain test; for a
    traced or tensor ``lr`` pass ``where(cond, a, b)`` (``jnp.where``, ``torch.where``) and the
    step is masked without a host sync.

    ``stable=True`` evaluates the same step in an order that keeps a minimum fixed. MXNet's order
    rebuilds the weight as ``-z_t / d_t`` every step, and that division does not give back
    ``w_{t-1}`` bit for bit when ``g' = 0``; the one-ulp gradient it leaves is then divided by a
    ``sqrt(v)`` that decays towards it, so the steps grow back to the size of ``lr`` and the
    weights settle into an oscillation of a few percent around the minimum (float32, lr 0.3,
    10 000 steps on a parabola). The stable order writes ``z_t`` around the residual
    ``r = z + d w`` (0 in exact arithmetic while only the optimizer writes ``w``; it carries an
    outside edit of ``w`` exactly as MXNet's ``z`` does):

    .. math::

        w_t = w_{t-1} - \frac{\beta_1 r + (1-\beta_1) g'}{d_t}, \qquad z_t = -d_t w_t

    Equal to MXNet's order in exact arithmetic, within rounding of it per step.
    """
    if _is_python_number(c.lr):
        if c.lr == 0:
            return w, d, second_moment(v, gradient(g, w, c, clip=clip), c), z
        where = None
    w0, d0, z0 = w, d, z
    if c.decay is not None:
        w = w * c.decay
        z = z * c.decay
    gp = gradient(g, w, c, clip=clip)
    v = second_moment(v, gp, c)
    d_t = (sqrt(v / c.bias2) + c.eps) * c.d_scale
    if stable:
        w = w - ((z + d * w) * c.beta1 + gp * c.one_minus_beta1) / d_t
        z = -(w * d_t)
    else:
        z = z * c.beta1 + gp * c.one_minus_beta1 - (d_t - d * c.beta1) * w
        w = -z / d_t
    if where is None:
        return w, d_t, v, z
    frozen = c.lr == 0
    return where(frozen, w0, w), where(frozen, d0, d_t), v, where(frozen, z0, z)
