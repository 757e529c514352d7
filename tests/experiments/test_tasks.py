"""Every task's ``--quick`` run end to end, and determinism (same seed, same curve)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ftmlopt.experiments.harness import CONTROL, make_optimizer
from ftmlopt.experiments.reproduce import reproduce
from ftmlopt.experiments.tasks import HARNESS_TASKS, get_spec

DATA_DIRS = {
    "timeseries": None, "mnist": "mnist10k", "babi": "babi-qa1", "charlm": "tinyshakespeare",
    "transformer": "tinyshakespeare",
}


@pytest.mark.parametrize("task", HARNESS_TASKS)
def test_quick_run_writes_json_and_png(task: str, shared_data: Path, tmp_path: Path) -> None:
    spec = get_spec(task)
    data = str(shared_data / DATA_DIRS[task]) if DATA_DIRS[task] else None
    res = reproduce(task, quick=True, data=data, out=tmp_path, progress=False)
    saved = json.loads((tmp_path / f"{task}.json").read_text())
    assert (tmp_path / f"{task}.png").read_bytes()[:4] == b"\x89PNG"
    assert saved["task"] == task and saved["config"]["epochs"] == spec.quick_epochs
    assert set(saved["variants"]) == set(spec.variants)
    for variant in spec.variants:
        curves = saved["variants"][variant]["optimizers"]
        assert set(curves) == {*spec.optimizers, CONTROL}
        for name in spec.optimizers:
            assert curves[name]["lr"] in spec.quick_grids[name]
            assert set(curves[name]["grid"]) == {repr(lr) for lr in spec.quick_grids[name]}
        assert curves[CONTROL]["lr"] == pytest.approx(0.4 * curves["FTML"]["lr"])
        for rec in curves.values():
            (run,) = rec["runs"]
            assert len(run["losses"]) == spec.quick_epochs
            assert all(math.isfinite(x) and x > 0 for x in run["losses"])
        ranks = [row["rank"] for row in saved["variants"][variant]["summary"]]
        assert ranks == list(range(1, len(spec.optimizers) + 2))
    assert res["variants"].keys() == saved["variants"].keys()
    # the JSON says which files the run used (or none, for generated data)
    if data is None:
        assert saved["data"] is None
    else:
        assert saved["data"]["source"] == "--data" and saved["data"]["files"]
        for f in saved["data"]["files"]:
            assert f["bytes"] == (Path(saved["data"]["folder"]) / f["name"]).stat().st_size
            assert len(f["sha256"]) == 64


def _curve(task: str, data, seed: int, epochs: int = 2) -> list[float]:
    spec = get_spec(task)
    build = spec.optimizer_factory or make_optimizer
    if spec.with_horizon:
        data = {**data, "units": epochs}
    run = spec.make_run(data, spec.variants[0], lambda p: build("FTML", p, 0.0025), seed, True)
    return [run.step() for _ in range(epochs)]


@pytest.mark.parametrize("task", HARNESS_TASKS)
def test_same_seed_same_curve(task: str, shared_data: Path) -> None:
    spec = get_spec(task)
    data = spec.load(shared_data / DATA_DIRS[task] if DATA_DIRS[task] else None, True)
    first = _curve(task, data, seed=0)
    assert _curve(task, data, seed=0) == first  # bit for bit
    assert _curve(task, data, seed=1) != first
