"""``ftmlopt.optimizer``: the public address of :mod:`ftmlopt.mxnet.optimizer` (MXNet's optimizer system).

Example:
    >>> from ftmlopt import optimizer
    >>> optimizer.create("ftml", learning_rate=0.1).learning_rate
    0.1
"""

from ftmlopt.mxnet.optimizer import FTML, SGD, Optimizer, StateFormatError, Updater, create, get_updater, register

__all__ = ["FTML", "SGD", "Optimizer", "StateFormatError", "Updater", "create", "get_updater", "register"]
