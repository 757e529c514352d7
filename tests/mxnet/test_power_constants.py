"""The per-step constants ``1 - beta**t`` and ``(1 - beta**t) / lr``, checked independently, t up to 10**6.

Two references, neither of them ftmlopt's code:

* ``tests/data/mxnet_powers.json``: the constant as MXNet 1.9.1's kernel computed it, for 20
  betas, 20 values of t from 1 to 10**6 and two learning rates, in float32 and float64. It was
  read back from ``d`` after ``mx.nd.ftml_update`` on zero arrays with ``epsilon=1``, where
  ``d = (1 - beta**t) / lr * (sqrt(0) + 1)`` (``scripts/compare_mxnet.py --power-table``).
  The bits must match exactly.
* Python's :mod:`decimal` at 60 digits (standard library, so this runs in a NumPy-only install):
  the C library's ``powf``/``pow`` must be within one unit in the last place of the exact power.
  (They are not correctly rounded, so this is a bound, not an equality; MXNet's table is the
  equality.)

NumPy's ``np.power`` is a different implementation (SIMD code paths on some CPUs) that differs
from ``powf``/``pow`` in the last bit for some pairs; ``test_np_power_is_not_what_is_used`` shows
that ftmlopt does not call it and agrees with MXNet wherever ``np.power`` would not.
"""

from __future__ import annotations

import decimal
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ftmlopt import rule
from ftmlopt.mxnet.operator import prepare_scalars

PATH = Path(__file__).resolve().parents[1] / "data" / "mxnet_powers.json"
TABLE: dict[str, Any] = json.loads(PATH.read_text())
BETAS: list[float] = TABLE["betas"]
TS: list[int] = TABLE["ts"]
LRS: list[float] = TABLE["lrs"]
UINT = {np.float32: np.uint32, np.float64: np.uint64}
DTYPES = [np.float32, np.float64]


def mxnet_bits(dt: type, i_lr: int, i_beta: int, i_t: int) -> int:
    return int(TABLE[np.dtype(dt).name][i_lr][i_beta][i_t], 16)


def bits_of(x: Any, dt: type) -> int:
    x = np.asarray(x)
    assert x.dtype == dt, (x.dtype, dt)
    return int(x.view(UINT[dt]))


def test_table_covers_many_betas_and_t_up_to_a_million():
    assert TABLE["generated_with"].startswith("MXNet 1.9.1")
    assert len(BETAS) >= 20 and len(TS) >= 20 and max(TS) == 10**6 and LRS[0] == 1.0
    assert min(BETAS) > 0 and max(BETAS) >= 0.999999
    for dt in DTYPES:
        grid = TABLE[np.dtype(dt).name]
        assert len(grid) == len(LRS) and all(len(r) == len(BETAS) and all(len(c) == len(TS) for c in r) for r in grid)


@pytest.mark.parametrize("dt", DTYPES, ids=lambda d: np.dtype(d).name)
def test_prepare_scalars_equal_mxnet(dt):
    """``d_scale`` for every (lr, beta, t); ``bias2`` (beta2 = beta, lr = 1) for every (beta, t)."""
    bad = []
    for il, lr in enumerate(LRS):
        for ib, beta in enumerate(BETAS):
            for it, t in enumerate(TS):
                s = prepare_scalars(dt, lr, t, beta, beta, 1.0, 0.0, 1.0, -1.0)
                expected = mxnet_bits(dt, il, ib, it)
                if bits_of(s.d_scale, dt) != expected:
                    bad.append(("d_scale", lr, beta, t))
                if il == 0 and bits_of(s.bias2, dt) != expected:
                    bad.append(("bias2", beta, t))
    assert not bad, f"{len(bad)} constants differ from MXNet, e.g. {bad[:5]}"


@pytest.mark.parametrize("dt", DTYPES, ids=lambda d: np.dtype(d).name)
def test_rule_c_power_equals_mxnet(dt, ref):
    """``1 - rule.c_powf(b, t)`` (float32) / ``1 - rule.c_pow(b, t)`` (float64) in the array dtype.

    ``b`` is the beta as MXNet's parser reads it (the test-side parser in conftest), cast to ``dt``.
    The conftest emulation's own ctypes power (``ref.c_power``) is held to the same table.
    """
    power = rule.c_powf if dt is np.float32 else rule.c_pow
    one = dt(1)
    for ib, beta in enumerate(BETAS):
        b = dt(ref.parse(beta))
        for it, t in enumerate(TS):
            expected = mxnet_bits(dt, 0, ib, it)
            assert bits_of(one - dt(power(b, t)), dt) == expected, (beta, t)
            assert bits_of(one - ref.c_power(b, dt(t), dt), dt) == expected, (beta, t)


def _ulp(x: float, dt: type) -> float:
    return float(np.spacing(dt(abs(x))))


def test_c_powers_within_one_ulp_of_exact_decimal_power(ref):
    """Independent of MXNet and of ftmlopt: ``decimal`` at 60 significant digits."""
    ctx = decimal.Context(prec=60)
    worst = {np.float32: 0.0, np.float64: 0.0}
    for beta in BETAS:
        b32 = np.float32(ref.parse(beta))
        for t in TS:
            exact = ctx.power(decimal.Decimal(float(b32)), t)  # b32 is exactly representable in float64
            if exact < decimal.Decimal("1e-300"):
                continue
            for dt, got in ((np.float32, rule.c_powf(float(b32), t)), (np.float64, rule.c_pow(float(b32), t))):
                if dt is np.float32 and exact < decimal.Decimal("1e-37"):
                    continue  # float32 subnormal range: compared in absolute terms below
                err = abs(decimal.Decimal(got) - exact) / decimal.Decimal(_ulp(float(exact), dt))
                worst[dt] = max(worst[dt], float(err))
    assert worst[np.float32] <= 1.0 and worst[np.float64] <= 1.0, worst


def test_c_powf_subnormal_and_underflow_region():
    """Powers that underflow: still within a float32 ulp of the truth, and exactly 0 far below."""
    ctx = decimal.Context(prec=60)
    for b, t in ((0.5, 140), (0.5, 149), (0.9, 900), (0.999, 10**6), (0.1, 50)):
        got = rule.c_powf(b, t)
        exact = ctx.power(decimal.Decimal(float(np.float32(b))), t)
        assert abs(decimal.Decimal(got) - exact) <= decimal.Decimal(2.0**-149), (b, t, got)


def test_np_power_is_not_what_is_used(monkeypatch):
    """prepare_scalars never calls np.power, and matches MXNet wherever np.power disagrees with it.

    Whether np.power disagrees at all depends on the CPU and NumPy build (on an AVX-512 machine with
    NumPy 2.x it does for about 1 pair in 10); the test passes either way, but the second part is
    only informative where it does.
    """

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("np.power / np.float_power must not be used for beta**t")

    monkeypatch.setattr(np, "power", forbidden)
    monkeypatch.setattr(np, "float_power", forbidden)
    s = prepare_scalars(np.float32, 1.0, 9, 0.999, 0.999, 1.0, 0.0, 1.0, -1.0)
    assert bits_of(s.bias2, np.float32) == mxnet_bits(np.float32, 0, BETAS.index(0.999), TS.index(9))
    monkeypatch.undo()

    disagreements = []
    for dt in DTYPES:
        one = dt(1)
        for ib, beta in enumerate(BETAS):
            b = prepare_scalars(dt, 1.0, 1, beta, beta, 1.0, 0.0, 1.0, -1.0).beta1
            for it, t in enumerate(TS):
                expected = mxnet_bits(dt, 0, ib, it)
                if bits_of(one - np.power(b, dt(t)), dt) != expected:
                    disagreements.append((dt, beta, t, ib, it))
    for dt, beta, t, _, it in disagreements:
        s = prepare_scalars(dt, 1.0, t, beta, beta, 1.0, 0.0, 1.0, -1.0)
        assert bits_of(s.bias2, dt) == mxnet_bits(dt, 0, BETAS.index(beta), it), (dt, beta, t)
