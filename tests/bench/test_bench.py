"""``ftmlopt bench`` runs end to end on tiny sizes (no timing assertions: the numbers are noise here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from ftmlopt import cli
from ftmlopt.bench import WORKLOADS, main, parse_dtypes, parse_sizes, strict, write_json

EXPECTED = {
    "ftml for-loop", "ftml foreach", "ftml foreach compact", "ftml fused", "ftml fused compact",
    "ftml_update compiled", "ftml_update numpy", "adam for-loop", "adam foreach", "adam fused", "floor",
    "floor compact", "floor adam", "ftml fused 8-bit", "ftml fused 4-bit",
}
EXPECTED_HALF = {
    "ftml fused", "ftml fused compact", "ftml fused mp", "ftml fused compact mp", "ftml foreach",
    "ftml foreach compact", "adam foreach", "adam fused", "floor", "floor compact", "floor adam", "ftml fused 8-bit",
    "ftml fused 4-bit",
}


def test_parse_sizes() -> None:
    assert parse_sizes("3x100, 16m") == {"3x100": [(100,)] * 3, "16m": [(1 << 20,)] * 16}
    assert sum(1 for _ in WORKLOADS["resnet18"]) == 62
    assert sum(int(__import__("math").prod(s)) for s in WORKLOADS["resnet18"]) == 11_689_512
    for bad in ("3x", "x4", "0x5", "huge", ","):
        with pytest.raises(ValueError, match="--sizes"):
            parse_sizes(bad)


def test_bench_end_to_end_writes_json_and_table(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    # 2 x 100,000: large tensors cut into pieces over threads; 30 x 7: the many-small path
    argv = ["--sizes", "2x100000,30x7", "--rounds", "2", "--warmup", "1", "--json", str(out), "--quiet",
            "--dtype", "float32", "--no-extras"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["rounds"] == 2 and report["dtypes"] == ["float32"] and report["command"].startswith("ftmlopt bench")
    assert report["extras"] is None and len(report["load_average_before"]) == 3
    assert [w["workload"] for w in report["workloads"]] == ["2x100000", "30x7"]
    for workload in report["workloads"]:
        rows = {r["name"]: r for r in workload["results"]}
        assert set(rows) == EXPECTED
        for row in rows.values():
            assert row["error"] is None, row
            assert row["rounds"] == 2 and 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"]
            assert row["peak_extra_bytes"] >= 0
        assert rows["adam fused"]["ratio_to_fused_adam"] == 1.0
        assert rows["floor"]["percent_of_floor"] == 100.0
        assert rows["floor compact"]["percent_of_floor"] == 100.0
        # state bytes per parameter, float32: three-state 12, compact 4, Adam 8
        assert rows["ftml fused"]["state_bytes_per_param"] == 12
        assert rows["ftml fused compact"]["state_bytes_per_param"] == 4
        assert rows["adam fused"]["state_bytes_per_param"] == 8
        assert rows["ftml fused"]["bytes_per_element"] == 36 and rows["ftml fused compact"]["bytes_per_element"] == 20
        # low-bit state: codes + one float32 scale per 128 elements (2 x 100,000: 782 blocks; 30 x 7: 1 each)
        n, blocks = (100_000, 782) if workload["workload"] == "2x100000" else (7, 1)
        assert rows["ftml fused 8-bit"]["state_bytes_per_param"] == (n + 4 * blocks) / n
        assert rows["ftml fused 4-bit"]["state_bytes_per_param"] == ((n + 1) // 2 + 4 * blocks) / n
        assert rows["ftml fused 8-bit"]["bytes_per_element"] == 14.0625
    big = {r["name"]: r for r in report["workloads"][0]["results"]}
    array_bytes = 100_000 * 4
    # The fused step allocates nothing proportional to the parameters; NumPy's operator makes two temporaries.
    assert big["ftml fused"]["peak_extra_bytes"] < array_bytes / 4
    assert big["ftml fused compact"]["peak_extra_bytes"] < array_bytes / 4
    assert big["ftml_update numpy"]["peak_extra_bytes"] >= 2 * array_bytes
    table = capsys.readouterr().out
    assert "2x100000 float32: 2 tensors, 200,000 elements" in table and "x fused Adam" in table
    assert "| ftml fused compact |" in table and "state B/param" in table


def test_bench_half_dtypes_run_fused_without_staging_and_report_state(tmp_path) -> None:
    out = tmp_path / "half.json"
    argv = ["--sizes", "2x100000", "--rounds", "1", "--warmup", "0", "--json", str(out), "--quiet",
            "--dtype", "bfloat16,float16", "--no-extras"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    got = [(w["workload"], w["dtype"]) for w in report["workloads"]]
    assert got == [("2x100000", "bfloat16"), ("2x100000", "float16")]
    for workload in report["workloads"]:
        rows = {r["name"]: r for r in workload["results"]}
        assert set(rows) == EXPECTED_HALF
        for name, row in rows.items():
            assert row["error"] is None, (name, row)
        # half params get float32 state by default (ftmlopt.rule.state_dtype): v is 4 bytes; with
        # multi_precision the float32 master is added
        assert rows["ftml fused compact"]["state_bytes_per_param"] == 4
        assert rows["ftml fused compact mp"]["state_bytes_per_param"] == 8  # v and the master, float32
        assert rows["ftml fused mp"]["state_bytes_per_param"] == 16
        # no staging copies (a float32 copy of the params would be 800 KB): only bookkeeping is allocated
        for name in ("ftml fused", "ftml fused compact"):
            assert rows[name]["peak_extra_bytes"] < 100_000 * 2 / 2, name


def test_parse_dtypes() -> None:
    assert parse_dtypes("float32, bfloat16") == ["float32", "bfloat16"]
    for bad in ("float8", "", "int32"):
        with pytest.raises(ValueError, match="--dtype"):
            parse_dtypes(bad)


def test_json_is_strict(tmp_path) -> None:
    report = {"a": float("nan"), "b": [float("inf"), -float("inf"), 1.5], "c": (1, "x"), "d": None}
    path = tmp_path / "r.json"
    write_json(report, str(path))
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [None, None, 1.5], "c": [1, "x"], "d": None}
    assert strict({"x": 2.0}) == {"x": 2.0}


def test_bench_through_the_cli_with_only_and_float64(tmp_path, capsys) -> None:
    out = tmp_path / "b.json"
    argv = ["bench", "--sizes", "3x50", "--rounds", "1", "--warmup", "0", "--dtype", "float64", "--no-extras",
            "--only", "ftml fused,adam fused", "--json", str(out), "--quiet"]
    assert cli.main(argv) == 0
    rows = json.loads(out.read_text())["workloads"][0]["results"]
    assert [r["name"] for r in rows] == ["ftml fused", "adam fused"]


def test_bench_rejects_bad_rounds() -> None:
    with pytest.raises(ValueError, match="--rounds must be >= 1"):
        main(["--sizes", "1x10", "--rounds", "0", "--json", ""])


FAKE_MXNET = '''
"""A stand-in for mxnet with the same nd.ftml_update call, backed by ftmlopt (protocol test only)."""
import numpy as np
from ftmlopt import ftml_update as _update
__version__ = "0.0-fake"
class _ND:
    @staticmethod
    def array(a, dtype):
        return np.array(a, dtype=dtype)
    @staticmethod
    def zeros(shape, dtype):
        return np.zeros(shape, dtype=dtype)
    @staticmethod
    def ftml_update(w, g, d, v, z, lr, beta1, beta2, epsilon, t, out):
        CALLS.append(t)
        _update(w, g, d, v, z, lr, t, beta1, beta2, epsilon, out=out)
    @staticmethod
    def waitall():
        pass
CALLS = []
nd = _ND()
'''


def test_mxnet_option_drives_another_interpreter_round_by_round(tmp_path) -> None:
    (tmp_path / "mxnet.py").write_text(textwrap.dedent(FAKE_MXNET))
    out = tmp_path / "b.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    code = (
        "from ftmlopt.bench import main; import sys; "
        f"sys.exit(main(['--sizes', '2x30', '--rounds', '3', '--warmup', '1', '--only', 'adam fused',"
        f" '--mxnet', '--json', {str(out)!r}, '--quiet', '--dtype', 'float32', '--no-extras']))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    rows = {r["name"]: r for r in json.loads(out.read_text())["workloads"][0]["results"]}
    mx = rows["mxnet 0.0-fake ftml_update"]
    assert mx["rounds"] == 3 and mx["error"] is None and mx["ratio_to_fused_adam"] > 0


def test_mxnet_missing_is_reported_not_fatal(tmp_path) -> None:
    out = tmp_path / "b.json"
    assert main(["--sizes", "1x10", "--rounds", "1", "--warmup", "0", "--only", "adam fused", "--dtype", "float32",
                 "--mxnet", sys.executable, "--json", str(out), "--quiet", "--no-extras"]) == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())["workloads"][0]["results"]}
    assert "MXNet is not importable" in rows["mxnet ftml_update"]["error"]


def test_python_dash_m_help() -> None:
    res = subprocess.run([sys.executable, "-m", "ftmlopt.bench", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--rounds" in res.stdout and "--mxnet" in res.stdout
