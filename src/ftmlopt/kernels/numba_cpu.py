r"""The MXNet operator's CPU kernel under its historical name (kept for :mod:`ftmlopt.mxnet.operator`).

The kernels used to be compiled by Numba with ``parallel=True``. They now live in
:mod:`ftmlopt.kernels.cpu`: LLVM IR compiled through llvmlite (which Numba installs), run on the
caller's thread budget, no OpenMP (see that module for why). This module re-exports what the
MXNet operator uses:

* :data:`AVAILABLE` -- whether the compiled kernel can be used (llvmlite >= 0.44 importable);
* :func:`operator_kernel` -- MXNet 1.9.1's ``ftml_update``, bit-identical to
  :func:`ftmlopt.mxnet.operator._numpy_kernel` (same operations, same order, no FMA).

Example:
    >>> import numpy as np
    >>> from ftmlopt.mxnet.operator import prepare_scalars
    >>> from ftmlopt.kernels import numba_cpu
    >>> w = np.array([1.0, -2.0], dtype=np.float32)
    >>> g = np.array([0.5, 0.0], dtype=np.float32)
    >>> d, v, z = (np.zeros_like(w) for _ in range(3))
    >>> s = prepare_scalars(np.float32, 0.1, 1, 0.6, 0.999, 1e-8, 0.0, 1.0, -1.0)
    >>> new = numba_cpu.operator_kernel(w, g, d, v, z, None, s) if numba_cpu.AVAILABLE else np.float32([0.9, -2])
    >>> [round(float(x), 6) for x in new]  # each weight moves by about lr on the first step
    [0.9, -2.0]
"""

from __future__ import annotations

from ftmlopt.kernels.cpu import AVAILABLE, PARALLEL_MIN, operator_kernel

__all__ = ["AVAILABLE", "PARALLEL_MIN", "operator_kernel"]
