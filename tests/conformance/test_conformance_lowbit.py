"""The conformance battery's low-bit rows: every path with ``state_bits`` 8/4 against :mod:`ftmlopt.lowbit`.

The reference is :func:`ftmlopt.lowbit.compact_step` on NumPy float32 (the reference is itself
checked against the rule in ``tests/lowbit``: the weight update is :func:`ftmlopt.rule.compact_step`
from the decoded state). Each implementation is driven through its public API for a few steps with
a changing learning rate (lr 0 included); at every step the implementation's own previous weights,
codes and scales are fed into one step of the reference, and its new codes and scales must be
bit-identical, its weights equal within the dtype's tolerance (torch's CPU ``sqrt`` and XLA's
division by a scalar are not correctly rounded; the rule's weight update uses them; optax's chain
multiplies by the learning rate last). optax runs eagerly here (op by op); under ``jax.jit`` XLA
fuses the second-moment update into a multiply-add, which ``tests/jax/test_optax_lowbit.py`` covers
with its own tolerance (a code moves by at most one). optax takes the betas in float32.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from ftmlopt import lowbit, rule

pytestmark = pytest.mark.frameworks

BETA1, BETA2, EPS = 0.6, 0.999, 1e-8
LRS = (0.1, 0.03, 0.0, 0.05)
SHAPE = (37, 131)  # 4847 elements: quantized, 38 blocks (the last partial), an odd count for 4-bit packing
OPTIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "coupled_wd_clip": {"weight_decay": 0.1, "clip": 2.0},
    "decoupled_wd_maximize": {"weight_decay": 0.1, "decoupled": True, "maximize": True},
    "decoupled_wd": {"weight_decay": 0.1, "decoupled": True},
}
#: (rtol, atol) of the weights per param dtype
TOL = {"float32": (2e-6, 1e-7), "bfloat16": (1.6e-2, 1e-3)}

Result = list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # (w as float32, codes, scales) after each step


def _torch_path(path: str) -> Callable[..., Result]:
    def run(bits: int, dtype: str, opts: dict[str, Any], w0: np.ndarray, grads: list[np.ndarray]) -> Result:
        import torch

        from ftmlopt.torch import FTML

        tdt = getattr(torch, dtype)
        p = torch.nn.Parameter(torch.tensor(w0, dtype=tdt))
        flags = {"forloop": dict(foreach=False, fused=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
        opt = FTML([p], lr=LRS[0], betas=(BETA1, BETA2), eps=EPS, weight_decay=opts.get("weight_decay", 0.0),
                   decoupled_weight_decay=opts.get("decoupled", False), clip_gradient=opts.get("clip"),
                   maximize=opts.get("maximize", False), state_bits=bits, **flags[path])
        out = []
        for g, lr in zip(grads, LRS):
            opt.param_groups[0]["lr"] = lr
            p.grad = torch.tensor(g, dtype=tdt)
            opt.step()
            st = opt.state[p]
            out.append((p.detach().float().numpy().copy(), st["codes"].numpy().copy(), st["scales"].numpy().copy()))
        return out

    return run


def _optax(bits: int, dtype: str, opts: dict[str, Any], w0: np.ndarray, grads: list[np.ndarray]) -> Result:
    """``ftmlopt.optax.ftml(state_bits=...)`` stepped eagerly (op by op: no fused multiply-add, so bit for bit)."""
    import jax.numpy as jnp
    import optax

    from ftmlopt import optax as fo

    jdt = getattr(jnp, dtype)
    table = jnp.asarray(LRS, jnp.float32)
    tx = fo.ftml(lambda count: table[count], BETA1, BETA2, EPS, weight_decay=opts.get("weight_decay", 0.0),
                 clip_gradient=opts.get("clip"), decoupled_weight_decay=opts.get("decoupled", False), state_bits=bits)
    params = {"w": jnp.asarray(w0, jdt)}
    state = tx.init(params)
    out = []
    for g in grads:
        updates, state = tx.update({"w": jnp.asarray(g, jdt)}, state, params)
        params = optax.apply_updates(params, updates)
        q = state.v["w"]
        out.append((np.asarray(params["w"], np.float32), np.asarray(q.codes), np.asarray(q.scales)))
    return out


#: name -> (driver, param dtypes, options it can express, whether its betas are float32 (optax's convention))
IMPLS: dict[str, tuple[Callable[..., Result], tuple[str, ...], tuple[str, ...], bool]] = {
    **{
        f"torch[{path}]": (_torch_path(path), ("float32", "bfloat16"), tuple(k for k in OPTIONS if k != "decoupled_wd"),
                           False)
        for path in ("forloop", "foreach", "fused")
    },
    "optax.ftml": (_optax, ("float32", "bfloat16"), ("plain", "coupled_wd_clip", "decoupled_wd"), True),
}

CASES = [
    pytest.param(name, bits, dtype, opt, id=f"{name}-{bits}bit-{dtype}-{opt}")
    for name, (_, dtypes, opts, _) in IMPLS.items()
    for bits, dtype, opt in itertools.product((8, 4), dtypes, opts)
]


def _round(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values as the param dtype stores them (bfloat16: round to nearest even), back in float32."""
    if dtype == "bfloat16":
        import ml_dtypes

        return x.astype(ml_dtypes.bfloat16).astype(np.float32)
    return x.astype(np.float32)


@pytest.mark.parametrize(("name", "bits", "dtype", "opt"), CASES)
def test_low_bit_state_matches_the_reference_every_step(name: str, bits: int, dtype: str, opt: str) -> None:
    run, _, _, f32_betas = IMPLS[name]
    opts = OPTIONS[opt]
    betas = (np.float32(BETA1), np.float32(BETA2)) if f32_betas else (BETA1, BETA2)
    rng = np.random.default_rng(zlib.crc32(f"{name}/{bits}/{dtype}/{opt}".encode()))
    w0 = rng.normal(size=SHAPE).astype(np.float32)
    grads = [(rng.normal(size=SHAPE) * 10.0 ** rng.uniform(-3, 1, size=SHAPE)).astype(np.float32) for _ in LRS]
    grads[1][0, :3] = 0.0
    results = run(bits, dtype, opts, w0, grads)
    assert len(results) == len(LRS)
    rtol, atol = TOL[dtype]
    w_prev, (codes_prev, scales_prev) = _round(w0, dtype), lowbit.zeros_state(w0.size, bits)
    for t, ((w_got, codes_got, scales_got), g, lr) in enumerate(zip(results, grads, LRS), start=1):
        c = rule.constants(lr, t, *betas, EPS, weight_decay=opts.get("weight_decay", 0.0),
                           decoupled=opts.get("decoupled", False), clip=opts.get("clip"),
                           maximize=opts.get("maximize", False)).cast(np.float32)
        w_exp, codes_exp, scales_exp = lowbit.compact_step(w_prev, _round(g, dtype), codes_prev, scales_prev, c,
                                                           bits=bits, seed=0, step=t)
        assert codes_got.dtype == np.uint8 and scales_got.dtype == np.float32
        assert np.array_equal(codes_got, codes_exp), f"{name} codes at step {t}"
        assert np.array_equal(scales_got, scales_exp), f"{name} scales at step {t}"
        np.testing.assert_allclose(w_got, _round(w_exp, dtype), rtol=rtol, atol=atol, err_msg=f"{name} w, step {t}")
        if lr == 0:
            assert np.array_equal(w_got, w_prev)
        w_prev, codes_prev, scales_prev = w_got, codes_got, scales_got
