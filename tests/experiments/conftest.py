"""Fixtures of the experiment tests: a synthetic data folder, and single-threaded torch.

``data_dir`` is a session-wide folder laid out as ``--data`` expects (``mnist/``, ``mnist10k/``,
``babi-qa1/``, ``tinyshakespeare/``), filled with small synthetic data in the real file formats by
``_synthetic.py``; ``data_written`` says what went into it. Nothing reads real data sets or the network:
``$FTMLOPT_DATA`` is cleared and the per-user cache pointed at an empty temporary folder for every test.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _synthetic import DataRoot, write_data_root


@pytest.fixture(scope="session")
def data_written(tmp_path_factory: pytest.TempPathFactory) -> DataRoot:
    return write_data_root(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def data_dir(data_written: DataRoot) -> Path:
    """The synthetic data folder (pass it, or a subfolder of it, as ``data``/``--data``)."""
    return data_written.root


@pytest.fixture(scope="session")
def shared_data(data_dir: Path) -> Path:
    """Former name of :func:`data_dir`, kept for tests written against it."""
    return data_dir


@pytest.fixture(autouse=True)
def _no_real_data(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test finds a real data set through the environment or the user's cache, or downloads one."""
    monkeypatch.delenv("FTMLOPT_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))

    def offline(host: Any, *args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_AGAIN, f"the experiment tests never use the network ({host})")

    # every HTTP client resolves the host name first: refusing that is being offline, whatever the library
    monkeypatch.setattr(socket, "getaddrinfo", offline)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Single-threaded torch where torch is installed: faster on a shared 2-core machine, and bit-reproducible."""
    try:
        import torch
    except ImportError:  # the NumPy-only install runs the data tests here too
        torch = None
    if not hasattr(torch, "get_num_threads"):  # absent, or only tests/torch seen as a namespace package
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
