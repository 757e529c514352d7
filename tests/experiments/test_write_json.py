"""Every report is strict JSON (one writer, :mod:`ftmlopt._json`): a diverged run's NaN or infinite loss is null."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ftmlopt import _json, bench
from ftmlopt._json import strict, write_json


def _refuse(token: str) -> float:
    raise ValueError(f"non-standard JSON token {token}")


def test_non_finite_floats_become_null(tmp_path: Path) -> None:
    obj = {"losses": [1.5, math.nan, math.inf], "score": -math.inf, "rows": ({"x": np.float64("nan"), "n": 3},)}
    path = write_json(obj, tmp_path / "sub" / "r.json")
    text = path.read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text and text.endswith("}\n")
    assert json.loads(text, parse_constant=_refuse) == {
        "losses": [1.5, None, None], "score": None, "rows": [{"x": None, "n": 3}],
    }
    assert obj["losses"][1] != obj["losses"][1]  # the caller's object is left as it was


def test_numpy_scalars_keys_and_other_objects() -> None:
    got = strict({1: np.float32(0.5), "i": np.int64(7), "b": np.bool_(True), (1, 2): Path("/x"),
                  "inf": np.float32("inf")})
    assert got == {1: 0.5, "i": 7, "b": True, "(1, 2)": "/x", "inf": None}
    assert type(got["i"]) is int and type(got["b"]) is bool


def test_indent_is_the_callers_choice(tmp_path: Path) -> None:
    two = write_json({"a": [1]}, str(tmp_path / "two.json"), indent=2).read_text()
    one = write_json({"a": [1]}, tmp_path / "one.json").read_text()
    assert two == '{\n  "a": [\n    1\n  ]\n}\n' and one == '{\n "a": [\n  1\n ]\n}\n'


def test_bench_and_experiments_share_the_writer() -> None:
    from ftmlopt.experiments import demo, reproduce

    assert bench.write_json is _json.write_json and bench.strict is _json.strict
    assert demo.write_json is _json.write_json and reproduce.write_json is _json.write_json
