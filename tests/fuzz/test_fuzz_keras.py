"""Property-based fuzzing of ``ftmlopt.keras.FTML``: constructor arguments and non-finite gradients.

Keras fixes its backend at first import; this module uses whatever ``KERAS_BACKEND`` says, JAX by
default (the checks here do not depend on the backend; tests/keras runs both backends).
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import keras
import numpy as np
import pytest
from _bad_values import bad_nonnegative, bad_unit, non_finite, not_real
from hypothesis import given, settings
from hypothesis import strategies as st

from ftmlopt.keras import FTML

FUZZ = settings(max_examples=25, deadline=None)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # keras.Variable.numpy() on NumPy 2

HYPER = {
    # 0 is legal ("no step")
    "learning_rate": non_finite | st.floats(max_value=-1e-12, allow_nan=False, allow_infinity=False) | st.just(True),
    "beta_1": bad_unit,
    "beta_2": bad_unit,
    "epsilon": bad_nonnegative,
    "coupled_weight_decay": bad_nonnegative,
    "clip_gradient": (not_real | non_finite | st.floats(max_value=0.0, allow_nan=False)).filter(
        lambda v: v is not None  # None means "off"
    ),
    "compact": st.sampled_from([0, 1, "True", 1.0]),
    "state_dtype": st.sampled_from(["int32", "bool", "float8"]),
}



@FUZZ
@given(data=st.data(), name=st.sampled_from(list(HYPER)))
def test_bad_hyperparameters_are_refused_by_name(data: st.DataObject, name: str) -> None:
    bad = data.draw(HYPER[name])
    with pytest.raises((TypeError, ValueError)) as info:
        FTML(**{name: bad})
    assert name in str(info.value), str(info.value)


@FUZZ
@given(
    seed=st.integers(0, 2**16),
    mask_bits=st.lists(st.booleans(), min_size=6, max_size=6).filter(any),
    bad=st.sampled_from([np.nan, np.inf, -np.inf]),
    compact=st.booleans(),
)
def test_nonfinite_gradients_propagate_elementwise(seed: int, mask_bits: list[bool], bad: float, compact: bool) -> None:
    rng = np.random.default_rng(seed)
    w0 = rng.normal(size=6).astype(np.float32)
    g = rng.normal(size=6).astype(np.float32)
    mask = np.array(mask_bits)
    results = []
    for value in (bad, 0.0):
        var = keras.Variable(w0.copy())
        opt = FTML(learning_rate=0.05, compact=compact)
        gg = g.copy()
        gg[mask] = value
        opt.apply_gradients([(keras.ops.convert_to_tensor(gg), var)])
        results.append(np.asarray(var.numpy()))
    bad_w, ok_w = results
    assert bad_w[~mask].tobytes() == ok_w[~mask].tobytes()
    assert not np.isfinite(bad_w[mask]).any(), "a non-finite gradient was hidden"
