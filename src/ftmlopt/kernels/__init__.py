"""Fused FTML kernels: one pass over memory per step.

* :mod:`ftmlopt.kernels.numba_cpu` -- CPU kernels compiled by Numba (``parallel=True``, no
  fastmath): MXNet's operator bit for bit (used by :func:`ftmlopt.ftml_update`), and a
  multi-tensor step over a table of addresses (used by ``ftmlopt.torch.FTML(fused=True)``).
* :mod:`ftmlopt.kernels.triton_cuda` -- the CUDA multi-tensor kernel written in Triton, one
  launch per (device, dtype) group, registered as a ``torch.library`` op.

Both modules import without their optional dependency and then report ``AVAILABLE = False``;
nothing here is imported by ``import ftmlopt``.
"""
