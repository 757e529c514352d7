"""The GPU check's CPU parts: arguments, report writing, failure handling and the ``--cpu-dry-run`` path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ftmlopt.bench import gpu_check


def test_dry_run_runs_every_section_and_writes_strict_json_and_markdown(tmp_path) -> None:
    out = tmp_path / "gc"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "ftmlopt.bench.gpu_check", "--out", str(out), "--cpu-dry-run"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    text = (out / "gpu_check.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    report = json.loads(text)
    assert report["dry_run"] is True and report["environment"]["TRITON_INTERPRET"] == "1"
    sections = report["sections"]
    assert list(sections) == ["correctness", "lowbit", "cuda_graph", "compile", "bench"]
    assert all(s["ok"] for s in sections.values()), sections
    rows = sections["correctness"]["result"]
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"registered op", "triton interpreter"}
    # both forms, the four option sets, and every (param, state) pair of the registered op
    op_rows = [r for r in rows if r["kernel"] == "registered op"]
    assert len(op_rows) == 2 * 4 * 4 and all(r["found_inf_unchanged"] for r in op_rows)
    # the low-bit kernels (CPU op and Triton interpreter): 8/4 bits x both roundings x float32/bfloat16, and on
    # the CPU both are the reference bit for bit
    low = sections["lowbit"]["result"]
    assert {(r["kernel"], r["bits"], r["rounding"], r["param"]) for r in low} == {
        (k, b, r, p) for k in ("registered op", "triton interpreter") for b in (8, 4)
        for r in ("stochastic", "nearest") for p in ("float32", "bfloat16")}
    assert all(r["bit_identical"] and r["max_code_steps"] == 0 for r in low), low
    bench = sections["bench"]["result"]
    assert bench["copy_gb_per_s"] > 0
    assert [(w["dtype"]) for w in bench["workloads"]] == ["float32", "bfloat16"]
    for w in bench["workloads"]:
        names = {r["name"] for r in w["results"]}
        assert {"ftml fused", "ftml fused compact", "ftml fused 8-bit", "ftml fused 4-bit", "adam fused",
                "adam foreach", "floor"} <= names
        for r in w["results"]:
            assert r["error"] is None, r
            assert r["percent_of_copy_bandwidth"] > 0
    md = (out / "gpu_check.md").read_text()
    assert "## lowbit: ok" in md and "| triton interpreter | 4 | nearest | bfloat16 | True | 0 |" in md
    assert "## correctness: ok" in md and "% copy bandwidth" in md and "### 2x20000 bfloat16" in md


def test_a_failing_section_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def broken(device, backend="inductor"):
        raise RuntimeError("compile broke")

    monkeypatch.setattr(gpu_check, "check_compile", broken)
    code = gpu_check.main(["--out", str(tmp_path), "--cpu-dry-run", "--sections", "compile,cuda_graph"])
    assert code == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["sections"]["compile"]["ok"] is False
    assert "compile broke" in report["sections"]["compile"]["error"]
    assert report["sections"]["cuda_graph"]["ok"] is True
    assert "## compile: FAILED" in (tmp_path / "gpu_check.md").read_text()


def test_without_cuda_and_without_dry_run_it_refuses(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_interpreter_mode_is_refused_on_the_real_run(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "unset it" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--out", "x", "--sections", "bench,nope"], "unknown section"), (["--out", "x", "--budget", "0"], "--budget"),
     (["--out", "x", "--rounds", "0"], "--rounds")],
)
def test_bad_arguments(argv, message, capsys) -> None:
    with pytest.raises(SystemExit):
        gpu_check.parse_args(argv)
    assert message in capsys.readouterr().err


def test_budget_spent_marks_sections_skipped(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    times = iter([0.0, 1e9, 1e9, 1e9])
    monkeypatch.setattr(gpu_check.time, "monotonic", lambda: next(times, 1e9))
    assert gpu_check.main(["--out", str(tmp_path), "--cpu-dry-run", "--sections", "compile", "--budget", "1"]) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert "time budget" in report["sections"]["compile"]["error"]


def test_render_markdown_tables() -> None:
    report = {"device": "X", "environment": {"torch": "2.11"}, "sections": {
        "bench": {"ok": True, "seconds": 1.0, "result": {"copy_gb_per_s": 4000.0, "workloads": [
            {"workload": "16m", "dtype": "float32", "elements": 16, "results": [
                {"name": "ftml fused", "median_ms": 0.5, "gb_per_s": 3000.0, "percent_of_copy_bandwidth": 75.0,
                 "ratio_to_fused_adam": 1.2, "percent_of_floor": 90.0, "state_bytes_per_param": 12.0,
                 "peak_extra_bytes": 0},
                {"name": "floor", "error": "no"}]}]}},
        "cuda_graph": {"ok": False, "seconds": 2.0, "result": {"compact": {"ok": False}}}}}
    md = gpu_check.render_markdown(report)
    assert "| ftml fused | 0.500 | 3000 | 75 | 1.20 | 90 | 12 | 0 |" in md
    assert "| floor | not run: no |" in md
    assert "## cuda_graph: FAILED (2.0 s)" in md and "copy bandwidth: 4000 GB/s" in md
