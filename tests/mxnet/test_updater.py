"""``Updater``/``get_updater`` (spec §3.8) and ftmlopt's pickle-free ``get_states``/``set_states``."""

from __future__ import annotations

import io
import json
import pickle
import zipfile

import numpy as np
import pytest

from ftmlopt import lr_scheduler
from ftmlopt.mxnet.optimizer import FTML, SGD, StateFormatError, Updater, create, get_updater


def _grads(seed: int, n: int, shape=(4, 3), dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape).astype(dtype) for _ in range(n)]


def test_get_updater_and_lazy_state():
    opt = FTML(learning_rate=0.1)
    up = get_updater(opt)
    assert isinstance(up, Updater) and up.optimizer is opt and up.states == {} and up.aggregate_updates is False
    w = np.ones(3, np.float32)
    up(0, np.full(3, 0.5, np.float32), w)
    assert set(up.states) == {0} and up.states_synced == {0: True}
    assert len(up.states[0]) == 3
    assert all(a.dtype == np.float32 and a.shape == (3,) for a in up.states[0])
    state_obj = up.states[0]
    up(0, np.full(3, 0.5, np.float32), w)
    assert up.states[0] is state_obj  # created once


def test_grad_comes_before_weight(ref):
    up = get_updater(FTML(learning_rate=0.1))
    w = np.array([1.0, 2.0], np.float32)
    g = np.array([0.5, -0.25], np.float32)
    g_before, zeros = g.copy(), np.zeros_like(w)
    exp = ref.emulate(w, g, zeros, zeros, zeros, lr=0.1, t=1)
    up(0, g, w)
    assert ref.bits_equal(w, exp[0]) and ref.bits_equal(g, g_before)


def test_list_of_indices_equals_separate_calls(ref):
    ga, gb = _grads(1, 2)
    wa, wb = np.ones((4, 3), np.float32), -np.ones((4, 3), np.float32)
    up = get_updater(FTML(learning_rate=0.05))
    up([0, "b"], [ga, gb], [wa, wb])
    sep = get_updater(FTML(learning_rate=0.05))
    wa2, wb2 = np.ones((4, 3), np.float32), -np.ones((4, 3), np.float32)
    sep(0, ga, wa2)
    sep("b", gb, wb2)
    assert ref.bits_equal(wa, wa2) and ref.bits_equal(wb, wb2)
    assert up.optimizer._index_update_count == {0: 1, "b": 1}
    up((0, "b"), (ga, gb), (wa, wb))  # tuples work too
    assert up.optimizer._index_update_count == {0: 2, "b": 2}


def test_bytes_keys_become_str():
    up = get_updater(FTML())
    w = np.ones(2, np.float32)
    up(b"fc_weight", np.ones(2, np.float32), w)
    up([b"fc_weight"], [np.ones(2, np.float32)], [w])
    assert list(up.states) == ["fc_weight"] and up.optimizer._index_update_count == {"fc_weight": 2}


def test_multi_precision_through_updater():
    up = get_updater(FTML(multi_precision=True))
    w = np.ones(3, np.float16)
    up(0, np.ones(3, np.float16), w)
    master, inner = up.states[0]
    assert master.dtype == np.float32 and all(a.dtype == np.float32 for a in inner)
    np.testing.assert_array_equal(w, master.astype(np.float16))


@pytest.mark.parametrize("bad", [
    lambda w, g: ([0, 1], [g], [w, w]),                        # lengths differ
    lambda w, g: ([0, 1], g, [w, w]),                          # grad not a list
    lambda w, g: ([0, 1], [g, g.astype(np.float64)], [w, w.copy()]),  # second element bad
    lambda w, g: ([0, 1], [g, np.ones(5, np.float32)], [w, w.copy()]),
    lambda w, g: (0, g.astype(np.int32), w),
])
def test_bad_calls_mutate_nothing(bad):
    up = get_updater(FTML(learning_rate=0.1))
    w, g = np.ones(3, np.float32), np.full(3, 0.5, np.float32)
    snap = w.copy()
    idx, grads, weights = bad(w, g)
    with pytest.raises((TypeError, ValueError)):
        up(idx, grads, weights)
    np.testing.assert_array_equal(w, snap)
    assert up.states == {} and up.optimizer._index_update_count == {} and up.optimizer.num_update == 0


def test_rejects_non_optimizer():
    with pytest.raises(TypeError, match="Optimizer"):
        Updater(object())


# --------------------------------------------------------------------------- get_states / set_states
def _run(up, grads, weights):
    for g in grads:
        up([0, "bias"], [g, g[0].copy()], weights)


def _fresh_weights():
    return [np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3), np.array([0.5, -0.5, 2.0], np.float32)]


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("dump", [False, True])
def test_resume_continues_bit_identically(k, dump, ref):
    """Stop after k steps, save, load into a fresh updater: the rest of the run is bit-identical (t continues)."""
    grads = _grads(7, 8)

    def make():
        return FTML(learning_rate=0.05, wd=0.01, clip_gradient=1.5,
                    lr_scheduler=lr_scheduler.FactorScheduler(step=2, factor=0.7, base_lr=0.05))

    straight = get_updater(make())
    w_straight = _fresh_weights()
    _run(straight, grads, w_straight)

    first = get_updater(make())
    w = _fresh_weights()
    _run(first, grads[:k], w)
    blob = first.get_states(dump_optimizer=dump)
    assert isinstance(blob, bytes)
    resumed = get_updater(make() if not dump else FTML())  # with dump, the stored optimizer replaces FTML()
    resumed.set_states(blob)
    assert resumed.optimizer._index_update_count == {0: k, "bias": k} and resumed.optimizer.num_update == k
    _run(resumed, grads[k:], w)
    for a, b in zip(w, w_straight):
        assert ref.bits_equal(a, b)
    for key in (0, "bias"):
        for a, b in zip(resumed.states[key], straight.states[key]):
            assert ref.bits_equal(a, b)


def test_set_states_marks_unsynced_and_keeps_key_types():
    up = get_updater(FTML())
    up([0, "w", 7], [np.ones(2, np.float32)] * 3, [np.ones(2, np.float32) for _ in range(3)])
    other = get_updater(FTML())
    other.set_states(up.get_states())
    assert list(other.states) == [0, "w", 7] and other.states_synced == {0: False, "w": False, 7: False}
    assert all(isinstance(s, tuple) and len(s) == 3 for s in other.states.values())
    other(0, np.ones(2, np.float32), np.ones(2, np.float32))
    assert other.states_synced[0] is True and other.optimizer._index_update_count[0] == 2


def test_states_of_other_shapes_round_trip():
    up = get_updater(FTML(multi_precision=True))
    up(0, np.ones(3, np.float16), np.ones(3, np.float16))
    up(1, np.ones((2, 2)), np.ones((2, 2)))  # float64
    other = get_updater(FTML(multi_precision=True))
    other.set_states(up.get_states())
    master, inner = other.states[0]
    assert master.dtype == np.float32 and isinstance(inner, tuple) and inner[0].dtype == np.float32
    assert other.states[1][0].dtype == np.float64
    for key in (0, 1):
        a_flat = [master, *inner] if key == 0 else list(other.states[1])
        b = up.states[key]
        b_flat = [b[0], *b[1]] if key == 0 else list(b)
        for x, y in zip(a_flat, b_flat):
            np.testing.assert_array_equal(x, y)
    sgd = get_updater(SGD())  # a stateless optimizer: the state is None
    sgd(0, np.ones(2), np.ones(2))
    again = get_updater(SGD())
    again.set_states(sgd.get_states())
    assert again.states == {0: None}


def test_blob_is_a_pickle_free_npz_with_json_header():
    up = get_updater(FTML())
    up(0, np.ones(2, np.float32), np.ones(2, np.float32))
    blob = up.get_states(dump_optimizer=True)
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        files = set(npz.files)
        header = json.loads(npz["header"].tobytes().decode())
    assert "header" in files and header["format"] == "ftmlopt.updater-states" and header["version"] == 1
    assert header["optimizer"]["name"] == "ftml"


def test_dump_optimizer_with_factor_scheduler_rebuilds_it():
    sched = lr_scheduler.FactorScheduler(step=1, factor=0.5, base_lr=0.1)
    opt = FTML(lr_scheduler=sched, beta1=0.5, beta2=0.9, epsilon=1e-6, wd=0.02, rescale_grad=0.5, clip_gradient=0.3,
               param_idx2name={0: "fc_weight"}, begin_num_update=2)
    opt.set_lr_mult({0: 0.5})
    up = get_updater(opt)
    for _ in range(3):
        up(0, np.ones(2, np.float32), np.ones(2, np.float32))
    other = get_updater(create("sgd"))
    other.set_states(up.get_states(dump_optimizer=True))
    new = other.optimizer
    assert type(new) is FTML and new is not opt
    for attr in ("beta1", "beta2", "epsilon", "wd", "rescale_grad", "clip_gradient", "idx2name", "lr_mult",
                 "wd_mult", "begin_num_update", "num_update", "_all_index_update_counts", "lr", "multi_precision"):
        assert getattr(new, attr) == getattr(opt, attr), attr
    assert new._index_update_count is new._all_index_update_counts[0]
    s = new.lr_scheduler
    assert type(s) is lr_scheduler.FactorScheduler and s is not sched
    assert vars(s) == vars(sched)
    assert new.learning_rate == opt.learning_rate == pytest.approx(0.1 * 0.5**4)


def test_dump_optimizer_refuses_code():
    up = get_updater(FTML(lr_scheduler=lambda n: 0.1))
    up(0, np.ones(2, np.float32), np.ones(2, np.float32))
    with pytest.raises(TypeError, match="cannot store"):
        up.get_states(dump_optimizer=True)
    up.get_states()  # without the optimizer it is fine

    class Custom(lr_scheduler.FactorScheduler):
        pass

    with pytest.raises(TypeError, match="built-in"):
        get_updater(FTML(lr_scheduler=Custom(step=1))).get_states(dump_optimizer=True)

    class Unregistered(FTML):
        pass

    with pytest.raises(TypeError, match="not registered"):
        get_updater(Unregistered()).get_states(dump_optimizer=True)


class _Tripwire:
    """Unpickling this would flip a flag: proves set_states never unpickles."""

    fired = False

    def __reduce__(self):
        return (_fire, ())


def _fire():
    _Tripwire.fired = True
    return {}


def _npz(**members) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **members)
    return buf.getvalue()


def _header(**over) -> np.ndarray:
    h = {"format": "ftmlopt.updater-states", "version": 1, "states": [], "counts": {"dict": []}, "optimizer": None}
    h.update(over)
    return np.frombuffer(json.dumps(h).encode(), dtype=np.uint8)


def _zip_with(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(name, data)
    return buf.getvalue()


BAD_BLOBS = {
    "empty": lambda good: b"",
    "garbage": lambda good: b"\x00\x01garbage" * 10,
    "truncated half": lambda good: good[: len(good) // 2],
    "truncated tail": lambda good: good[:-7],
    "mxnet-style pickle": lambda good: pickle.dumps({0: (np.zeros(2), np.zeros(2), np.zeros(2))}),
    "tripwire pickle": lambda good: pickle.dumps(_Tripwire()),
    "npz without header": lambda good: _npz(a0=np.zeros(2)),
    "foreign format": lambda good: _npz(header=_header(format="something-else")),
    "future version": lambda good: _npz(header=_header(version=99)),
    "header not json": lambda good: _npz(header=np.frombuffer(b"{not json", dtype=np.uint8)),
    "missing array": lambda good: _npz(header=_header(states=[[0, {"array": 3}]])),
    "bad counts": lambda good: _npz(header=_header(counts={"dict": [["devices", 5], ["num_update", 1]]})),
    "object array": lambda good: _zip_with("a0.npy", b"\x93NUMPY garbage"),
    "bad optimizer": lambda good: _npz(header=_header(
        counts={"dict": [["devices", {"dict": []}], ["num_update", 0]]}, optimizer={"name": "nope", "attrs": {}})),
}


@pytest.mark.parametrize("label", list(BAD_BLOBS))
def test_bad_blobs_raise_and_leave_updater_untouched(label):
    _Tripwire.fired = False
    opt = FTML(learning_rate=0.1)
    up = get_updater(opt)
    w = np.ones(3, np.float32)
    up(0, np.full(3, 0.5, np.float32), w)
    good = up.get_states()
    before_states = up.states
    snap = [a.copy() for a in up.states[0]]
    counts = {k: dict(v) for k, v in opt._all_index_update_counts.items()}
    blob = BAD_BLOBS[label](good)
    with pytest.raises(ValueError) as info:
        up.set_states(blob)
    assert isinstance(info.value, StateFormatError)
    assert not _Tripwire.fired
    assert up.optimizer is opt and up.states is before_states and up.states_synced == {0: True}
    for a, b in zip(up.states[0], snap):
        np.testing.assert_array_equal(a, b)
    assert opt._all_index_update_counts == counts and opt.num_update == 1


def test_non_bytes_blob_is_a_type_error():
    up = get_updater(FTML())
    with pytest.raises(TypeError, match="bytes"):
        up.set_states("not bytes")
    with pytest.raises(TypeError, match="bytes"):
        up.set_states({0: None})


def test_set_states_replaces_the_counts_of_keys_it_does_not_hold(ref):
    """Loading a blob replaces states wholesale, so counts of keys absent from it must not survive (t=1 again)."""
    used = get_updater(FTML(learning_rate=0.1))
    for _ in range(3):
        used([0, 1], [np.ones(2, np.float32)] * 2, [np.ones(2, np.float32), np.ones(2, np.float32)])
    saved = get_updater(FTML(learning_rate=0.1))
    saved(0, np.ones(2, np.float32), np.ones(2, np.float32))
    used.set_states(saved.get_states())
    assert used.optimizer._index_update_count == {0: 1} and used.optimizer.num_update == 1
    w, g = np.array([1.0, -2.0], np.float32), np.array([0.5, 0.25], np.float32)
    zeros = np.zeros(2, np.float32)
    exp = ref.emulate(w, g, zeros, zeros, zeros, lr=0.1, t=1)
    used(1, g, w)  # key 1 has a fresh state, so it must also restart at t = 1
    assert ref.bits_equal(w, exp[0])


def test_sync_state_context_keeps_structure():
    up = get_updater(FTML())
    a, b = np.ones(2), np.zeros(2)
    out = up.sync_state_context((a, [b, None]), None)
    assert isinstance(out, tuple) and isinstance(out[1], list) and out[0] is a and out[1][0] is b and out[1][1] is None
