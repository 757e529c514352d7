"""Run tests/keras/keras_backend_cases.py once per Keras backend, each in its own process.

Keras reads ``KERAS_BACKEND`` once, when it is first imported, so one pytest process cannot test
two backends; each backend gets a child pytest whose summary is checked here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("keras_backend_cases.py")


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_keras_backend(backend, tmp_path):
    env = dict(os.environ, KERAS_BACKEND=backend, JAX_PLATFORMS="cpu")
    if backend == "jax":
        env["JAX_ENABLE_X64"] = "1"  # the float64 cases need it; float32 variables stay float32
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(CASES), "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    summary = re.search(r"(\d+) passed", output)
    assert summary and int(summary.group(1)) >= 20, output
    assert not re.search(r"\d+ (skipped|failed|errors?)\b", output), output
