"""Experiments: ``ftmlopt demo`` (:mod:`.demo`) and ``ftmlopt reproduce TASK`` (:mod:`.reproduce`).

* :mod:`.data`: locating ``shared/data`` and the data loaders (NumPy only).
* :mod:`.harness`: optimizers, the paper's learning-rate search, seeds, JSON and plots.
* :mod:`.tasks`: one module per task of the paper (``timeseries``, ``mnist``, ``babi``, ``charlm``).

Nothing here imports torch at import time; the runs do.
"""
