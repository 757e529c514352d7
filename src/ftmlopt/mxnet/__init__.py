"""MXNet 1.9's FTML system over NumPy, bit for bit: the operator and the optimizer machinery.

* :func:`ftmlopt.mxnet.operator.ftml_update` (also ``ftmlopt.ftml_update``): the ``ftml_update`` operator.
* :mod:`ftmlopt.mxnet.optimizer` (also ``ftmlopt.optimizer``): ``Optimizer``, ``FTML``, ``SGD``,
  ``Updater``, ``create``/``register``.
* :mod:`ftmlopt.mxnet.lr_scheduler` (also ``ftmlopt.lr_scheduler``): MXNet's learning-rate schedulers.

What "bit for bit" covers, and where ftmlopt deliberately differs, is in ``docs/mxnet-parity.md``.
"""
