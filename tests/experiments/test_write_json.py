"""The experiments' JSON files are strict JSON: a diverged run's NaN or infinite loss is written as null."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ftmlopt.experiments.harness import write_json


def test_non_finite_floats_become_null(tmp_path: Path) -> None:
    obj = {"losses": [1.5, math.nan, math.inf], "score": -math.inf, "rows": ({"x": np.float64("nan"), "n": 3},)}
    path = write_json(obj, tmp_path / "sub" / "r.json")
    text = path.read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text

    def strict(token: str) -> float:
        raise ValueError(f"non-standard JSON token {token}")

    assert json.loads(text, parse_constant=strict) == {
        "losses": [1.5, None, None], "score": None, "rows": [{"x": None, "n": 3}],
    }
    assert obj["losses"][1] != obj["losses"][1]  # the caller's object is left as it was
