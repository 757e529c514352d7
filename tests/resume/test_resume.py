"""Exact resume for every front end: stop after k steps, save, load in a NEW process, continue.

The worker (``_resume_worker.py``) runs in two fresh interpreters per front end: ``save`` (the
uninterrupted run, writing checkpoints after k = 1 and k = 3 of its 5 steps) and ``resume`` (loads
each checkpoint into a freshly built optimizer and runs the remaining steps). The resumed weights
and states must equal the uninterrupted ones bit for bit. As a control, the same continuation
from the saved weights but with a *fresh* optimizer state must differ, so the comparison is not
vacuous (k = 1 is where FTML's bias correction makes a lost step count most visible).

Configurations: see ``_resume_worker`` (MXNet-style ``Updater`` with float16 multi-precision and a
dumped ``FactorScheduler``; torch default (compact)/for-loop/foreach/fused, the MXNet form (for-loop,
fused) and bfloat16 master copies with a ``StepLR``; optax full/compact/schedule/chained/direct with a
bfloat16 leaf; Keras on the JAX and PyTorch backends with coupled and decoupled decay and a schedule).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("_resume_worker.py")
sys.path.insert(0, str(WORKER.parent))
import _resume_worker as W  # noqa: E402


def _run(phase: str, frontend: str, root: Path, env: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, str(WORKER), phase, frontend, str(root)],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"{phase} {frontend} failed:\n{proc.stdout}\n{proc.stderr}"


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _check(root: Path, configs: list[str]) -> None:
    for cfg in configs:
        expected = _load(root / f"uninterrupted-{cfg}.npz")
        for k in W.KS:
            got = _load(root / f"resumed-{cfg}-k{k}.npz")
            assert sorted(got) == sorted(expected), f"{cfg} k={k}: different entries"
            for key, value in expected.items():
                assert got[key].tobytes() == value.tobytes(), (
                    f"{cfg} k={k}: {key} differs after resuming (max abs diff "
                    f"{np.max(np.abs(got[key] - value)):.3e})"
                )
            fresh = _load(root / f"fresh-{cfg}-k{k}.npz")
            assert any(fresh[key].tobytes() != value.tobytes() for key, value in expected.items() if "weight" in key), (
                f"{cfg} k={k}: a fresh optimizer reproduced the run, so the checkpoint was not tested"
            )


FRONTENDS = {
    "numpy": ("numpy", {}, ["plain", "full"]),
    "torch": ("torch", {}, list(W._TORCH_CONFIGS)),
    "optax": ("optax", {"JAX_PLATFORMS": "cpu"}, ["ftml", "compact", "schedule", "chain", "direct"]),
    "keras-jax": ("keras", {"KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}, ["coupled_clip", "decoupled_schedule"]),
    "keras-torch": ("keras", {"KERAS_BACKEND": "torch"}, ["coupled_clip", "decoupled_schedule"]),
}


@pytest.mark.parametrize("case", list(FRONTENDS))
def test_resume_in_new_process_is_bit_identical(case: str, tmp_path: Path) -> None:
    frontend, env, configs = FRONTENDS[case]
    _run("save", frontend, tmp_path, env)
    _run("resume", frontend, tmp_path, env)
    _check(tmp_path, configs)
