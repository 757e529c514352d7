"""Drive ``ftmlopt.keras.FTML`` for the conformance battery, in a process of its own (one per backend).

Keras picks its backend once, at import, so ``test_conformance.py`` runs this file with
``KERAS_BACKEND`` set. It reads a JSON list of cases on stdin (form, dtype, options, initial weight,
gradients, learning rates) and writes, for each case, the weight and state after every step as
float64 lists. The comparison with the rule happens in the parent test, not here.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import keras
import numpy as np

from ftmlopt.keras import FTML


def run(case: dict[str, Any]) -> list[dict[str, Any]]:
    opts = case["opts"]
    dtype = case["dtype"]
    var = keras.Variable(np.asarray(case["w0"]), dtype=dtype, name="w")
    lr = keras.Variable(case["lrs"][0], dtype="float32" if dtype != "float64" else "float64", trainable=False)
    kwargs: dict[str, Any] = dict(
        learning_rate=case["lrs"][0],
        beta_1=case["beta1"],
        beta_2=case["beta2"],
        epsilon=case["eps"],
        clip_gradient=opts.get("clip"),
        compact=case["form"] == "compact",
    )
    if opts.get("decoupled"):
        kwargs["weight_decay"] = opts["weight_decay"]  # Keras' own weight_decay is decoupled
    else:
        kwargs["coupled_weight_decay"] = opts.get("weight_decay", 0.0)
    opt = FTML(**kwargs)
    del lr
    out = []
    for g, step_lr in zip(case["grads"], case["lrs"]):
        opt.learning_rate = step_lr
        opt.apply([keras.ops.convert_to_tensor(np.asarray(g), dtype=dtype)], [var])
        names = ("v",) if case["form"] == "compact" else ("d", "v", "z")
        state = {
            n: np.asarray(keras.ops.convert_to_numpy(getattr(opt, f"_{n}")[0]), np.float64).tolist() for n in names
        }
        out.append({"w": np.asarray(keras.ops.convert_to_numpy(var), np.float64).tolist(), "state": state})
    return out


def main() -> None:
    cases = json.load(sys.stdin)
    json.dump([run(c) for c in cases], sys.stdout)


if __name__ == "__main__":
    main()
