"""Run the Keras cases once per Keras backend, each backend in one process of its own.

Keras reads ``KERAS_BACKEND`` once, when it is first imported, so one pytest process cannot test
two backends; each backend gets one child pytest, whose summary is checked here, that runs both
``keras_backend_cases.py`` (the front end's own tests) and ``keras_conformance_cases.py`` (the
conformance battery's Keras rows): Keras starts once per backend per run.

TensorFlow (Keras' default backend) does not share the main environment's pins, so ``make test``
installs it in a separate virtual environment (``.venv-tf``, pinned by constraints/tensorflow.txt)
and names its interpreter in ``FTMLOPT_TENSORFLOW_PYTHON``. That environment has no PyTorch, so
the two comparisons with ``ftmlopt.torch`` are left to the JAX and PyTorch runs.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

CASES = [Path(__file__).with_name(n) for n in ("keras_backend_cases.py", "keras_conformance_cases.py")]
ROOT = Path(__file__).resolve().parents[2]


def _tensorflow_python() -> str | None:
    """An interpreter that has TensorFlow: this one, $FTMLOPT_TENSORFLOW_PYTHON, or .venv-tf's."""
    if importlib.util.find_spec("tensorflow") is not None:
        return sys.executable
    named = os.environ.get("FTMLOPT_TENSORFLOW_PYTHON")
    if named:
        return named  # named on purpose: if it is broken, the run below fails and says so
    local = ROOT / ".venv-tf" / "bin" / "python"
    return str(local) if local.exists() else None


@pytest.mark.parametrize("backend", ["jax", "torch", "tensorflow"])
def test_keras_backend(backend, tmp_path):
    env = dict(os.environ, KERAS_BACKEND=backend, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    python, extra = sys.executable, []
    if backend == "jax":
        env["JAX_ENABLE_X64"] = "1"  # the float64 cases need it; float32 variables stay float32
    if backend == "tensorflow":
        python = _tensorflow_python()
        if python is None:
            if os.environ.get("CI"):
                pytest.fail("no TensorFlow interpreter: run `make test` (it builds .venv-tf)")
            pytest.skip("TensorFlow is not installed; `make test` installs it in .venv-tf")
        if python != sys.executable:
            extra = ["-k", "not torch_front_end"]  # .venv-tf has no PyTorch
    # importlib mode: the default would put tests/ on sys.path, where tests/jax passes for the jax
    # package in an environment without JAX (.venv-tf), and Keras then probes it.
            env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    args = ["-q", "-p", "no:cacheprovider", "--import-mode=importlib", f"--basetemp={tmp_path}", *extra]
    proc = subprocess.run(
        [python, "-m", "pytest", *map(str, CASES), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-20000:]
    summary = re.search(r"(\d+) passed", output)
    assert summary and int(summary.group(1)) >= 60 + 32, output[-5000:]  # 32 conformance rows
    assert not re.search(r"\d+ (skipped|failed|errors?)\b", output), output[-5000:]
