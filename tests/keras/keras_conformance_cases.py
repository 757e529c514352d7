"""The conformance battery's Keras rows, on the backend named by KERAS_BACKEND.

Not collected directly: ``test_keras.py`` runs this file with ``keras_backend_cases.py`` in one child
process per backend (Keras picks its backend once, at import), so each backend starts once per run.
The cases, the problems and the step-by-step comparison with the rule are the battery's own
(``tests/conformance/test_conformance.py``, loaded from its path), so the rows are the same
whichever process runs them.
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

from ftmlopt.keras import FTML

BACKEND = keras.backend.backend()


def _battery() -> Any:
    path = Path(__file__).resolve().parents[1] / "conformance" / "test_conformance.py"
    spec = importlib.util.spec_from_file_location("_conformance_battery", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


B = _battery()


def run_keras(form: str, dtype: str, opts: dict[str, Any], w0: np.ndarray, grads: list[np.ndarray], lrs) -> list:
    """``ftmlopt.keras.FTML`` through ``apply``, with the learning rate changed between steps."""
    var = keras.Variable(w0, dtype=dtype, name="w")
    kwargs: dict[str, Any] = dict(
        learning_rate=lrs[0],
        beta_1=B.BETA1,
        beta_2=B.BETA2,
        epsilon=B.EPS,
        clip_gradient=opts.get("clip"),
        compact=form == "compact",
    )
    if opts.get("decoupled"):
        kwargs["weight_decay"] = opts["weight_decay"]  # Keras' own weight_decay is decoupled
    else:
        kwargs["coupled_weight_decay"] = opts.get("weight_decay", 0.0)
    opt = FTML(**kwargs)
    names = ("v",) if form == "compact" else ("d", "v", "z")
    out = []
    for g, lr in zip(grads, lrs):
        opt.learning_rate = lr
        opt.apply([keras.ops.convert_to_tensor(g, dtype=dtype)], [var])
        state = {n: np.asarray(keras.ops.convert_to_numpy(getattr(opt, f"_{n}")[0]), np.float64) for n in names}
        out.append((np.asarray(keras.ops.convert_to_numpy(var), np.float64), state))
    return out


@pytest.mark.parametrize(
    ("form", "dtype", "opt"), list(itertools.product(("compact", "mxnet"), B.KERAS_DTYPES, B.KERAS_OPTS))
)
def test_conformance_keras(form: str, dtype: str, opt: str) -> None:
    """One Keras row of the battery: every step against the rule, state included (lr in a float32 variable)."""
    name = f"keras[{BACKEND}]"
    opts = B.OPTIONS[opt]
    w0, grads = B.problem(B._seed(name, form, dtype, opt))
    results = run_keras(form, dtype, opts, w0, grads, B.LRS)
    B.check_run(name, results, form=form, dtype=dtype, opts=opts, w0=w0, grads=grads, lrs=B.LRS, f32_lr=True)
