r"""MXNet 1.9.1's ``ftml_update`` as one compiled pass: the operator's specialisation of the CPU kernels.

The code generation, compilation and threading are :mod:`ftmlopt.kernels.cpu`'s (its ``"operator"``
:class:`~ftmlopt.kernels.cpu.Spec`: ``g * rescale_grad``, the L2 term always added, ``out`` may be
another array than ``w``). This module only binds that kernel to the MXNet system's constants,
so the imports run one way: :mod:`ftmlopt.mxnet` -> :mod:`ftmlopt.kernels` -> :mod:`ftmlopt.rule`.

The per-element operations and their order are those of
:func:`ftmlopt.mxnet.operator._numpy_kernel` (no FMA, no reassociation), so both give the same
bits (``tests/kernels/test_operator_kernel.py``, and ``tests/mxnet`` against MXNet's own results).

Example:
    >>> import numpy as np
    >>> from ftmlopt.mxnet import _kernel
    >>> from ftmlopt.mxnet.operator import prepare_scalars
    >>> w = np.array([1.0, -2.0], dtype=np.float32)
    >>> g = np.array([0.5, 0.0], dtype=np.float32)
    >>> d, v, z = (np.zeros_like(w) for _ in range(3))
    >>> c = prepare_scalars(np.float32, 0.1, 1, 0.6, 0.999, 1e-8, 0.0, 1.0, -1.0)
    >>> _kernel.AVAILABLE  # llvmlite is installed ('ftmlopt[cpu]')
    True
    >>> new = _kernel.operator_kernel(w, g, d, v, z, None, c)
    >>> [round(float(x), 6) for x in new]  # each weight moves by about lr on the first step
    [0.9, -2.0]
"""

from __future__ import annotations

import numpy as np

from ftmlopt import rule
from ftmlopt.kernels import cpu

__all__ = ["AVAILABLE", "operator_kernel"]

#: whether the compiled kernel can be used here (llvmlite >= 0.44 importable)
AVAILABLE: bool = cpu.AVAILABLE


def operator_kernel(
    w: np.ndarray,
    g: np.ndarray,
    d: np.ndarray,
    v: np.ndarray,
    z: np.ndarray,
    out: np.ndarray | None,
    c: rule.Constants,
    threads: int | None = None,
) -> np.ndarray:
    r"""MXNet's FTML operator in one pass; bit-identical to :func:`ftmlopt.mxnet.operator._numpy_kernel`.

    .. math::

        g' = \mathrm{clip}(\mathrm{rescale}\,g + \mathrm{wd}\,w),\;
        v \leftarrow \beta_2 v + (1-\beta_2) g'^2,\;
        d_t = \tfrac{1-\beta_1^t}{\mathrm{lr}}(\sqrt{v/(1-\beta_2^t)} + \epsilon),\;
        z \leftarrow \beta_1 z + (1-\beta_1) g' - (d_t - \beta_1 d) w,\;
        d \leftarrow d_t,\; w' = -z/d_t

    Args:
        w, g, d, v, z: C-contiguous arrays of one shape and one dtype (float32 or float64);
            ``d``, ``v``, ``z`` are updated in place.
        out: where to write the new weight (may be ``w``); a new array when None.
        c: the constants from :func:`ftmlopt.mxnet.operator.prepare_scalars`, already rounded to
            the arrays' dtype as MXNet rounds them (``c.clip`` None: no clipping).
        threads: threads to use (default :func:`ftmlopt.kernels.cpu.default_threads`).

    Returns:
        The new weight.
    """
    if not AVAILABLE:
        cpu.kernel(cpu.Spec("operator", "float32", "float32"))  # raises ImportError, naming what to install
    dtype = w.dtype
    if dtype.name not in ("float32", "float64"):
        raise TypeError(f"operator_kernel takes float32 or float64 arrays, got {dtype}")
    result = np.empty_like(w) if out is None else out
    spec = cpu.Spec("operator", dtype.name, dtype.name, clip=c.clip is not None, separate_out=result is not w)
    fn = cpu.kernel(spec)
    # The constants are already in the arrays' dtype, so this cast is exact (the operator multiplies by `scale`).
    k = cpu.k_vector(c, dtype, scale=1.0 if c.grad_scale is None else c.grad_scale)
    addresses = np.array([[a.ctypes.data for a in (w, g, d, v, z, result)]], dtype=np.int64)
    per = np.array([[c.d_scale, c.bias2]], dtype=dtype)
    ptrs, counts, coefs = cpu.pieces(addresses, np.array([w.size], dtype=np.int64), [dtype.itemsize] * 6, per)
    cpu.run(fn, ptrs, counts, coefs, k, cpu.default_threads() if threads is None else threads)
    return result
