"""Every Python block of docs/readme-sections/jax-keras.md runs as written, in a fresh process
(each block picks its own Keras backend and JAX configuration, which are global per process)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SECTION = Path(__file__).resolve().parents[2] / "docs" / "readme-sections" / "jax-keras.md"
BLOCKS = re.findall(r"```python\n(.*?)```", SECTION.read_text(encoding="utf-8"), flags=re.DOTALL)


def test_the_section_has_the_three_examples():
    text = "\n".join(BLOCKS)
    assert len(BLOCKS) == 3
    assert "optax.apply_updates" in text and "nnx.Optimizer" in text and "model.compile" in text


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("KERAS_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKS[index]], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, BLOCKS[index] + "\n" + proc.stdout + proc.stderr
