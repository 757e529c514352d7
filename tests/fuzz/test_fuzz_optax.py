"""Property-based fuzzing of ``ftmlopt.optax.ftml`` / ``ftml_direct``.

JAX arrays are immutable, so "nothing mutated" holds by construction; what is checked is that bad
hyper-parameters, leaves, missing params and foreign states raise ``TypeError``/``ValueError`` with a
message naming the problem, and that non-finite gradients propagate element-wise (documented).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _bad_values import bad_flag, bad_nonnegative, bad_unit, non_finite, not_real
from hypothesis import given, settings
from hypothesis import strategies as st

from ftmlopt.optax import FTMLChainState, ftml, ftml_direct

FUZZ = settings(max_examples=30, deadline=None)

HYPER = {
    "learning_rate": bad_nonnegative.filter(lambda v: not callable(v)),  # 0 is legal: "no step"
    "b1": bad_unit,
    "b2": bad_unit,
    "eps": bad_nonnegative,
    "weight_decay": bad_nonnegative.filter(lambda v: v is not None),  # None means "no decay" (ftml's default)
    "clip_gradient": (not_real | non_finite | st.floats(max_value=0.0, allow_nan=False)).filter(
        lambda v: v is not None  # None means "off"
    ),
    "compact": bad_flag,
    "decoupled_weight_decay": bad_flag,
    "state_dtype": st.sampled_from(["int32", "bool", "not-a-dtype", 3]),
}


@FUZZ
@given(data=st.data(), name=st.sampled_from(list(HYPER)), factory=st.sampled_from([ftml, ftml_direct]))
def test_bad_hyperparameters_are_refused_by_name(data: st.DataObject, name: str, factory) -> None:
    bad = data.draw(HYPER[name])
    with pytest.raises((TypeError, ValueError)) as info:
        factory(**{name: bad})
    assert name in str(info.value), str(info.value)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.uint8])
def test_non_float_leaves_are_refused_at_init(dtype) -> None:
    with pytest.raises(TypeError, match="floating-point"):
        ftml(0.1).init({"w": jnp.ones(3, jnp.float32), "i": jnp.ones(2, dtype)})


@pytest.mark.parametrize(
    "kwargs", [{"compact": False}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "decoupled_weight_decay": True}]
)
def test_update_without_params_is_refused_where_the_weights_are_needed(kwargs) -> None:
    params = {"w": jnp.ones(3)}
    tx = ftml(0.1, **kwargs)
    with pytest.raises(ValueError, match="params"):
        tx.update(params, tx.init(params))


@pytest.mark.parametrize("case", ["grad_shape", "grad_tree", "state_shape"])
def test_mismatched_trees_and_shapes_raise(case: str) -> None:
    params = {"w": jnp.ones(3), "b": jnp.zeros(2)}
    tx = ftml(0.1)
    state = tx.init(params)
    grads = {"w": jnp.ones(3), "b": jnp.zeros(2)}
    if case == "grad_shape":
        grads = {"w": jnp.ones(4), "b": jnp.zeros(2)}
    elif case == "grad_tree":
        grads = {"w": jnp.ones(3)}
    else:  # v of the wrong shape inside the chain's scale_by_ftml state
        bad = state.ftml._replace(v={"w": jnp.ones(5), "b": jnp.zeros(2)})
        state = FTMLChainState(inner=tuple(bad if s is state.ftml else s for s in state.inner))
        assert state.v["w"].shape == (5,)
    with pytest.raises((TypeError, ValueError)):
        tx.update(grads, state, params)


@pytest.mark.parametrize("source", ["adam", "compact_into_full", "full_into_compact"])
def test_foreign_state_is_refused_with_a_clear_error(source: str) -> None:
    params = {"w": jnp.ones(3)}
    tx = ftml(0.1, compact=source == "full_into_compact")
    other = {
        "adam": optax.adam(0.1),
        "compact_into_full": ftml(0.1, compact=True),
        "full_into_compact": ftml(0.1, compact=False),
    }
    with pytest.raises((TypeError, ValueError), match="state"):
        tx.update(params, other[source].init(params), params)


@FUZZ
@given(
    seed=st.integers(0, 2**16),
    mask_bits=st.lists(st.booleans(), min_size=6, max_size=6).filter(any),
    bad=st.sampled_from([np.nan, np.inf, -np.inf]),
    compact=st.booleans(),
)
def test_nonfinite_gradients_propagate_elementwise(seed: int, mask_bits: list[bool], bad: float, compact: bool) -> None:
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.normal(size=6), jnp.float32)}
    g = rng.normal(size=6).astype(np.float32)
    mask = np.array(mask_bits)
    tx = ftml(0.05, compact=compact)
    state = tx.init(params)
    g_bad, g_ok = g.copy(), g.copy()
    g_bad[mask], g_ok[mask] = bad, 0.0
    up_bad, st_bad = tx.update({"w": jnp.asarray(g_bad)}, state, params)
    up_ok, st_ok = tx.update({"w": jnp.asarray(g_ok)}, state, params)
    bad_w, ok_w = np.asarray(up_bad["w"]), np.asarray(up_ok["w"])
    assert bad_w[~mask].tobytes() == ok_w[~mask].tobytes()
    assert not np.isfinite(bad_w[mask]).any(), "a non-finite gradient was hidden"
    assert np.asarray(st_bad.v["w"])[~mask].tobytes() == np.asarray(st_ok.v["w"])[~mask].tobytes()
