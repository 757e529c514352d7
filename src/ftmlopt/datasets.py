"""``ftmlopt.datasets``: the documented name of :mod:`ftmlopt.experiments.datasets` (the experiments' data sets).

The code lives with the experiments, its only user; this module keeps the public import path working.
It needs nothing but the standard library to import (a download needs the ``demo`` extra).

Example:
    >>> from ftmlopt.datasets import DATASETS, fetch
    >>> sorted(DATASETS)
    ['babi-qa1', 'mnist', 'tinyshakespeare']
"""

from __future__ import annotations

from ftmlopt.experiments import datasets as _datasets
from ftmlopt.experiments.datasets import *  # noqa: F403  (the public names, listed in its __all__)

__all__ = list(_datasets.__all__)
