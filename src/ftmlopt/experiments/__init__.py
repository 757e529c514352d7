"""Experiments: ``ftmlopt demo`` (:mod:`.demo`) and ``ftmlopt reproduce TASK`` (:mod:`.reproduce`).

* :mod:`.data`: the data loaders (NumPy only), over :mod:`ftmlopt.datasets` (``--data``, cache, download).
* :mod:`.harness`: optimizers, the paper's learning-rate search, seeds, JSON and plots.
* :mod:`.tasks`: one module per task of the paper (``timeseries``, ``mnist``, ``babi``, ``charlm``).

Nothing here imports torch at import time; the runs do.
"""
