"""Fixtures of the experiment tests: where the shared data lives.

``$FTMLOPT_SHARED_DATA`` if set, else ``<repo>/../shared/data`` (CI clones the repo next to ``shared/``).
A missing folder is an error, not a skip: these tests must run in CI.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    env = os.environ.get("FTMLOPT_SHARED_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    if not path.is_dir():
        pytest.fail(f"shared data folder {path} not found; set FTMLOPT_SHARED_DATA", pytrace=False)
    return path


@pytest.fixture(autouse=True)
def _one_thread():
    """Single-threaded torch: faster on a shared 2-core machine, and bit-reproducible."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
