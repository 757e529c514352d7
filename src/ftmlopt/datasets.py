"""``ftmlopt.datasets``: the documented name of :mod:`ftmlopt.experiments.datasets` (the experiments' data sets).

The code lives with the experiments, its only user; this module keeps the public import path working.
It needs nothing but the standard library to import (a download needs the ``demo`` extra).

Example:
    >>> from ftmlopt.datasets import DATASETS, fetch
    >>> sorted(DATASETS)
    ['babi-qa1', 'mnist', 'tinyshakespeare']
"""

from __future__ import annotations

from ftmlopt.experiments.datasets import (
    DATA_ENV,
    DATASETS,
    ChecksumMismatchError,
    DataFiles,
    Dataset,
    DataUnavailableError,
    IncompleteDownloadError,
    RemoteFile,
    cache_root,
    describe,
    download,
    fetch,
)

__all__ = [
    "DATASETS",
    "DATA_ENV",
    "ChecksumMismatchError",
    "DataFiles",
    "DataUnavailableError",
    "Dataset",
    "IncompleteDownloadError",
    "RemoteFile",
    "cache_root",
    "describe",
    "download",
    "fetch",
]
