r"""``ftml_update``: MXNet 1.9's FTML operator over NumPy arrays, bit for bit.

For every element, with the hyper-parameters turned into float32 (``epsilon``: float64) exactly
as MXNet does (``str(value)`` read by dmlc-core's parser, which is not always correctly rounded;
see :func:`_dmlc_parse`), then cast to the array's dtype as MXNet's C++ kernel does
(``static_cast<DType>``), and every operation rounded to that dtype in this order:

.. math::

    g' &= \mathrm{clip}(\mathrm{rescale\_grad}\, g + \mathrm{wd}\, w,\ \mathrm{clip\_grad})
          \quad (\text{only when } \mathrm{clip\_grad} \ge 0) \\
    v_t &= \beta_2 v_{t-1} + (1-\beta_2)\,(g' g') \\
    d_t &= \frac{1-\beta_1^t}{\eta}\Big(\sqrt{v_t / (1-\beta_2^t)} + \epsilon\Big) \\
    z_t &= \beta_1 z_{t-1} + (1-\beta_1)\, g' - (d_t - \beta_1 d_{t-1})\, w_{t-1} \\
    w_t &= -z_t / d_t

The powers ``beta**t`` are the C library's ``powf`` (float32) or ``pow`` (float64), as in MXNet's
kernel (:func:`ftmlopt.rule.c_powf`, :func:`ftmlopt.rule.c_pow`; NumPy's ``np.power`` differs from
them in the last bit for some pairs), everything derived from them is rounded in the array dtype,
epsilon is added outside the square root, and ``d``, ``v``, ``z`` are updated in place. float16 arrays are
computed in float32 and rounded once on the way out (a deliberate difference from MXNet,
whose half-precision epsilon underflows to 0 and turns zero-gradient elements into NaN).

The arithmetic lives in one place per backend: :func:`_numpy_kernel` here, and the compiled
kernel :func:`ftmlopt.mxnet._kernel.operator_kernel` (llvmlite) when it is installed; both take the
same :class:`ftmlopt.rule.Constants` from :func:`prepare_scalars`. ``_numpy_kernel`` spells the step
out rather than calling :func:`ftmlopt.rule.mxnet_step` because it must round in MXNet's order
into preallocated buffers (two temporaries, ``out=`` ufuncs); ``tests/mxnet`` holds it to MXNet's
own results bit for bit, and ``tests/conformance`` to the rule.

The compiled kernel is used for C-contiguous float32/float64 arrays unless the environment
variable ``FTMLOPT_DISABLE_CPU_KERNELS`` is set to anything but ``""``/``"0"`` (then NumPy runs;
the same bits either way). ``FTMLOPT_DISABLE_NUMBA``, its old name, still works and warns.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from ftmlopt import rule

__all__ = ["DISABLE_ENV", "Scalars", "check_clip_bound", "fold_gradient", "ftml_update", "prepare_scalars"]

_SUPPORTED = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


#: The operator's per-call constants: :class:`ftmlopt.rule.Constants` in the compute dtype, rounded the
#: way MXNet rounds them (:func:`prepare_scalars`). ``clip`` is None when MXNet would not clip
#: (``clip_grad < 0``); ``wd`` and ``grad_scale`` are always set (MXNet always applies them).
Scalars = rule.Constants


@functools.lru_cache(maxsize=1024)
def _dmlc_parse(text: str, double: bool) -> np.floating:
    """Parse ``text`` exactly as MXNet's parameter parser (dmlc-core ``ParseFloat``) does.

    MXNet receives every keyword argument as ``str(value)`` and parses float fields with
    ``dmlc::stof`` (double fields with ``dmlc::stod``). That parser is not correctly rounded:
    it adds the integer part and the rounded fraction in the target type, and scales by powers
    of ten built in the target type. For example ``1.9365173080312914`` becomes
    ``1.9365172386169434`` instead of ``float32(x) = 1.936517357826233``. Replicating it keeps
    ``ftml_update`` bit-identical to MXNet for any hyper-parameter, not only short decimals.
    """
    ct = np.float64 if double else np.float32
    kmax = 308 if double else 38
    p, n = 0, len(text)
    while p < n and text[p] in " \t\r\n\f":
        p += 1
    positive = True
    if p < n and text[p] in "+-":
        positive = text[p] == "+"
        p += 1
    rest = text[p:].lower()
    if rest.startswith("inf"):
        return ct(np.inf if positive else -np.inf)
    if rest.startswith("nan"):
        return ct(np.nan)
    predec = 0
    while p < n and text[p].isdigit():
        predec = (predec * 10 + int(text[p])) % 2**64  # uint64, as in C
        p += 1
    with np.errstate(over="ignore", under="ignore"):
        value = ct(predec)
        if p < n and text[p] == ".":
            p += 1
            val2, pow10, count = 0, 1, 0
            while p < n and text[p].isdigit():
                if count < 19:  # kStrtofMaxDigits; later digits are ignored
                    val2, pow10 = val2 * 10 + int(text[p]), pow10 * 10
                p += 1
                count += 1
            value = ct(value + ct(float(val2) / float(pow10)))
        if p < n and text[p] in "eE":
            p += 1
            negative_exp = False
            if p < n and text[p] in "+-":
                negative_exp = text[p] == "-"
                p += 1
            expon = 0
            while p < n and text[p].isdigit():
                expon = expon * 10 + int(text[p])
                p += 1
            expon = min(expon, kmax)
            scale = ct(1)
            while expon >= 8:
                scale, expon = ct(scale * ct(1e8)), expon - 8
            while expon > 0:
                scale, expon = ct(scale * ct(10)), expon - 1
            value = ct(value / scale) if negative_exp else ct(value * scale)
    return value if positive else ct(-value)


def _mxnet_param(value: Any, double: bool = False) -> np.floating:
    """A hyper-parameter (any real number) as MXNet's C++ side sees it: ``str(value)`` parsed by dmlc-core."""
    text = str(value) if isinstance(value, int | float | np.number) else repr(float(value))
    return _dmlc_parse(text, double)


def check_clip_bound(value: Any, what: str) -> float:
    """MXNet's clipping bound: any real but NaN (a negative bound turns clipping off).

    Unlike :func:`ftmlopt.rule.check_clip` (``None`` or > 0), MXNet's operator clips whenever
    ``clip_grad >= 0`` (so 0 zeroes the gradient) and its ``Optimizer`` treats a falsy
    ``clip_gradient`` as off; both accept any value but NaN.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a real number, got {value!r} of type {type(value).__name__}")
    if math.isnan(float(value)):
        raise ValueError(f"Invalid {what}: {value}")
    return float(value)


def _power_in(ct: type) -> Callable[[Any, Any], Any]:
    """The C library's power for scalars of type ``ct``, returning a ``ct``: ``powf`` or ``pow``."""
    if ct is np.float32:
        return lambda base, exponent: np.float32(rule.c_powf(float(base), float(exponent)))
    if ct is np.float64:
        return lambda base, exponent: np.float64(rule.c_pow(float(base), float(exponent)))
    raise TypeError(f"no C library power for {ct.__name__}; compute float16 in float32")


def prepare_scalars(
    dtype: np.dtype[Any] | type | str,
    lr: float,
    t: int,
    beta1: float,
    beta2: float,
    epsilon: float,
    wd: float,
    rescale_grad: float,
    clip_grad: float,
) -> rule.Constants:
    r"""Round the hyper-parameters as MXNet does and derive the per-step constants.

    MXNet parses every float parameter to float32 (``epsilon`` is a double) from its ``str()``
    with dmlc-core's parser (see :func:`_dmlc_parse`), and the kernel then casts each one, and
    ``t``, to the array dtype ``DT`` (float32 or float64). The constants come from
    :func:`ftmlopt.rule.constants` on scalars of type ``DT``, with :math:`\beta^t` from the C
    library (``powf``/``pow``), so that :math:`1-\beta^t` and :math:`(1-\beta_1^t)/\eta` are
    rounded in ``DT`` exactly as in MXNet's kernel, under NumPy 1.x and 2.x alike.

    The result is a :class:`ftmlopt.rule.Constants` (no operator-specific copy of it), every field
    a ``DT`` scalar (:meth:`~ftmlopt.rule.Constants.cast`). MXNet's own conventions are expressed
    in its fields: ``clip`` is None when ``clip_grad < 0`` (MXNet clips whenever it is ``>= 0``, so
    0 zeroes the gradient), and ``wd`` and ``grad_scale`` are always set, because MXNet always
    computes ``rescale_grad * g + wd * w`` (``0 * inf`` weights give NaN there, as in MXNet).

    Example:
        >>> import numpy as np
        >>> s = prepare_scalars(np.float32, lr=0.5, t=9, beta1=0.999, beta2=0.999, epsilon=1e-8,
        ...                     wd=0.0, rescale_grad=1.0, clip_grad=-1.0)
        >>> s.bias2.dtype, bool(s.bias2 == np.float32(0.0089639425))  # 1 - powf(0.999f, 9.0f)
        (dtype('float32'), True)
        >>> bool(s.d_scale == s.bias2 / np.float32(0.5)), s.clip is None  # clip_grad < 0: no clipping
        (True, True)
    """
    ct = np.dtype(dtype).type
    if ct not in (np.float32, np.float64):
        raise TypeError(f"prepare_scalars computes in float32 or float64, got {np.dtype(dtype)}")
    f32 = _mxnet_param
    clip = ct(f32(clip_grad))
    wd_: Any = ct(f32(wd))  # a NumPy scalar: always applied (w * 0 keeps MXNet's NaN for an infinite w)
    with np.errstate(divide="ignore"):  # lr 0 (only FTML.update's fold_gradient asks): d_scale = inf, unused
        c = rule.constants(
            lr=ct(f32(lr)),
            t=ct(t),
            beta1=ct(f32(beta1)),
            beta2=ct(f32(beta2)),
            eps=ct(_mxnet_param(epsilon, double=True)),
            weight_decay=wd_,
            clip=clip if clip >= 0 else None,  # MXNet clips whenever clip_grad >= 0 (0 zeroes the gradient)
            grad_scale=ct(f32(rescale_grad)),
            power=_power_in(ct),
        )
    # Every constant is already a `ct` (rule.constants rounds NumPy scalars in their own type); the
    # cast is the rule's single way to state it (exact here).
    return c.cast(ct)


def _numpy_kernel(
    w: np.ndarray, g: np.ndarray, d: np.ndarray, v: np.ndarray, z: np.ndarray, out: np.ndarray | None, s: rule.Constants
) -> np.ndarray:
    """One FTML step with ufuncs, in MXNet's evaluation order; two full-size temporaries."""
    # explicit out= so that 0-d inputs still give arrays (a bare ufunc would return a scalar)
    assert s.grad_scale is not None and s.wd is not None  # prepare_scalars always sets both, as MXNet applies both
    gp = np.multiply(g, s.grad_scale, out=np.empty_like(g))  # g' (temporary 1)
    tmp = np.multiply(w, s.wd, out=np.empty_like(w))  # temporary 2
    np.add(gp, tmp, out=gp)
    if s.clip is not None:
        # MXNet's clip: x > c -> c, x < -c -> -c, else x (NaN passes through, -0.0 keeps its sign).
        np.copyto(gp, s.clip, where=gp > s.clip)
        np.copyto(gp, -s.clip, where=gp < -s.clip)
    # v = beta2 * v + (1 - beta2) * (g' * g')
    np.multiply(v, s.beta2, out=v)
    np.multiply(gp, gp, out=tmp)
    np.multiply(tmp, s.one_minus_beta2, out=tmp)
    np.add(v, tmp, out=v)
    # tmp <- d_t = ((1 - beta1^t) / lr) * (sqrt(v / (1 - beta2^t)) + eps)
    np.divide(v, s.bias2, out=tmp)
    np.sqrt(tmp, out=tmp)
    np.add(tmp, s.eps, out=tmp)
    np.multiply(tmp, s.d_scale, out=tmp)
    # z = beta1 * z + (1 - beta1) * g' - (d_t - beta1 * d) * w
    np.multiply(z, s.beta1, out=z)
    np.multiply(gp, s.one_minus_beta1, out=gp)
    np.add(z, gp, out=z)
    np.multiply(d, s.beta1, out=d)
    np.subtract(tmp, d, out=d)
    np.multiply(d, w, out=d)
    np.subtract(z, d, out=z)
    np.copyto(d, tmp)
    # w = -z / d_t; the weight is no longer read, so writing into `out` (maybe `w`) is safe.
    result = gp if out is None else out
    np.negative(z, out=result)
    np.divide(result, tmp, out=result)
    return result


Kernel = Callable[
    [np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, "np.ndarray | None", rule.Constants], np.ndarray
]


#: the variable that turns the compiled kernel off, and its deprecated old name
DISABLE_ENV = "FTMLOPT_DISABLE_CPU_KERNELS"
_DEPRECATED_DISABLE_ENV = "FTMLOPT_DISABLE_NUMBA"


def _kernels_disabled() -> bool:
    """Whether :data:`DISABLE_ENV` (or, with a DeprecationWarning, its old name) asks for NumPy."""
    value = os.environ.get(DISABLE_ENV)
    if value is None:
        value = os.environ.get(_DEPRECATED_DISABLE_ENV)
        if value is not None:
            warnings.warn(
                f"{_DEPRECATED_DISABLE_ENV} is deprecated; set {DISABLE_ENV} instead", DeprecationWarning, stacklevel=4
            )
    return value not in (None, "", "0")


def _select_kernel(arrays: tuple[np.ndarray, ...]) -> Kernel:
    """The compiled CPU kernel when llvmlite is installed and the arrays are contiguous, else NumPy's."""
    if _kernels_disabled():
        return _numpy_kernel
    if not all(a.flags.c_contiguous for a in arrays):
        return _numpy_kernel
    from ftmlopt.mxnet import _kernel

    return _kernel.operator_kernel if _kernel.AVAILABLE else _numpy_kernel


def _check_array(value: Any, name: str) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(value).__name__}")
    if value.dtype not in _SUPPORTED:
        raise TypeError(f"{name} must have dtype float16, float32 or float64, got {value.dtype}")
    return value


def _check_writable(value: np.ndarray, name: str) -> None:
    if not value.flags.writeable:
        raise ValueError(f"{name} must be writable (it is updated in place)")


def ftml_update(
    weight: np.ndarray,
    grad: np.ndarray,
    d: np.ndarray,
    v: np.ndarray,
    z: np.ndarray,
    lr: float,
    t: int,
    beta1: float = rule.DEFAULT_BETA1,
    beta2: float = rule.DEFAULT_BETA2,
    epsilon: float = rule.DEFAULT_EPS,
    wd: float = 0.0,
    rescale_grad: float = 1.0,
    clip_grad: float = -1.0,
    out: np.ndarray | None = None,
) -> np.ndarray:
    r"""One FTML step, numerically identical to MXNet 1.9.1's ``ftml_update`` operator.

    .. math::

        g' &= \mathrm{clip}(\mathrm{rescale\_grad}\cdot g + \mathrm{wd}\cdot w)\\
        v &\leftarrow \beta_2 v + (1-\beta_2) g'^2\\
        d_t &= \tfrac{1-\beta_1^t}{\mathrm{lr}}\big(\sqrt{v/(1-\beta_2^t)} + \epsilon\big)\\
        z &\leftarrow \beta_1 z + (1-\beta_1) g' - (d_t - \beta_1 d) w\\
        d &\leftarrow d_t, \qquad w_{\text{new}} = -z / d_t

    Args:
        weight: the current weight (read only, unless ``out is weight``).
        grad: the gradient, same shape and dtype (never modified).
        d, v, z: the FTML state, same shape and dtype; updated in place.
        lr: learning rate, finite and > 0.
        t: the update count, an int >= 1 (1 on the first step).
        beta1, beta2: decay rates in [0, 1).
        epsilon: added outside the square root; finite and >= 0.
        wd: L2 weight decay, folded into the gradient *before* clipping (MXNet 1.x order).
        rescale_grad: gradient scale, finite and >= 0.
        clip_grad: clip ``g'`` to ``[-clip_grad, clip_grad]`` when ``>= 0`` (so 0 zeroes
            the gradient, exactly as MXNet's operator); a negative value turns clipping off.
        out: where to write the new weight; ``out=weight`` updates in place. A new array is
            returned when it is None.

    Returns:
        The new weight (``out`` when given).

    Raises:
        TypeError, ValueError: on bad input, before any array is modified.

    Example:
        >>> import numpy as np
        >>> from ftmlopt import ftml_update
        >>> w = np.array([1.0, -2.0], dtype=np.float32)
        >>> g = np.array([0.5, 0.0], dtype=np.float32)
        >>> d, v, z = (np.zeros_like(w) for _ in range(3))
        >>> ftml_update(w, g, d, v, z, lr=0.1, t=1, out=w).round(4)  # step 1 moves by ~lr
        array([ 0.9, -2. ], dtype=float32)
    """
    arrays = {
        "weight": _check_array(weight, "weight"),
        "grad": _check_array(grad, "grad"),
        "d": _check_array(d, "d"),
        "v": _check_array(v, "v"),
        "z": _check_array(z, "z"),
    }
    if out is not None:
        arrays["out"] = _check_array(out, "out")
    for name, arr in arrays.items():
        if arr.shape != weight.shape:
            raise ValueError(f"{name} has shape {arr.shape}, which does not match weight's shape {weight.shape}")
        if arr.dtype != weight.dtype:
            raise TypeError(f"{name} has dtype {arr.dtype}, which does not match weight's dtype {weight.dtype}")
    for name in ("d", "v", "z") + (("out",) if out is not None else ()):
        _check_writable(arrays[name], name)
    mutated = ("d", "v", "z")
    for i, a in enumerate(mutated):
        for b in (*mutated[i + 1 :], "weight", "grad"):
            if np.may_share_memory(arrays[a], arrays[b]):
                raise ValueError(f"state {a} shares memory with {b}; d, v and z must be separate arrays")
        if out is not None and np.may_share_memory(out, arrays[a]):
            raise ValueError(f"out shares memory with state {a}")
    rule.check_lr(lr, "lr", positive=True)  # the MXNet form divides by lr
    t = rule.check_step(t, "t")
    rule.check_beta(beta1, "beta1")
    rule.check_beta(beta2, "beta2")
    rule.check_eps(epsilon, "epsilon")
    rule.check_finite(wd, "wd")  # MXNet accepts a negative wd
    rule.check_grad_scale(rescale_grad, "rescale_grad")
    check_clip_bound(clip_grad, "clip_grad")

    if weight.dtype.name in rule.HALF_DTYPES:
        # Compute in float32 (rule.compute_dtype), round once: MXNet's half arithmetic underflows epsilon to 0.
        s = prepare_scalars(rule.compute_dtype(weight.dtype), lr, t, beta1, beta2, epsilon, wd, rescale_grad, clip_grad)
        d32, v32, z32 = (a.astype(np.float32) for a in (d, v, z))
        w32 = weight.astype(np.float32)
        new = _numpy_kernel(w32, grad.astype(np.float32), d32, v32, z32, None, s)
        for dst, src in ((d, d32), (v, v32), (z, z32)):
            np.copyto(dst, src, casting="same_kind")
        if out is None:
            return new.astype(np.float16)
        np.copyto(out, new, casting="same_kind")
        return out

    s = prepare_scalars(weight.dtype, lr, t, beta1, beta2, epsilon, wd, rescale_grad, clip_grad)
    kernel = _select_kernel(tuple(arrays.values()))
    return kernel(weight, grad, d, v, z, out, s)


def fold_gradient(
    weight: np.ndarray,
    grad: np.ndarray,
    v: np.ndarray,
    *,
    beta2: float = rule.DEFAULT_BETA2,
    wd: float = 0.0,
    rescale_grad: float = 1.0,
    clip_grad: float = -1.0,
) -> None:
    r"""The MXNet system's step at lr 0: ``v`` takes the gradient; the weight, ``d`` and ``z`` stay.

    .. math::

        g' = \mathrm{clip}(\mathrm{rescale\_grad}\, g + \mathrm{wd}\, w), \qquad
        v \leftarrow \beta_2 v + (1-\beta_2)\, g'^2

    ``v`` gets exactly the bits MXNet 1.9.1's ``ftml_update`` would write into it at lr 0 (the same
    parsing, rounding and order; ``v`` does not depend on lr or t). MXNet then writes
    ``d = inf`` and NaN weights; this is the rule's "lr 0 is no step" instead (see
    :mod:`ftmlopt.rule` and :class:`ftmlopt.mxnet.optimizer.FTML`). float16 is computed in float32
    and rounded once, as in :func:`ftml_update`. ``v`` is updated in place.

    Example:
        >>> import numpy as np
        >>> w, g, v = np.ones(2, np.float32), np.float32([0.5, -2.0]), np.zeros(2, np.float32)
        >>> fold_gradient(w, g, v, beta2=0.75)
        >>> v.tolist(), w.tolist()
        ([0.0625, 1.0], [1.0, 1.0])
    """
    for name, arr in (("weight", weight), ("grad", grad), ("v", v)):
        _check_array(arr, name)
        if arr.shape != weight.shape or arr.dtype != weight.dtype:
            raise ValueError(f"{name} has {arr.dtype} {arr.shape}, expected {weight.dtype} {weight.shape} like weight")
    _check_writable(v, "v")
    rule.check_beta(beta2, "beta2")
    rule.check_finite(wd, "wd")
    rule.check_grad_scale(rescale_grad, "rescale_grad")
    check_clip_bound(clip_grad, "clip_grad")
    ct = rule.compute_dtype(weight.dtype)
    # lr and t do not enter v; lr 0 and t 1 are this step's (d_scale comes out infinite and is not used).
    c = prepare_scalars(ct, 0.0, 1, rule.DEFAULT_BETA1, beta2, rule.DEFAULT_EPS, wd, rescale_grad, clip_grad)
    w, g, vc = (a.astype(ct, copy=False) for a in (weight, grad, v))
    new_v = rule.second_moment(vc, rule.gradient(g, w, c, clip=np.clip), c)
    np.copyto(v, new_v, casting="same_kind")
