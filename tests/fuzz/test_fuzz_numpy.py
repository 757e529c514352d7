"""Property-based fuzzing of the NumPy entry points: ``ftmlopt.ftml_update``, ``ftmlopt.mxnet.optimizer.FTML``,
``Updater`` calls and ``Updater.set_states``.

The contract under test: bad input raises ``TypeError`` or ``ValueError`` whose message names the
offending argument, and nothing (weights, states, update counts) has changed when it does; or, for
non-finite gradients, the documented behaviour: they propagate element-wise (the element's weight
and state become non-finite, every other element steps exactly as if that one were not there).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
from _bad_values import NAN, bad_finite, bad_nonnegative, bad_positive, bad_step, bad_unit, not_real
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ftmlopt
from ftmlopt.mxnet.optimizer import FTML, SGD, StateFormatError, get_updater

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

DTYPES = [np.float16, np.float32, np.float64]


def _arrays(shape: tuple[int, ...], dtype: type, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=shape).astype(dtype)
    g = rng.normal(size=shape).astype(dtype)
    d = np.abs(rng.normal(size=shape)).astype(dtype)
    v = np.abs(rng.normal(size=shape)).astype(dtype)
    z = rng.normal(size=shape).astype(dtype)
    return {"weight": w, "grad": g, "d": d, "v": v, "z": z}


def _snapshot(arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
    return {k: a.tobytes() for k, a in arrays.items()}


# --------------------------------------------------------------------------- ftml_update
def _bad_array_cases(arrays: dict[str, np.ndarray]) -> st.SearchStrategy[tuple[str, object]]:
    w = arrays["weight"]
    other_float = np.float64 if w.dtype != np.float64 else np.float32
    choices = st.sampled_from(["weight", "grad", "d", "v", "z", "out"])

    def bad_for(name: str) -> st.SearchStrategy[tuple[str, object]]:
        variants = [
            w.tolist(),  # a list, not an array
            1.0,
            w.astype(np.int32),
            w.astype(np.complex64),
            w.astype(other_float),  # dtype mismatch
            np.zeros((*w.shape, 2), w.dtype),  # shape mismatch
            np.zeros((w.size + 1,), w.dtype),
        ]
        if name != "out":
            variants.append(None)  # (out=None is valid: a new array is returned)
        if name in ("d", "v", "z", "out"):
            ro = w.copy()
            ro.setflags(write=False)
            variants.append(ro)  # updated in place, so it must be writable
        if name in ("v", "z"):
            variants.append(arrays["d"])  # aliasing another state
        return st.sampled_from(variants).map(lambda bad: (name, bad))

    return choices.flatmap(bad_for)


@FUZZ
@given(data=st.data(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_ftml_update_rejects_bad_arrays_before_mutating(data: st.DataObject, dtype: type, seed: int) -> None:
    arrays = _arrays((3, 2), dtype, seed)
    name, bad = data.draw(_bad_array_cases(arrays))
    before = _snapshot(arrays)
    kwargs = dict(arrays)
    kwargs["out"] = None
    kwargs[name] = bad
    with pytest.raises((TypeError, ValueError)) as info:
        ftmlopt.ftml_update(
            kwargs["weight"], kwargs["grad"], kwargs["d"], kwargs["v"], kwargs["z"], lr=0.1, t=1, out=kwargs["out"]
        )
    assert name in str(info.value) or (name in ("v", "z") and "share" in str(info.value)), str(info.value)
    assert _snapshot(arrays) == before


HYPER = {
    "lr": bad_positive,
    "t": bad_step,
    "beta1": bad_unit,
    "beta2": bad_unit,
    "epsilon": bad_nonnegative,
    "wd": bad_finite,
    "rescale_grad": bad_nonnegative,
    "clip_grad": not_real | st.just(NAN),
}


@FUZZ
@given(data=st.data(), name=st.sampled_from(list(HYPER)), dtype=st.sampled_from(DTYPES))
def test_ftml_update_rejects_bad_hyperparameters_before_mutating(data: st.DataObject, name: str, dtype: type) -> None:
    arrays = _arrays((4,), dtype, 0)
    bad = data.draw(HYPER[name])
    before = _snapshot(arrays)
    kwargs = {"lr": 0.1, "t": 2, name: bad}
    with pytest.raises((TypeError, ValueError)) as info:
        ftmlopt.ftml_update(
            arrays["weight"], arrays["grad"], arrays["d"], arrays["v"], arrays["z"], out=arrays["weight"], **kwargs
        )
    assert name in str(info.value), str(info.value)
    assert _snapshot(arrays) == before


nonfinite_values = st.sampled_from([np.nan, np.inf, -np.inf])


@FUZZ
@given(
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([np.float32, np.float64]),
    mask_bits=st.lists(st.booleans(), min_size=8, max_size=8).filter(any),
    bad=nonfinite_values,
    clip=st.sampled_from([-1.0, 0.5]),
    t=st.integers(1, 5),
)
def test_nonfinite_gradients_propagate_elementwise(kernel_path, seed, dtype, mask_bits, bad, clip, t) -> None:
    """NaN/Inf in the gradient reach only their own element (no hiding, no spreading).

    Without clipping the element's new weight is non-finite; with clipping an infinity is clipped
    to +-c like any large value (MXNet's clip), while NaN still propagates.
    """
    arrays = _arrays((8,), dtype, seed)
    mask = np.array(mask_bits)
    g_bad = arrays["grad"].copy()
    g_bad[mask] = bad
    hyper = dict(lr=0.05, t=t, wd=1e-3, clip_grad=clip)

    bad_run = {k: a.copy() for k, a in arrays.items()}
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf and inf / inf are the point here
        new_bad = ftmlopt.ftml_update(bad_run["weight"], g_bad, bad_run["d"], bad_run["v"], bad_run["z"], **hyper)

    # Same step with the bad entries replaced by what they stand for (a clipped infinity is +-c).
    g_ok = arrays["grad"].copy()
    clipped_inf = clip >= 0 and not np.isnan(bad)
    g_ok[mask] = np.sign(bad) * 10.0 if clipped_inf else 0.0
    ok_run = {k: a.copy() for k, a in arrays.items()}
    new_ok = ftmlopt.ftml_update(ok_run["weight"], g_ok, ok_run["d"], ok_run["v"], ok_run["z"], **hyper)

    keep = ~mask if not clipped_inf else np.ones_like(mask)
    assert new_bad[keep].tobytes() == new_ok[keep].tobytes()
    for s in ("d", "v", "z"):
        assert bad_run[s][keep].tobytes() == ok_run[s][keep].tobytes()
    if not clipped_inf:
        assert not np.isfinite(new_bad[mask]).any(), "a non-finite gradient was silently hidden"
        assert not np.isfinite(bad_run["v"][mask]).any() and not np.isfinite(bad_run["d"][mask]).any()


# --------------------------------------------------------------------------- optimizer.FTML
def _not_none(v: object) -> bool:
    return v is not None  # None is valid: the default rate (learning_rate), "off" (clip_gradient)


OPT_HYPER = {
    "learning_rate": bad_positive.filter(_not_none),
    "beta1": bad_unit,
    "beta2": bad_unit,
    "epsilon": bad_nonnegative,
    "wd": bad_finite,
    "rescale_grad": bad_nonnegative,
    "clip_gradient": (not_real | st.just(NAN)).filter(_not_none),
    "begin_num_update": st.sampled_from([-1, 1.5, "3", True]),
}


@FUZZ
@given(data=st.data(), name=st.sampled_from(list(OPT_HYPER)))
def test_optimizer_ftml_rejects_bad_hyperparameters(data: st.DataObject, name: str) -> None:
    bad = data.draw(OPT_HYPER[name])
    with pytest.raises((TypeError, ValueError)) as info:
        FTML(**{name: bad})
    assert name in str(info.value), str(info.value)


# --------------------------------------------------------------------------- Updater
def _updater_with_history(seed: int) -> tuple[object, dict[object, np.ndarray]]:
    rng = np.random.default_rng(seed)
    updater = get_updater(FTML(learning_rate=0.05, wd=1e-4))
    weights = {0: rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=4).astype(np.float64)}
    for _ in range(2):
        for key, w in weights.items():
            updater(key, rng.normal(size=w.shape).astype(w.dtype), w)
    return updater, weights


def _updater_fingerprint(updater, weights) -> tuple:
    states = {k: tuple(a.tobytes() for a in s) for k, s in updater.states.items()}
    counts = copy.deepcopy(updater.optimizer._all_index_update_counts)
    return states, counts, updater.optimizer.num_update, {k: w.tobytes() for k, w in weights.items()}


BAD_CALLS = st.sampled_from(
    [
        "grad_shape",
        "grad_dtype",
        "grad_list",
        "weight_int",
        "lengths",
        "batch_last_bad",
        "grad_none",
        "new_key_bad_grad",
    ]
)


@FUZZ
@given(seed=st.integers(0, 2**16), case=BAD_CALLS)
def test_updater_rejects_bad_calls_before_mutating(seed: int, case: str) -> None:
    updater, weights = _updater_with_history(seed)
    w0, wb = weights[0], weights["b"]
    before = _updater_fingerprint(updater, weights)
    calls = {
        "grad_shape": lambda: updater(0, np.ones((2, 3), np.float32), w0),
        "grad_dtype": lambda: updater(0, np.ones((3, 2), np.float64), w0),
        "grad_list": lambda: updater(0, [[1.0, 2.0]] * 3, w0),
        "weight_int": lambda: updater(0, np.ones((3, 2), np.float32), np.ones((3, 2), np.int64)),
        "lengths": lambda: updater([0, "b"], [np.ones((3, 2), np.float32)], [w0, wb]),
        # Everything in a batch is validated before the first key is stepped.
        "batch_last_bad": lambda: updater([0, "b"], [np.ones((3, 2), np.float32), np.ones(5)], [w0, wb]),
        "grad_none": lambda: updater("b", None, wb),
        # A new key is not created when its first call is rejected.
        "new_key_bad_grad": lambda: updater(7, np.ones(3, np.float32), np.ones(2, np.float32)),
    }
    with pytest.raises((TypeError, ValueError)):
        calls[case]()
    assert _updater_fingerprint(updater, weights) == before
    assert 7 not in updater.states


def _truncations(blob: bytes) -> st.SearchStrategy[bytes]:
    return st.integers(0, len(blob) - 1).map(lambda n: blob[:n])


@FUZZ
@given(seed=st.integers(0, 2**16), data=st.data())
def test_set_states_rejects_truncated_or_foreign_blobs_without_change(seed: int, data: st.DataObject) -> None:
    import pickle

    updater, weights = _updater_with_history(seed)
    blob = updater.get_states()
    bad = data.draw(
        _truncations(blob)
        | st.sampled_from(
            [
                b"",
                b"PK\x03\x04garbage",
                pickle.dumps({0: (np.zeros(3),) * 3}),  # an MXNet-style pickle
                blob.replace(b"ftmlopt.updater-states", b"ftmlopt.updater-stateX"),
            ]
        )
    )
    before = _updater_fingerprint(updater, weights)
    with pytest.raises(StateFormatError):
        updater.set_states(bad)
    assert _updater_fingerprint(updater, weights) == before
    for wrong in ("not bytes", None, 3, [blob]):
        with pytest.raises(TypeError):
            updater.set_states(wrong)
    assert _updater_fingerprint(updater, weights) == before


@FUZZ
@given(seed=st.integers(0, 2**16), source=st.sampled_from(["sgd_momentum", "misshaped", "wrong_dtype"]))
def test_foreign_states_are_refused_at_the_next_update(seed: int, source: str) -> None:
    """A well-formed archive of another optimizer's (or other weights') states loads, but the next
    update raises before touching the weight, and a single ``set_states`` of the right blob recovers."""
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if source == "sgd_momentum":
            other = get_updater(SGD(learning_rate=0.1, momentum=0.9))
            w = rng.normal(size=(3, 2)).astype(np.float32)
        else:
            other = get_updater(FTML(learning_rate=0.1))
            w = rng.normal(size=(2, 3) if source == "misshaped" else (3, 2)).astype(
                np.float64 if source == "wrong_dtype" else np.float32
            )
        other(0, np.ones_like(w), w)
    updater, weights = _updater_with_history(seed)
    good = updater.get_states()
    updater.set_states(other.get_states())
    w0 = weights[0].copy()
    with pytest.raises(ValueError) as info:
        updater(0, np.ones((3, 2), np.float32), weights[0])
    assert "state" in str(info.value)
    assert weights[0].tobytes() == w0.tobytes()
    updater.set_states(good)
    updater(0, np.ones((3, 2), np.float32), weights[0])
    assert weights[0].tobytes() != w0.tobytes()
