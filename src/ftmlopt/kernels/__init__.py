"""Fused FTML kernels: one pass over memory per step.

* :mod:`ftmlopt.kernels.cpu` -- CPU kernels written as LLVM IR and compiled through llvmlite
  (``pip install 'ftmlopt[cpu]'``) in milliseconds; vectorized, no fastmath, run on
  ``torch.get_num_threads()`` threads (torch's own OpenMP team where ATen runs on GNU libgomp,
  :mod:`ftmlopt.kernels.omp_team`; else a private pool) without touching any process-wide setting:
  the multi-tensor torch step (``ftmlopt.torch.FTML(fused=True)``) and MXNet's operator bit for bit
  (bound to the MXNet system's constants in :mod:`ftmlopt.mxnet._kernel`, used by
  :func:`ftmlopt.ftml_update`).
* :mod:`ftmlopt.kernels.triton_cuda` -- the CUDA multi-tensor kernel written in Triton, one
  launch per (device, dtype) group.
* :mod:`ftmlopt.kernels.cpu_lowbit`, :mod:`ftmlopt.kernels.triton_lowbit` -- the fused compact step
  with 8-/4-bit ``v`` (:mod:`ftmlopt.lowbit`'s format), one pass per block of 128 elements.

The kernels import only :mod:`ftmlopt.rule` (and :mod:`ftmlopt.lowbit`, the low-bit format next to it)
from ftmlopt, never :mod:`ftmlopt.mxnet` or a front end
(``tests/test_imports.py`` checks that the package's import graph has no cycle). Every module
imports without its optional dependency and then reports ``AVAILABLE = False``; nothing here is
imported by ``import ftmlopt``.
The benchmark's traffic floors live in :mod:`ftmlopt.bench.floors`, not here.
"""
