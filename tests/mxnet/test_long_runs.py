"""Thousands of steps against MXNet 1.9.1 itself, bit for bit (``tests/data/mxnet_ftml_long_runs.json``).

The file holds what MXNet 1.9.1 produced (``scripts/compare_mxnet.py --long-runs``): initial
weights, the hyper-parameters and checkpoints of every weight and state array, as bit patterns.
The gradients are not stored: they are a pure function of (seed, step, key, element) that the
file describes and :func:`grad` below recomputes. Every checkpoint must match to the last bit,
on the NumPy kernel and on the default dispatch (``kernel_path``), through ``ftml_update``, through
``FTML.update`` and through ``create('ftml')`` + ``get_updater`` (update counts included).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ftmlopt import ftml_update
from ftmlopt import lr_scheduler as sched_mod
from ftmlopt.mxnet.optimizer import FTML, create, get_updater

PATH = Path(__file__).resolve().parents[1] / "data" / "mxnet_ftml_long_runs.json"
DOC: dict[str, Any] = json.loads(PATH.read_text())
CASES = {c["name"]: c for c in DOC["cases"]}
OPERATOR = [n for n, c in CASES.items() if c["kind"] == "operator"]
OPTIMIZER = [n for n, c in CASES.items() if c["kind"] == "optimizer"]
_M64 = (1 << 64) - 1
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def _splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def grad(seed: int, step: int, key: int, scales: list[float], dtype: type) -> np.ndarray:
    """The file's gradient rule (its ``gradient`` field), recomputed here."""
    values = []
    for i, scale in enumerate(scales):
        h = _splitmix64((seed << 32) + (step << 8) + (key << 4) + i)
        values.append(0.0 if h & 255 == 0 else scale * (2.0 * (h >> 40) / 2.0**24 - 1.0))
    return np.array(values, dtype=np.float64).astype(dtype)


def from_bits(hexes: list[str], dtype: Any) -> np.ndarray:
    return np.array([int(h, 16) for h in hexes], dtype=_UINT[np.dtype(dtype).itemsize]).view(dtype)


def assert_bits(got: np.ndarray, hexes: list[str], what: str) -> None:
    exp = from_bits(hexes, got.dtype)
    same = got.view(_UINT[got.dtype.itemsize]) == exp.view(_UINT[got.dtype.itemsize])
    assert same.all(), f"{what}: got {got.tolist()}, MXNet {exp.tolist()}"


def test_file_is_mxnet_191_and_long():
    assert DOC["generated_with"].startswith("MXNet 1.9.1")
    assert len(OPERATOR) >= 8 and len(OPTIMIZER) >= 6
    assert all(c["steps"] >= 2000 for c in CASES.values())
    assert max(c.get("t0", 1) + c["steps"] - 1 for c in CASES.values()) > 999_000  # t close to 10**6
    dtypes = {(c["kind"], c["dtype"]) for c in CASES.values()}
    assert {("operator", "float32"), ("operator", "float64"), ("optimizer", "float16")} <= dtypes
    assert PATH.stat().st_size < 100_000


def test_gradient_rule_is_not_degenerate():
    """The recomputed gradients vary, include exact zeros and reach each element's scale."""
    case = CASES[OPERATOR[0]]
    gs = np.stack([grad(case["seed"], k, 0, case["scales"], np.float64) for k in range(1, 2001)])
    assert (gs == 0).any() and len(np.unique(gs)) > 9000
    assert np.allclose(np.abs(gs).max(axis=0), case["scales"], rtol=0.01)


@pytest.mark.parametrize("name", OPERATOR)
def test_operator_long_run_bit_exact(name, kernel_path):
    case = CASES[name]
    dt = np.dtype(case["dtype"]).type
    w = from_bits(case["initial_weight"], dt)
    d, v, z = (np.zeros_like(w) for _ in range(3))
    for k in range(1, case["steps"] + 1):
        g = grad(case["seed"], k, 0, case["scales"], dt)
        ftml_update(w, g, d, v, z, t=case["t0"] + k - 1, out=w, **case["hyper"])
        point = case["checkpoints"].get(str(k))
        if point:
            for nm, a in zip("wdvz", (w, d, v, z)):
                assert_bits(a, point[nm], f"{name} step {k} {nm}")


@pytest.mark.parametrize("name", [n for n in OPERATOR if CASES[n]["hyper"]["clip_grad"] != 0])
def test_operator_long_run_through_ftml_optimizer(name, kernel_path):
    """The same run through ``FTML.update``: t = begin_num_update + count, clip_gradient off when < 0."""
    case = CASES[name]
    h = case["hyper"]
    dt = np.dtype(case["dtype"]).type
    clip = h["clip_grad"] if h["clip_grad"] > 0 else None
    opt = FTML(learning_rate=h["lr"], beta1=h["beta1"], beta2=h["beta2"], epsilon=h["epsilon"], wd=h["wd"],
               rescale_grad=h["rescale_grad"], clip_gradient=clip, begin_num_update=case["t0"] - 1)
    w = from_bits(case["initial_weight"], dt)
    state = opt.create_state(0, w)
    for k in range(1, case["steps"] + 1):
        opt.update(0, w, grad(case["seed"], k, 0, case["scales"], dt), state)
        point = case["checkpoints"].get(str(k))
        if point:
            assert opt._index_update_count[0] == case["t0"] + k - 1
            for nm, a in zip("wdvz", (w, *state)):
                assert_bits(a, point[nm], f"{name} step {k} {nm}")


def _scheduler(spec: dict | None) -> Any:
    return None if spec is None else getattr(sched_mod, spec["class"])(**spec["kwargs"])


@pytest.mark.parametrize("name", OPTIMIZER)
def test_optimizer_updater_long_run_bit_exact(name, kernel_path, capsys):
    case = CASES[name]
    dt = np.dtype(case["dtype"]).type
    kw = dict(case["optimizer"])
    kw["param_idx2name"] = {int(i): n for i, n in kw["param_idx2name"].items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = create("ftml", lr_scheduler=_scheduler(case["scheduler"]), **kw)
    opt.set_lr_mult({int(k): m for k, m in case["lr_mult"].items()})
    updater = get_updater(opt)
    ws = {int(k): from_bits(h, dt) for k, h in case["initial_weights"].items()}
    scales = {int(k): s for k, s in case["scales"].items()}
    for k in range(1, case["steps"] + 1):
        keys = [0, 1] if k % 2 == 1 else [0]
        grads = [grad(case["seed"], k, j, scales[j], dt) for j in keys]
        if len(keys) == 1:
            updater(0, grads[0], ws[0])
        else:
            updater(keys, grads, [ws[j] for j in keys])
        point = case["checkpoints"].get(str(k))
        if point:
            assert opt.num_update == point["num_update"]
            assert opt._index_update_count == {int(j): c for j, c in point["counts"].items()}
            for j, w in ws.items():
                state = updater.states[j]
                arrays = {"w": w}
                if case["dtype"] == "float16":
                    arrays["master"] = state[0]
                    state = state[1]
                arrays.update(zip("dvz", state))
                assert set(arrays) == set(point[str(j)])
                for nm, a in arrays.items():
                    assert_bits(a, point[str(j)][nm], f"{name} step {k} key {j} {nm}")
    capsys.readouterr()  # MXNet's printed "overwritten" message, when learning_rate overrides base_lr
