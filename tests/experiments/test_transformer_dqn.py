"""``ftmlopt reproduce transformer`` and ``dqn`` (quick mode), ``--merge``, ``--rates``, strict JSON."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from ftmlopt._json import write_json
from ftmlopt.cli import main
from ftmlopt.experiments import harness
from ftmlopt.experiments.reproduce import parse_rates
from ftmlopt.experiments.tasks import dqn, transformer


def _strict(path: Path) -> dict:
    def refuse(name: str) -> None:
        raise AssertionError(f"{path} is not strict JSON: {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture
def text_dir(tmp_path: Path) -> Path:
    """A small made-up corpus in the tiny-shakespeare layout (folder/input.txt)."""
    words = ["thou", "art", "the", "king", "and", "i", "thy", "fool", "now", "speak", "HAMLET:", "ROMEO:"]
    rng = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(words), (2500,), generator=rng).tolist()
    folder = tmp_path / "text"
    folder.mkdir()
    (folder / "input.txt").write_text(" ".join(words[i] for i in idx) + "\n", encoding="utf-8")
    return folder


def test_transformer_quick(text_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    args = ["reproduce", "transformer", "--quick", "--data", str(text_dir), "--out", str(out), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "AdamW" in printed and "val_loss" in printed
    res = _strict(out / "transformer.json")
    assert res["complete"] is True
    curves = res["variants"]["default"]["optimizers"]
    assert set(curves) == {"FTML", "AdamW", "Adam", harness.CONTROL}
    assert curves[harness.CONTROL]["lr"] == pytest.approx(0.4 * curves["FTML"]["lr"])
    for rec in curves.values():
        (run,) = rec["runs"]
        val = run["curves"]["validation loss"]
        assert len(run["losses"]) == len(val) == transformer.SPEC.quick_epochs
        # a character model starts near ln(vocabulary) and every number is a finite loss
        assert all(0 < x < 1.2 * math.log(30) for x in run["losses"] + val)
        assert run["metrics"]["val_loss"] == val[-1]
    assert (out / "transformer.png").read_bytes()[:4] == b"\x89PNG"


def test_transformer_optimizer_settings() -> None:
    model = transformer.build_model(vocab=11, d=8, layers=1, heads=2, block=16)
    decay, no_decay = transformer.param_groups(model)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    groups = transformer.param_groups(model)
    ftml = transformer.make_optimizer("FTML", groups, 0.01)
    assert ftml.defaults["decoupled_weight_decay"] is True and ftml.defaults["weight_decay"] == 0.1
    assert ftml.defaults["betas"] == (0.6, 0.999) and ftml.param_groups[1]["weight_decay"] == 0.0
    ctrl = transformer.make_optimizer(harness.CONTROL, transformer.param_groups(model), 0.004)
    assert ctrl.defaults["betas"] == (0.0, 0.999)
    # the same per-step decay lr * wd as FTML at 0.01
    assert ctrl.defaults["lr"] * ctrl.defaults["weight_decay"] == pytest.approx(0.01 * 0.1)
    with pytest.raises(ValueError, match="unknown optimizer"):
        transformer.make_optimizer("Lion", groups, 0.01)


def test_lr_factor_warms_up_then_decays_to_a_tenth() -> None:
    f = [transformer.lr_factor(s, 200, 20) for s in range(201)]
    assert f[0] == pytest.approx(1 / 20) and f[19] == pytest.approx(1.0) and f[20] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(f[20:]))  # non-increasing after warmup
    assert f[200] == pytest.approx(0.1) and f[110] == pytest.approx(0.55)


def test_dqn_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reproduce", "dqn", "--quick", "--seeds", "2", "--out", str(tmp_path), "--no-progress"]) == 0
    assert "last-quarter return" in capsys.readouterr().out
    res = _strict(tmp_path / "dqn.json")
    assert res["complete"] is True and set(res["optimizers"]) == set(dqn.OPTIMIZERS)
    steps = res["config"]["steps"]
    for name, rec in res["optimizers"].items():
        assert rec["lr"] in dqn.QUICK_GRIDS[name]
        assert [r["seed"] for r in rec["runs"]] == [0, 1]
        for run in rec["runs"]:
            ends, rets = run["ends"], run["returns"]
            assert len(ends) == len(rets) > 0 and ends[-1] <= steps
            # CartPole pays 1 per step, so an episode's return is its length: the gap between episode ends
            assert rets == [float(b - a) for a, b in zip([0, *ends[:-1]], ends)]
    assert [r["rank"] for r in res["summary"]] == [1, 2, 3]
    assert (tmp_path / "dqn.png").read_bytes()[:4] == b"\x89PNG"


def test_dqn_run_is_reproducible_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = dqn.train_dqn("FTML", 2.5e-3, seed=3, steps=300, learn_start=50)
    assert torch.equal(torch.get_rng_state(), before)
    assert a == dqn.train_dqn("FTML", 2.5e-3, seed=3, steps=300, learn_start=50)
    assert a != dqn.train_dqn("FTML", 2.5e-3, seed=4, steps=300, learn_start=50)


def test_dqn_optimizers_use_the_papers_epsilon() -> None:
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert [dqn.make_optimizer(n, p, 1e-3).defaults["eps"] for n in dqn.OPTIMIZERS] == [1e-2] * 3


def test_binned_and_summary() -> None:
    run = {"returns": [10.0, 30.0, 500.0], "ends": [10, 40, 540]}
    assert dqn.binned(run, steps=600, bin_size=200)[:1] == [20.0]
    assert math.isnan(dqn.binned(run, steps=600, bin_size=200)[1])
    (row,) = dqn.summarize({"FTML": {"lr": 1e-3, "at_grid_edge": False, "runs": [run]}}, steps=600)
    assert row["mean_return"] == pytest.approx(180.0) and row["late_return"] == 500.0 and row["solved_episodes"] == 1


def test_merge_combines_separate_runs(text_dir: Path, tmp_path: Path) -> None:
    for name in ("FTML", "Adam"):
        args = ["reproduce", "transformer", "--quick", "--optimizers", name, "--data", str(text_dir),
                "--out", str(tmp_path / name), "--no-progress"]
        assert main(args) == 0
    parts = [str(tmp_path / n / "transformer.json") for n in ("FTML", "Adam")]
    assert main(["reproduce", "transformer", "--merge", *parts, "--out", str(tmp_path / "all")]) == 0
    res = _strict(tmp_path / "all" / "transformer.json")
    assert set(res["variants"]["default"]["optimizers"]) == {"FTML", harness.CONTROL, "Adam"}
    assert [m["file"] for m in res["merged_from"]] == parts and res["complete"] is True
    assert "--optimizers FTML" in res["command"] and "--optimizers Adam" in res["command"]
    assert (tmp_path / "all" / "transformer.png").is_file()


def test_merge_refuses_another_task(text_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x.json").write_text(json.dumps({"task": "babi"}))
    assert main(["reproduce", "transformer", "--merge", str(tmp_path / "x.json"), "--out", str(tmp_path)]) == 2
    assert "task 'babi', expected 'transformer'" in capsys.readouterr().err


def test_parse_rates() -> None:
    assert parse_rates("FTML=0.025,Adam=1e-3") == {"FTML": 0.025, "Adam": 0.001}
    assert parse_rates(None) == {}
    for bad in ("FTML", "FTML=0", "FTML=-1", "=0.1", "FTML=x", "FTML=nan"):
        with pytest.raises(ValueError, match="Invalid --rates entry"):
            parse_rates(bad)


def test_rates_outside_the_task_are_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["reproduce", "timeseries", "--quick", "--rates", "NAG=0.1", "--out", str(tmp_path)]) == 2
    assert "Invalid --rates names" in capsys.readouterr().err


def test_write_json_is_strict(tmp_path: Path) -> None:
    path = write_json({"a": [1.0, math.nan, math.inf], "b": {"c": -math.inf}}, tmp_path / "x.json")
    assert _strict(path) == {"a": [1.0, None, None], "b": {"c": None}}


def test_seeds_shared_out_between_processes_merge_into_one_row(text_dir: Path, tmp_path: Path) -> None:
    common = ["reproduce", "transformer", "--quick", "--optimizers", "Adam", "--no-control", "--data", str(text_dir),
              "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0  # seed 0
    assert main([*common, "--first-seed", "1", "--seeds", "2", "--out", str(tmp_path / "b")]) == 0  # seeds 1, 2
    b = _strict(tmp_path / "b" / "transformer.json")
    assert b["config"]["seeds"] == [1, 2] and "--first-seed 1" in b["command"]
    parts = [str(tmp_path / p / "transformer.json") for p in ("b", "a")]
    assert main(["reproduce", "transformer", "--merge", *parts, "--out", str(tmp_path / "m")]) == 0
    merged = _strict(tmp_path / "m" / "transformer.json")
    (row,) = merged["variants"]["default"]["summary"]
    runs = merged["variants"]["default"]["optimizers"]["Adam"]["runs"]
    assert [r["seed"] for r in runs] == [0, 1, 2] and row["seeds"] == 3 and merged["config"]["seeds"] == [0, 1, 2]
    finals = [r["losses"][-1] for r in runs]
    assert row["score_mean"] == pytest.approx(sum(finals) / 3)
    # a part at another rate is refused
    assert main([*common, "--rates", "Adam=0.001", "--out", str(tmp_path / "c")]) == 0
    other = str(tmp_path / "c" / "transformer.json")
    assert main(["reproduce", "transformer", "--merge", parts[1], other, "--out", str(tmp_path / "n")]) == 2


def test_first_seed_must_not_be_negative(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reproduce", "timeseries", "--quick", "--first-seed", "-1", "--out", str(tmp_path)]) == 2
    assert "Invalid --first-seed: -1" in capsys.readouterr().err


def _dqn_part(path: Path, grid: dict[float, float], runs_lr: float, n_runs: int) -> str:
    runs = [{"seed": s, "returns": [10.0 * (s + 1)], "ends": [10 * (s + 1)]} for s in range(n_runs)]
    rec = {"lr": runs_lr, "at_grid_edge": False, "runs": runs,
           "grid": {repr(lr): {"lr": lr, "score": sc} for lr, sc in grid.items()}}
    part = {"task": "dqn", "title": "t", "paper_claim": "c", "command": f"part {path.name}", "complete": True,
            "seconds": 1.0,
            "config": {"steps": 100, "bin": 10, "seeds": list(range(n_runs)), "grids": {"FTML": sorted(grid)},
                       "optimizers": {"FTML": "ftml"}},
            "optimizers": {"FTML": rec}}
    path.write_text(json.dumps(part))
    return str(path)


@pytest.mark.parametrize(("upper_score", "lr", "edge"), [(95.0, 0.005, False), (110.0, 0.01, True)])
def test_dqn_merge_pools_an_extended_grid(tmp_path: Path, upper_score: float, lr: float, edge: bool) -> None:
    a = _dqn_part(tmp_path / "a.json", {0.005: 100.0, 0.0025: 90.0}, 0.005, 5)
    b = _dqn_part(tmp_path / "b.json", {0.01: upper_score}, 0.01, 5 if upper_score > 100 else 2)
    assert main(["reproduce", "dqn", "--merge", a, b, "--out", str(tmp_path / "m")]) == 0
    rec = _strict(tmp_path / "m" / "dqn.json")["optimizers"]["FTML"]
    assert rec["lr"] == lr and rec["at_grid_edge"] is edge and len(rec["runs"]) == 5
    assert sorted(rec["grid"]) == ["0.0025", "0.005", "0.01"]
