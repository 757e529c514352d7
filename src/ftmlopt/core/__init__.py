"""The FTML rule itself: hyper-parameter validation and the MXNet-exact NumPy operator.

Everything else in ftmlopt (the MXNet-style optimizer system, the PyTorch, optax and Keras
front ends, the fused kernels) is a thin adapter around what lives here.
"""

from ftmlopt.core.operator import ftml_update

__all__ = ["ftml_update"]
