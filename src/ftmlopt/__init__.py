"""ftmlopt: the FTML optimizer (Follow the Moving Leader, Zheng & Kwok, ICML 2017).

* :func:`ftmlopt.ftml_update`: MXNet 1.9.1's ``ftml_update`` operator over NumPy arrays, bit-exact.
* :mod:`ftmlopt.mxnet.optimizer`, :mod:`ftmlopt.mxnet.lr_scheduler`: MXNet 1.9's ``Optimizer`` machinery.
* :mod:`ftmlopt.torch`, :mod:`ftmlopt.optax`, :mod:`ftmlopt.keras`: framework front ends (optional
  extras, imported lazily: ``import ftmlopt`` needs nothing but NumPy).
"""

from ftmlopt.mxnet.operator import ftml_update

__version__ = "0.1.0"
__all__ = ["__version__", "ftml_update"]
