"""MXNet 1.9's FTML system over NumPy, bit for bit: the operator and the optimizer machinery.

* :func:`ftmlopt.mxnet.operator.ftml_update` (also ``ftmlopt.ftml_update``): the ``ftml_update`` operator.
* :mod:`ftmlopt.mxnet.optimizer` (also ``ftmlopt.optimizer``): ``Optimizer``, ``FTML``, ``SGD``,
  ``Updater``, ``create``/``register``.
* :mod:`ftmlopt.mxnet.lr_scheduler` (also ``ftmlopt.lr_scheduler``): MXNet's learning-rate schedulers.

The MXNet behaviour reproduced is described in ``docs/mxnet-semantics.md``; what "bit for bit" covers
is measured in ``docs/mxnet-parity.md``; the deliberate differences are listed in ``docs/mxnet-system.md``.
"""
