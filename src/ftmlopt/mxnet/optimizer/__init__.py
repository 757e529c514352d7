"""MXNet 1.9's optimizer system over NumPy arrays: ``Optimizer``, ``FTML``, ``Updater``.

Example:
    >>> import numpy as np
    >>> from ftmlopt import optimizer
    >>> opt = optimizer.create("ftml", learning_rate=0.1, wd=1e-4)
    >>> updater = optimizer.get_updater(opt)
    >>> w = np.ones(4, dtype=np.float32)
    >>> for _ in range(3):
    ...     updater(0, 2 * w, w)   # minimise sum(w**2): gradient 2w
    >>> bool((w < 1).all())
    True
"""

from ftmlopt.mxnet.optimizer.base import Optimizer, create, register
from ftmlopt.mxnet.optimizer.ftml import FTML
from ftmlopt.mxnet.optimizer.serialization import StateFormatError
from ftmlopt.mxnet.optimizer.sgd import SGD
from ftmlopt.mxnet.optimizer.updater import Updater, get_updater

__all__ = ["FTML", "SGD", "Optimizer", "StateFormatError", "Updater", "create", "get_updater", "register"]
