"""The examples in the docstrings and in the README run and print what they claim."""

from __future__ import annotations

import doctest
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

DOCTEST_MODULES = [
    "ftmlopt.mxnet.operator",
    "ftmlopt.mxnet.optimizer",
    "ftmlopt.mxnet.optimizer.base",
    "ftmlopt.mxnet.optimizer.ftml",
    "ftmlopt.mxnet.optimizer.sgd",
    "ftmlopt.mxnet.optimizer.updater",
    "ftmlopt.mxnet.lr_scheduler",
]


@pytest.mark.parametrize("name", DOCTEST_MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0


def _readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


#: an import of an optional extra: such a README block is a `frameworks` test (the NumPy-only run skips it)
_EXTRA_IMPORT = re.compile(
    r"^\s*(?:import|from)\s+(?:torch|jax|optax|flax|keras|lightning|transformers|numba|triton|sklearn|matplotlib)\b",
    flags=re.M,
)


@pytest.mark.parametrize(
    "index",
    [
        pytest.param(i, marks=[pytest.mark.frameworks] if _EXTRA_IMPORT.search(block) else [])
        for i, block in enumerate(_readme_blocks())
    ],
)
def test_readme_python_blocks_run(index: int, tmp_path: Path) -> None:
    """Every ```python block of the README runs as it is, in a fresh interpreter."""
    code = _readme_blocks()[index]
    env = {**os.environ, "KERAS_BACKEND": os.environ.get("KERAS_BACKEND", "jax")}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"README block {index} failed:\n{code}\n--- stderr ---\n{proc.stderr[-3000:]}"
