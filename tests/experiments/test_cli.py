"""``ftmlopt demo`` and ``ftmlopt reproduce`` through the command line."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ftmlopt.cli import main
from ftmlopt.experiments import demo, reproduce


def test_demo_prints_table_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["demo", "--epochs", "1", "--iterations", "3", "--seeds", "1", "--out", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    for name in ("FTML", "Adam", "RMSprop", "SGD-Nesterov", "Adam(b1=0)"):
        assert name in out
    assert "held-out acc" in out and "Verdict" in out
    png = tmp_path / "demo.png"
    assert f"plot: {png}" in out and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("module", [demo, reproduce])
def test_missing_extra_is_named(module, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    args = ["demo"] if module is demo else ["reproduce", "timeseries", "--quick"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install 'ftmlopt[demo]'" in err


def test_reproduce_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["reproduce", "timeseries", "--quick", "--epochs", "4", "--seeds", "2", "--out", str(tmp_path),
                 "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "[changing]" in out and "[stationary]" in out and "Adam(b1=0)" in out
    assert (tmp_path / "timeseries.json").is_file() and (tmp_path / "timeseries.png").is_file()


def test_reproduce_missing_data_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reproduce", "mnist", "--quick", "--data", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err


def test_reproduce_rejects_bad_task() -> None:
    with pytest.raises(SystemExit):
        main(["reproduce", "cifar"])


def test_numpy_demo_trains_through_the_mxnet_style_api(capsys: pytest.CaptureFixture[str]) -> None:
    """``ftmlopt demo --backend numpy``: FTML and SGD both learn; FTML reaches the lower training loss."""
    assert main(["demo", "--backend", "numpy", "--epochs", "5", "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    lines = {line.split()[0]: line.split() for line in out if line[:4] in ("FTML", "SGD ")}
    ftml_loss, sgd_loss = float(lines["FTML"][1]), float(lines["SGD"][1])
    assert ftml_loss < sgd_loss < 2.3  # 2.3 = ln(10), an untrained classifier's loss
    assert float(lines["FTML"][2].rstrip("%")) > 80
