"""``ftmlopt.lr_scheduler``: the public address of :mod:`ftmlopt.mxnet.lr_scheduler` (MXNet's schedulers)."""

from ftmlopt.mxnet.lr_scheduler import (
    CosineScheduler,
    FactorScheduler,
    LRScheduler,
    MultiFactorScheduler,
    PolyScheduler,
)

__all__ = ["CosineScheduler", "FactorScheduler", "LRScheduler", "MultiFactorScheduler", "PolyScheduler"]
