"""Experiments: ``ftmlopt demo`` (:mod:`.demo`) and ``ftmlopt reproduce TASK`` (:mod:`.reproduce`).

* :mod:`.datasets`: where the data sets come from (``--data``, ``$FTMLOPT_DATA``, cache, checked download);
  also importable as :mod:`ftmlopt.datasets`.
* :mod:`.data`: the data loaders (NumPy only), over :mod:`.datasets` (``--data``, cache, download).
* :mod:`.harness`: optimizers, the paper's learning-rate search, seeds, JSON and plots.
* :mod:`.tasks`: one module per task of the paper (``timeseries``, ``mnist``, ``babi``, ``charlm``).

Nothing here imports torch at import time; the runs do.
"""
