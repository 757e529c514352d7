"""The bench's modules one by one: docstring examples, the MXNet server's JSON-lines protocol, the probes' CLI."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from ftmlopt import ftml_update
from ftmlopt.bench import mxnet_server, probes

SETUP = {"op": "setup", "shapes": [[3], [2, 2]], "dtype": "float32", "lr": 0.01, "beta1": 0.6, "beta2": 0.999,
         "eps": 1e-8}


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("__import__('os').system('true')", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"op": "exec"}', "unknown op 'exec'"),
        (json.dumps({**SETUP, "shapes": [[3, 0]]}), "positive integers"),
        (json.dumps({**SETUP, "shapes": [["3"]]}), "positive integers"),
        (json.dumps({**SETUP, "shapes": [[True]]}), "positive integers"),
        (json.dumps({**SETUP, "dtype": "int8"}), "dtype must be one of"),
        (json.dumps({**SETUP, "lr": "0.1"}), "lr must be a finite number"),
        (json.dumps({**SETUP, "eps": None}), "eps must be a finite number"),
        ('{"op": "setup", "shapes": [[1]], "dtype": "float32", "lr": NaN, "beta1": 0.6, "beta2": 0.9, "eps": 1}',
         "lr must be a finite number"),
    ],
)
def test_bad_requests_are_refused(line: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mxnet_server.parse_request(line)


class FakeND:
    """``mx.nd`` over NumPy arrays, with ftmlopt's MXNet-exact operator in place of MXNet's."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def array(self, a: Any, dtype: str) -> np.ndarray:
        return np.array(a, dtype=dtype)

    def zeros(self, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        return np.zeros(shape, dtype=dtype)

    def ftml_update(self, w: Any, g: Any, d: Any, v: Any, z: Any, *, lr: float, beta1: float, beta2: float,
                    epsilon: float, t: int, out: Any) -> None:
        self.steps.append(t)
        ftml_update(w, g, d, v, z, lr, t, beta1, beta2, epsilon, out=out)

    def waitall(self) -> None:
        pass


class FakeMX:
    __version__ = "0.0-test"

    def __init__(self) -> None:
        self.nd = FakeND()


def test_serve_answers_each_request_in_json_lines() -> None:
    mx, out = FakeMX(), io.StringIO()
    lines = [json.dumps(SETUP) + "\n", '{"op": "step"}\n', '{"op": "step"}\n', '{"op": "close"}\n', '{"op": "step"}\n']
    assert mxnet_server.serve(mx, lines, out) == 0
    replies = [json.loads(line) for line in out.getvalue().splitlines()]
    assert replies[0] == {"ready": True, "mxnet": "0.0-test"} and replies[1] == {"ok": True}
    assert [set(r) for r in replies[2:]] == [{"seconds"}, {"seconds"}] and all(r["seconds"] >= 0 for r in replies[2:])
    assert mx.nd.steps == [1, 1, 2, 2]  # two tensors per step, t counted from 1; nothing after close


def test_serve_stops_at_a_bad_request_and_says_why() -> None:
    mx, out = FakeMX(), io.StringIO()
    assert mxnet_server.serve(mx, ['{"op": "step"}\n'], out) == 1
    assert json.loads(out.getvalue().splitlines()[-1]) == {"error": "step before setup"}
    out = io.StringIO()
    assert mxnet_server.serve(mx, ["print(1)\n", '{"op": "step"}\n'], out) == 1
    assert "not JSON" in json.loads(out.getvalue().splitlines()[-1])["error"] and mx.nd.steps == []


def test_the_server_module_runs_with_dash_m_and_reports_a_broken_mxnet(tmp_path, monkeypatch) -> None:
    (tmp_path / "mxnet.py").write_text("raise ImportError('this mxnet is broken on purpose')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "ftmlopt.bench.mxnet_server"], input="", capture_output=True,
                         text=True, timeout=120, env=env)
    assert res.returncode == 1
    assert json.loads(res.stdout) == {"error": "ImportError: this mxnet is broken on purpose"}
    monkeypatch.setenv("PYTHONPATH", env["PYTHONPATH"])  # the client passes its environment on
    with pytest.raises(RuntimeError, match=r"MXNet is not importable in .*: ImportError: this mxnet is broken"):
        mxnet_server.MXNetProcess(sys.executable, [(2,)], "float32", 1)


def test_probe_script_refuses_an_unknown_probe() -> None:
    res = subprocess.run([sys.executable, probes.__file__, "nope"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "first-step" in res.stderr
    assert probes.fresh("nope") == {"error": res.stderr.strip()}
