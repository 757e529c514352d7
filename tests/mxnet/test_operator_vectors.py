"""``ftml_update`` against every MXNet 1.9.1 vector of ``ftml_vectors.json``, bit for bit.

Each case is replayed through the raw operator with the ``t``, ``lr_used`` and ``wd_used`` the
MXNet optimizer passed to its kernel (recorded in the file), so this also pins the operator for
the optimizer-API cases. The test-side emulation (conftest) is checked against the same data,
which is what makes it a trustworthy oracle for the random tests elsewhere.
"""

from __future__ import annotations

import numpy as np
import pytest

from ftmlopt import ftml_update

CASES_191 = [
    "A_defaults_float32",
    "B_clip_wd_rescale_float32",
    "C_clip_wd_rescale_float64",
    "D_operator_explicit_t",
    "E_factor_scheduler_float32",
    "F_begin_num_update_float32",
    "G_float16_multi_precision",
    "H_weight_overwritten_between_steps",
]


def _kernel_hyper(case: dict) -> dict:
    """The operator's keyword arguments (besides lr, t, wd) as the MXNet optimizer passed them."""
    hp = case["hyperparameters"]
    # Optimizer cases: FTML passes clip_grad only when clip_gradient is truthy (spec §2.3).
    clip = hp.get("clip_grad", hp.get("clip_gradient"))
    return {
        "beta1": hp["beta1"],
        "beta2": hp["beta2"],
        "epsilon": hp["epsilon"],
        "rescale_grad": hp["rescale_grad"],
        "clip_grad": clip if clip else -1.0,
    }


def _compute_dtype(case: dict) -> type:
    # G: multi_precision keeps a float32 master and float32 states; the kernel runs on those.
    return {"float32": np.float32, "float64": np.float64, "float16": np.float32}[case["dtype"]]


def test_file_has_all_191_cases(vectors):
    assert [n for n in vectors if not n.startswith("V2")] == CASES_191
    assert all(vectors[n]["mxnet_version"] == "1.9.1" for n in CASES_191)


@pytest.mark.parametrize("name", CASES_191)
def test_operator_reproduces_mxnet_191_bit_exact(name, vectors, ref, kernel_path):
    case = vectors[name]
    dt = _compute_dtype(case)
    kw = _kernel_hyper(case)
    w = ref.arr(case["initial_weight"], dt)
    d, v, z = (np.zeros_like(w) for _ in range(3))
    for step in case["steps"]:
        if step.get("weight_before_step") is not None:  # case H: the user overwrites the weight
            w[...] = ref.arr(step["weight_before_step"], dt)
        g = ref.arr(step["grad"], dt)
        g_before = g.copy()
        res = ftml_update(w, g, d, v, z, lr=step["lr_used"], t=step["t"], wd=step["wd_used"], out=w, **kw)
        assert res is w
        exp = step["expected_mxnet"]
        exp_w = exp["master_weight_fp32"] if case["dtype"] == "float16" else exp["weight"]
        for got, key_exp in ((w, exp_w), (d, exp["d"]), (v, exp["v"]), (z, exp["z"])):
            assert ref.bits_equal(got, ref.arr(key_exp, dt)), (name, step["step"])
        if case["dtype"] == "float16":  # the fp16 weight MXNet stores is the master cast once
            assert ref.bits_equal(w.astype(np.float16), ref.arr(exp["weight"], np.float16))
        assert ref.bits_equal(g, g_before)  # the gradient is never modified


@pytest.mark.parametrize("name", CASES_191)
def test_reference_emulation_reproduces_mxnet_191(name, vectors, ref):
    """The conftest emulation (the oracle of the random tests) is itself bit-exact on MXNet's data."""
    case = vectors[name]
    dt = _compute_dtype(case)
    kw = _kernel_hyper(case)
    w = ref.arr(case["initial_weight"], dt)
    d, v, z = (np.zeros_like(w) for _ in range(3))
    for step in case["steps"]:
        if step.get("weight_before_step") is not None:
            w = ref.arr(step["weight_before_step"], dt)
        g = ref.arr(step["grad"], dt)
        w, d, v, z = ref.emulate(w, g, d, v, z, lr=step["lr_used"], t=step["t"], wd=step["wd_used"], **kw)
        exp = step["expected_mxnet"]
        exp_w = exp["master_weight_fp32"] if case["dtype"] == "float16" else exp["weight"]
        for got, e in ((w, exp_w), (d, exp["d"]), (v, exp["v"]), (z, exp["z"])):
            assert ref.bits_equal(got, ref.arr(e, dt))


@pytest.mark.parametrize("name", CASES_191)
def test_float64_reference_matches_vectors_reference(name, vectors, ref):
    """The readable float64 rule (exact decimal hyper-parameters) reproduces the file's float64 reference."""
    case = vectors[name]
    hp = case["hyperparameters"]
    clip = hp.get("clip_grad", hp.get("clip_gradient")) or None
    w = ref.arr(case["initial_weight"], np.float64)
    d = v = z = np.zeros_like(w)
    for step in case["steps"]:
        if step.get("weight_before_step") is not None:
            w = ref.arr(step["weight_before_step"], np.float64)
        g = ref.arr(step["grad"], np.float64)
        w, d, v, z = ref.step_f64(w, g, d, v, z, lr=step["lr_used"], t=step["t"], beta1=hp["beta1"],
                                  beta2=hp["beta2"], epsilon=hp["epsilon"], wd=step["wd_used"],
                                  rescale_grad=hp["rescale_grad"], clip=clip)
        exp = step["reference_float64"]
        for got, e in ((w, exp["weight"]), (d, exp["d"]), (v, exp["v"]), (z, exp["z"])):
            np.testing.assert_allclose(got, e, rtol=1e-12, atol=1e-15)


def test_operator_float64_differs_from_decimal_reference_only_by_float32_parsing(vectors, ref):
    """Case C: MXNet's float64 result is the float64 rule with float32-rounded hyper-parameters (§1.2)."""
    case = vectors["C_clip_wd_rescale_float64"]
    hp = case["hyperparameters"]
    w = ref.arr(case["initial_weight"], np.float64)
    d = v = z = np.zeros_like(w)
    for step in case["steps"]:
        g = ref.arr(step["grad"], np.float64)
        w, d, v, z = ref.step_f64(w, g, d, v, z, lr=ref.f32(step["lr_used"]), t=step["t"],
                                  beta1=ref.f32(hp["beta1"]), beta2=ref.f32(hp["beta2"]), epsilon=hp["epsilon"],
                                  wd=ref.f32(step["wd_used"]), rescale_grad=ref.f32(hp["rescale_grad"]),
                                  clip=ref.f32(hp["clip_gradient"]))
        exp = step["expected_mxnet"]
        for got, e in ((w, exp["weight"]), (d, exp["d"]), (v, exp["v"]), (z, exp["z"])):
            np.testing.assert_allclose(got, e, rtol=1e-13, atol=0)


def test_case_h_pull_back_formula(vectors, ref):
    """Case H: after the weight is overwritten, z pulls it back (spec §1.3), unlike the naive compact step."""
    case = vectors["H_weight_overwritten_between_steps"]
    hp = case["hyperparameters"]
    b1 = hp["beta1"]
    s1, s2 = case["steps"][0], case["steps"][1]
    w0 = ref.arr(case["initial_weight"], np.float64)
    zero = np.zeros_like(w0)
    _, d1, v1, z1 = ref.step_f64(w0, ref.arr(s1["grad"], np.float64), zero, zero, zero, lr=0.1, t=1,
                                 beta1=b1, beta2=hp["beta2"], epsilon=hp["epsilon"])
    w_over = ref.arr(s2["weight_before_step"], np.float64)
    g2 = ref.arr(s2["grad"], np.float64)
    w2, d2, _, _ = ref.step_f64(w_over, g2, d1, v1, z1, lr=0.1, t=2, beta1=b1, beta2=hp["beta2"],
                                epsilon=hp["epsilon"])
    pull_back = w_over - (1 - b1) * g2 / d2 - b1 * (z1 + d1 * w_over) / d2
    np.testing.assert_allclose(w2, pull_back, rtol=1e-12)
    np.testing.assert_allclose(w2, s2["reference_float64"]["weight"], rtol=1e-12)
    # MXNet's weight is far from the naive value that ignores z's memory of the old iterate.
    mx_w2 = ref.arr(s2["expected_mxnet"]["weight"], np.float64)
    naive = np.array(case["naive_step2_weight_if_state_ignored"])
    np.testing.assert_allclose(naive, w_over - (1 - b1) * g2 / d2, rtol=1e-6)
    assert np.max(np.abs(mx_w2 - naive)) > 0.5
    np.testing.assert_allclose(mx_w2, pull_back, rtol=1e-4)
