"""Compare ftmlopt with the real MXNet 1.9.1 on random inputs, bit for bit (not part of CI).

Run it with an interpreter that has MXNet 1.9.1 (``pip install 'mxnet==1.9.1' 'numpy<1.24'``) and
ftmlopt on the path, e.g.::

    PYTHONPATH=src .venv-mxnet/bin/python scripts/compare_mxnet.py --write docs/mxnet-parity.md \\
        --long-runs tests/data/mxnet_ftml_long_runs.json --power-table tests/data/mxnet_powers.json

What is compared (each array compared after every call or step; d, v, z and the weight):

1. ``mx.nd.ftml_update`` vs ``ftmlopt.ftml_update``: single calls on random weights, gradients and
   states, many sizes, float32 and float64, random hyper-parameters (clipping on/off/0, wd, rescale,
   t in 1..1000).
2. The same operators over multi-step runs from zero state (20 steps, t starting anywhere in 1..1000).
3. ``mx.optimizer.FTML`` + ``get_updater`` vs ``ftmlopt.mxnet.optimizer.FTML`` + ``get_updater``: random
   constructor arguments (clip_gradient None/0/positive/negative, wd with the ``_weight`` name rule,
   lr_mult, rescale_grad, begin_num_update), a random built-in scheduler with or without warmup,
   several keyed parameters, float32/float64, and float16 with ``multi_precision=True``.
4. Long runs: few elements, thousands of steps (t up to about 10**6 with a large starting t or
   ``begin_num_update``), random and extreme betas, clipping, schedulers with warmup and float16
   multi-precision, through the operator and through ``create('ftml')`` + ``get_updater``. With
   ``--long-runs PATH`` they are also written as the test vectors ``tests/data/mxnet_ftml_long_runs.json``.
5. With ``--power-table PATH``: MXNet's own ``(1 - beta**t) / lr`` for many betas and t up to 10**6
   (``tests/data/mxnet_powers.json``), read back from ``d``.
6. Documented differences, measured rather than asserted: float16 without multi_precision (MXNet
   computes in half precision and produces NaN where epsilon underflows; ftmlopt computes in float32
   and rounds once), and the update counts after ``set_states``.

The script prints a summary and, with ``--write PATH``, writes it as Markdown.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

import ftmlopt
from ftmlopt import ftml_update
from ftmlopt import lr_scheduler as f_sched
from ftmlopt import optimizer as f_opt

try:
    import mxnet as mx
except ImportError:  # pragma: no cover - this script needs MXNet
    sys.exit("MXNet is not importable here: run this with the MXNet 1.9.1 virtualenv (see the module docstring)")


@dataclass
class Stats:
    """Agreement counts for one comparison category."""

    label: str
    arrays: int = 0
    arrays_exact: int = 0
    elements: int = 0
    elements_exact: int = 0
    max_rel: float = 0.0
    notes: list[str] = field(default_factory=list)

    def add(self, got: np.ndarray, exp: np.ndarray) -> None:
        got, exp = np.asarray(got), np.asarray(exp)
        assert got.shape == exp.shape and got.dtype == exp.dtype, (got.shape, exp.shape, got.dtype, exp.dtype)
        same = _same_bits(got, exp)
        self.arrays += 1
        self.arrays_exact += bool(same.all())
        self.elements += got.size
        self.elements_exact += int(same.sum())
        if not same.all():
            g64, e64 = got.astype(np.float64).ravel(), exp.astype(np.float64).ravel()
            ok = np.isfinite(g64) & np.isfinite(e64)
            if ok.any():
                rel = np.abs(g64[ok] - e64[ok]) / np.maximum(np.abs(e64[ok]), np.finfo(np.float64).tiny)
                self.max_rel = max(self.max_rel, float(rel.max()))

    def row(self) -> str:
        return (f"| {self.label} | {self.arrays_exact} / {self.arrays} | {self.elements_exact} / {self.elements} "
                f"| {self.max_rel:.3g} |")


def _same_bits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise: identical bits, or both NaN."""
    ui = {2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
    eq = a.reshape(-1).view(ui) == b.reshape(-1).view(ui)
    return eq | (np.isnan(a.reshape(-1)) & np.isnan(b.reshape(-1)))


def _nd(x: np.ndarray) -> mx.nd.NDArray:
    return mx.nd.array(x, dtype=x.dtype)


# --------------------------------------------------------------------------- random draws
SIZES = [1, 2, 3, 7, 16, 60, 97, 256, 1000, 4097, 65_536, 250_001]


def draw_hyper(rng: np.random.Generator) -> dict:
    return {
        "lr": float(10 ** rng.uniform(-4, 0.5)),
        "beta1": float(rng.choice([0.6, 0.5, 0.9, 0.0, rng.uniform(0, 0.99)])),
        "beta2": float(rng.choice([0.999, 0.9, 0.8, rng.uniform(0, 0.99999)])),
        "epsilon": float(rng.choice([1e-8, 1e-6, 0.0, 10 ** rng.uniform(-12, -2)])),
        "wd": float(rng.choice([0.0, 0.03, rng.uniform(0, 0.2)])),
        "rescale_grad": float(rng.choice([1.0, 0.14, 1 / 32, rng.uniform(0, 3)])),
        "clip_grad": float(rng.choice([-1.0, 0.0, 0.4, rng.uniform(0, 3), -rng.uniform(0, 3)])),
    }


def draw_arrays(rng: np.random.Generator, size: int, dtype: type, zero_state: bool):
    shape = (size,) if size < 16 or rng.random() < 0.5 else (size // 4, 4) if size % 4 == 0 else (size,)
    scale = float(10 ** rng.uniform(-3, 2))
    w = (rng.normal(size=shape) * rng.choice([0.1, 1.0, 10.0])).astype(dtype)
    g = (rng.normal(size=shape) * scale).astype(dtype)
    g[rng.random(shape) < 0.05] = 0  # some exact zeros
    if zero_state:
        d, v, z = (np.zeros(shape, dtype) for _ in range(3))
    else:
        d = np.abs(rng.normal(size=shape) * 5).astype(dtype)
        v = (np.abs(rng.normal(size=shape)) * scale**2).astype(dtype)
        z = rng.normal(size=shape).astype(dtype)
    return w, g, d, v, z


def mx_op(w, g, d, v, z, hyper, t):
    arrays = [_nd(a) for a in (w, g, d, v, z)]
    mx.nd.ftml_update(*arrays, out=arrays[0], t=t, **hyper)
    return [a.asnumpy() for a in arrays]


# --------------------------------------------------------------------------- 1 + 2: operator
def compare_operator_single(rng, trials: int, stats: dict[str, Stats]) -> None:
    for i in range(trials):
        dtype = np.float32 if i % 2 == 0 else np.float64
        size = int(rng.choice(SIZES))
        hyper = draw_hyper(rng)
        t = int(rng.integers(1, 1001))
        w, g, d, v, z = draw_arrays(rng, size, dtype, zero_state=False)
        mw, _, md, mv, mz = mx_op(w, g, d, v, z, hyper, t)
        fw = ftml_update(w, g, d, v, z, t=t, out=w, **hyper)
        for got, exp in zip((fw, d, v, z), (mw, md, mv, mz)):
            stats[f"operator, single call, {np.dtype(dtype).name}"].add(got, exp)


def compare_operator_multistep(rng, runs: int, steps: int, stats: dict[str, Stats]) -> None:
    for i in range(runs):
        dtype = np.float32 if i % 2 == 0 else np.float64
        size = int(rng.choice(SIZES[:10]))
        hyper = draw_hyper(rng)
        t0 = int(rng.choice([1, rng.integers(1, 1001)]))
        w, _, d, v, z = draw_arrays(rng, size, dtype, zero_state=True)
        mw, md, mv, mz = (_nd(a) for a in (w, d, v, z))
        for k in range(steps):
            g = (rng.normal(size=w.shape) * 10 ** rng.uniform(-2, 1)).astype(dtype)
            mx.nd.ftml_update(mw, _nd(g), md, mv, mz, out=mw, t=t0 + k, **hyper)
            ftml_update(w, g, d, v, z, t=t0 + k, out=w, **hyper)
        for got, exp in zip((w, d, v, z), (mw, md, mv, mz)):
            stats[f"operator, {steps}-step runs, {np.dtype(dtype).name}"].add(got, exp.asnumpy())


# --------------------------------------------------------------------------- 3: optimizer + updater
def draw_scheduler(rng):
    kind = rng.choice(["none", "factor", "multifactor", "poly", "cosine", "callable"])
    base = float(10 ** rng.uniform(-3, -0.5))
    warm = {} if rng.random() < 0.5 else {"warmup_steps": int(rng.integers(1, 5)),
                                          "warmup_begin_lr": base * float(rng.uniform(0, 1)),
                                          "warmup_mode": str(rng.choice(["linear", "constant"]))}
    if kind == "none":
        return None, None, kind
    if kind == "callable":
        def f(n, base=base):
            return base / (1 + 0.1 * n)
        return f, f, kind
    if kind == "factor":
        kw = {"step": int(rng.integers(1, 4)), "factor": float(rng.uniform(0.3, 1.0)), "base_lr": base, **warm}
        return mx.lr_scheduler.FactorScheduler(**kw), f_sched.FactorScheduler(**kw), kind
    if kind == "multifactor":
        kw = {"step": [2, 4, 7], "factor": float(rng.uniform(0.3, 1.0)), "base_lr": base, **warm}
        return mx.lr_scheduler.MultiFactorScheduler(**kw), f_sched.MultiFactorScheduler(**kw), kind
    max_update = int(rng.integers(6, 15))
    if kind == "poly":
        kw = {"max_update": max_update, "base_lr": base, "pwr": float(rng.choice([1, 2, 0.5])),
              "final_lr": base * 0.01, **warm}
        return mx.lr_scheduler.PolyScheduler(**kw), f_sched.PolyScheduler(**kw), kind
    kw = {"max_update": max_update, "base_lr": base, "final_lr": base * 0.01, **warm}
    return mx.lr_scheduler.CosineScheduler(**kw), f_sched.CosineScheduler(**kw), kind


def draw_optimizer_kwargs(rng):
    kw = {
        "beta1": float(rng.choice([0.6, 0.5, rng.uniform(0, 0.95)])),
        "beta2": float(rng.choice([0.999, 0.9, rng.uniform(0.5, 0.9999)])),
        "epsilon": float(rng.choice([1e-8, 10 ** rng.uniform(-10, -4)])),
        "wd": float(rng.choice([0.0, 0.01, rng.uniform(0, 0.1)])),
        "rescale_grad": float(rng.choice([1.0, 1 / 16, rng.uniform(0.1, 2)])),
        "begin_num_update": int(rng.choice([0, 0, 5, 100])),
        "param_idx2name": {0: "fc_weight", 1: "fc_bias", 2: "bn_gamma"},
    }
    clip = rng.choice(["none", "zero", "pos", "neg"])
    if clip != "none":
        kw["clip_gradient"] = {"zero": 0.0, "pos": float(rng.uniform(0.05, 2)), "neg": -0.5}[clip]
    if rng.random() < 0.5:
        kw["learning_rate"] = float(10 ** rng.uniform(-3, -0.5))
    return kw


def compare_optimizer(rng, runs: int, steps: int, stats: dict[str, Stats]) -> None:
    shapes = {0: (5, 4), 1: (4,), 2: (3, 3, 2)}
    for i in range(runs):
        dtype = [np.float32, np.float64, np.float16][i % 3]
        kw = draw_optimizer_kwargs(rng)
        mx_s, f_s, kind = draw_scheduler(rng)
        if mx_s is not None and kind == "callable" and "learning_rate" in kw:
            del kw["learning_rate"]  # ftmlopt refuses to override a plain callable (it has no base_lr)
        mp = dtype == np.float16
        lr_mult = {0: float(rng.choice([1.0, 0.5, 2.0]))}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mo = mx.optimizer.create("ftml", lr_scheduler=mx_s, multi_precision=mp, **kw)
            fo = f_opt.create("FTML", lr_scheduler=f_s, multi_precision=mp, **kw)
        mo.set_lr_mult(lr_mult)
        fo.set_lr_mult(lr_mult)
        mu, fu = mx.optimizer.get_updater(mo), f_opt.get_updater(fo)
        ws = {k: rng.normal(size=s).astype(dtype) for k, s in shapes.items()}
        mws = {k: _nd(w) for k, w in ws.items()}
        label = f"optimizer + updater, {np.dtype(dtype).name}" + (" (multi_precision)" if mp else "")
        for _ in range(steps):
            keys = [int(k) for k in rng.permutation(3)[: rng.integers(1, 4)]]
            grads = {k: (rng.normal(size=shapes[k]) * 10 ** rng.uniform(-2, 1)).astype(dtype) for k in keys}
            if rng.random() < 0.5:
                for k in keys:
                    mu(k, _nd(grads[k]), mws[k])
                    fu(k, grads[k], ws[k])
            else:
                mu(keys, [_nd(grads[k]) for k in keys], [mws[k] for k in keys])
                fu(keys, [grads[k] for k in keys], [ws[k] for k in keys])
        for k in ws:
            stats[label].add(ws[k], mws[k].asnumpy())
            if k in fu.states:
                fstate, mstate = fu.states[k], mu.states[k]
                if mp:
                    stats[label].add(fstate[0], mstate[0].asnumpy())
                    fstate, mstate = fstate[1], mstate[1]
                for a, b in zip(fstate, mstate):
                    stats[label].add(a, b.asnumpy())
        assert fo._index_update_count == mo._index_update_count, (fo._index_update_count, mo._index_update_count)
        assert fo.num_update == mo.num_update


# --------------------------------------------------------------------------- 4: documented differences
def measure_fp16(rng, trials: int, stats: dict[str, Stats]) -> tuple[int, int]:
    """float16 without multi_precision: count MXNet NaNs and compare the rest."""
    mx_nan = f_nan = 0
    for _ in range(trials):
        hyper = draw_hyper(rng)
        hyper["epsilon"] = 1e-8
        w, g, d, v, z = draw_arrays(rng, int(rng.choice(SIZES[:8])), np.float16, zero_state=True)
        g[: max(1, g.size // 10)] = 0
        mw = mx_op(w, g, d, v, z, hyper, 1)[0]
        fw = ftml_update(w, g, d, v, z, t=1, **hyper)
        mx_nan += int(np.isnan(mw).sum())
        f_nan += int(np.isnan(fw).sum())
        stats["float16 operator (documented difference)"].add(fw, mw)
    return mx_nan, f_nan


def measure_set_states(rng) -> str:
    mo, fo = mx.optimizer.FTML(learning_rate=0.1), f_opt.FTML(learning_rate=0.1)
    mu, fu = mx.optimizer.get_updater(mo), f_opt.get_updater(fo)
    w = rng.normal(size=4).astype(np.float32)
    mw = _nd(w)
    for _ in range(3):
        g = rng.normal(size=4).astype(np.float32)
        mu(0, _nd(g), mw)
        fu(0, g, w)
    mu2 = mx.optimizer.get_updater(mx.optimizer.FTML(learning_rate=0.1))
    mu2.set_states(mu.get_states())
    fu2 = f_opt.get_updater(f_opt.FTML(learning_rate=0.1))
    fu2.set_states(fu.get_states())
    g = rng.normal(size=4).astype(np.float32)
    mu2(0, _nd(g), mw)
    fu2(0, g, w)
    return (f"after 3 steps, save and load into a fresh updater, one more step: MXNet uses t = "
            f"{mu2.optimizer._index_update_count[0]}, ftmlopt uses t = {fu2.optimizer._index_update_count[0]}")


# --------------------------------------------------------------------------- 5: long runs (vectors file)
# Few elements, thousands of steps. The gradients are not stored: they are a pure function of
# (seed, step, key, element), defined here and in the file's "gradient" field, that any
# implementation can recompute bit for bit (integer hashing, then one float64 multiply and one
# cast to the array dtype). Initial weights and checkpoints are stored as the arrays' bit patterns.
MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """SplitMix64's output function (Steele, Lea & Flood 2014) on a 64-bit integer."""
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


GRADIENT_RULE = (
    "h = splitmix64((seed << 32) + (step << 8) + (key << 4) + element) (64-bit unsigned; step is the "
    "1-based call number, key the parameter's index, 0 for operator cases); grad = 0 if h & 255 == 0, else "
    "scales[element] * (2 * (h >> 40) / 2**24 - 1) computed in float64 and cast to the array dtype"
)


def long_run_grad(seed: int, step: int, key: int, scales: list[float], dtype: type) -> np.ndarray:
    out = []
    for i, scale in enumerate(scales):
        h = splitmix64((seed << 32) + (step << 8) + (key << 4) + i)
        out.append(0.0 if h & 255 == 0 else scale * (2.0 * (h >> 40) / 2.0**24 - 1.0))
    return np.array(out, dtype=np.float64).astype(dtype)


def bits(a: np.ndarray) -> list[str]:
    """An array's elements as hexadecimal bit patterns (exact, NaN payloads and signed zeros kept)."""
    a = np.ascontiguousarray(a)
    ui = {2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
    width = 2 * a.dtype.itemsize
    return [format(int(x), f"0{width}x") for x in a.reshape(-1).view(ui)]


def from_bits(hexes: list[str], dtype: type) -> np.ndarray:
    ui = {2: np.uint16, 4: np.uint32, 8: np.uint64}[np.dtype(dtype).itemsize]
    return np.array([int(h, 16) for h in hexes], dtype=ui).view(dtype)


def checkpoint_steps(steps: int) -> list[int]:
    marks = {1, 3, 100, steps}
    marks.update(k for k in range(1000, steps + 1, 1000))
    return sorted(m for m in marks if m <= steps)


def long_operator_cases(rng) -> list[dict]:
    """``mx.nd.ftml_update`` called ``steps`` times in a row on a few elements."""
    plan = [  # (dtype, steps, t0, hyper overrides)
        ("float32", 3000, 1, {}),
        ("float64", 3000, 1, {}),
        ("float32", 3000, 1, {"beta1": 0.9, "beta2": 0.9999, "clip_grad": 0.4, "wd": 0.01}),
        ("float64", 3000, 1, {"beta1": 0.9, "beta2": 0.9999, "clip_grad": 0.4, "wd": 0.01}),
        ("float32", 2000, 998_001, {"clip_grad": 0.0}),
        ("float64", 2000, 998_001, {"rescale_grad": 1 / 32}),
        ("float32", 4000, 1, "random"),
        ("float64", 4000, 1, "random"),
        ("float32", 2500, 5001, "random"),
        ("float64", 2500, 5001, "random"),
    ]
    cases = []
    for n, (dtype, steps, t0, over) in enumerate(plan):
        dt = np.dtype(dtype).type
        if over == "random":
            hyper = draw_hyper(rng)
            hyper["beta1"] = float(rng.uniform(0.0, 0.99))
            hyper["beta2"] = float(1.0 - 10 ** rng.uniform(-5, -0.5))
        else:
            hyper = {"lr": 0.01, "beta1": 0.6, "beta2": 0.999, "epsilon": 1e-8, "wd": 0.0,
                     "rescale_grad": 1.0, "clip_grad": -1.0, **over}
        seed = 100 + n
        scales = [float(10 ** rng.uniform(-3, 1)) for _ in range(5)]
        w = (rng.normal(size=5) * rng.choice([0.1, 1.0, 10.0])).astype(dt)
        case = {"name": f"op{n}_{dtype}_t{t0}_{steps}steps", "kind": "operator", "dtype": dtype,
                "steps": steps, "t0": t0, "hyper": hyper, "seed": seed, "scales": scales,
                "initial_weight": bits(w), "checkpoints": {}}
        marks = set(checkpoint_steps(steps))
        mw, md, mv, mz = _nd(w), mx.nd.zeros(5, dtype=dt), mx.nd.zeros(5, dtype=dt), mx.nd.zeros(5, dtype=dt)
        for k in range(1, steps + 1):
            g = long_run_grad(seed, k, 0, scales, dt)
            mx.nd.ftml_update(mw, _nd(g), md, mv, mz, out=mw, t=t0 + k - 1, **hyper)
            if k in marks:
                case["checkpoints"][str(k)] = {n_: bits(a.asnumpy()) for n_, a in zip("wdvz", (mw, md, mv, mz))}
        cases.append(case)
    return cases


def _long_scheduler(spec: dict | None, module):
    if spec is None:
        return None
    return getattr(module, spec["class"])(**spec["kwargs"])


def long_optimizer_cases(rng) -> list[dict]:
    """``mx.optimizer.create('ftml', ...)`` + ``get_updater`` for thousands of steps, two keys."""
    plan = [
        ("float32", 3000, {"learning_rate": 0.02}, None),
        ("float64", 3000, {"begin_num_update": 1000, "clip_gradient": 0.5, "wd": 0.001},
         {"class": "FactorScheduler", "kwargs": {"step": 400, "factor": 0.8, "base_lr": 0.03,
                                                 "warmup_steps": 50, "warmup_begin_lr": 0.001}}),
        ("float32", 3000, {"beta1": 0.8, "beta2": 0.995, "clip_gradient": 0, "rescale_grad": 0.5},
         {"class": "CosineScheduler", "kwargs": {"max_update": 2500, "base_lr": 0.05, "final_lr": 0.001,
                                                 "warmup_steps": 100, "warmup_mode": "constant",
                                                 "warmup_begin_lr": 0.005}}),
        ("float64", 2500, {"epsilon": 1e-6, "wd": 0.01},
         {"class": "PolyScheduler", "kwargs": {"max_update": 2000, "base_lr": 0.01, "pwr": 2, "final_lr": 1e-4}}),
        ("float16", 3000, {"multi_precision": True, "learning_rate": 0.01, "clip_gradient": 1.0},
         {"class": "MultiFactorScheduler", "kwargs": {"step": [500, 1500, 2500], "factor": 0.5, "base_lr": 0.01}}),
        ("float16", 2000, {"multi_precision": True, "begin_num_update": 50_000, "wd": 0.005}, "random"),
        ("float32", 2000, {"begin_num_update": 250_000}, "random"),
    ]
    cases = []
    for n, (dtype, steps, kw, sched) in enumerate(plan):
        dt = np.dtype(dtype).type
        kw = dict(kw)
        if sched == "random":
            kw.update(beta1=float(rng.uniform(0, 0.95)), beta2=float(1.0 - 10 ** rng.uniform(-4.5, -1)),
                      epsilon=float(10 ** rng.uniform(-10, -5)), rescale_grad=float(rng.uniform(0.1, 2)))
            sched = {"class": "FactorScheduler", "kwargs": {"step": int(rng.integers(100, 600)),
                                                            "factor": float(rng.uniform(0.5, 0.99)),
                                                            "base_lr": float(10 ** rng.uniform(-3, -1.5))}}
        kw["param_idx2name"] = {0: "fc_weight", 1: "fc_bias"}
        lr_mult = {0: 1.0, 1: 0.5}
        seed = 200 + n
        scales = {0: [float(10 ** rng.uniform(-2, 1)) for _ in range(4)],
                  1: [float(10 ** rng.uniform(-2, 1)) for _ in range(3)]}
        ws = {0: rng.normal(size=4).astype(dt), 1: (rng.normal(size=3) * 0.1).astype(dt)}
        case = {"name": f"opt{n}_{dtype}_{sched['class'] if sched else 'constant'}_{steps}steps",
                "kind": "optimizer", "dtype": dtype, "steps": steps, "optimizer": kw, "scheduler": sched,
                "lr_mult": {str(k): v for k, v in lr_mult.items()}, "seed": seed,
                "scales": {str(k): v for k, v in scales.items()},
                "initial_weights": {str(k): bits(w) for k, w in ws.items()},
                "schedule": "key 0 is updated at every step, key 1 (with key 0, as a list) at every odd step",
                "checkpoints": {}}
        mkw = {k: ({int(i): nm for i, nm in v.items()} if k == "param_idx2name" else v) for k, v in kw.items()}
        mo = mx.optimizer.create("ftml", lr_scheduler=_long_scheduler(sched, mx.lr_scheduler), **mkw)
        mo.set_lr_mult(lr_mult)
        mu = mx.optimizer.get_updater(mo)
        mws = {k: _nd(w) for k, w in ws.items()}
        marks = set(checkpoint_steps(steps))
        for k in range(1, steps + 1):
            keys = [0, 1] if k % 2 == 1 else [0]
            grads = [_nd(long_run_grad(seed, k, j, scales[j], dt)) for j in keys]
            if len(keys) == 1:
                mu(0, grads[0], mws[0])
            else:
                mu(keys, grads, [mws[j] for j in keys])
            if k in marks:
                point = {"num_update": mo.num_update,
                         "counts": {str(j): c for j, c in mo._index_update_count.items()}}
                for j in mws:
                    state = mu.states[j]
                    arrays = {"w": mws[j].asnumpy()}
                    if dtype == "float16":
                        arrays["master"] = state[0].asnumpy()
                        state = state[1]
                    arrays.update({nm: a.asnumpy() for nm, a in zip("dvz", state)})
                    point[str(j)] = {nm: bits(a) for nm, a in arrays.items()}
                case["checkpoints"][str(k)] = point
        cases.append(case)
    return cases


def write_long_runs(path: str, rng) -> list[dict]:
    import json

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = long_operator_cases(rng) + long_optimizer_cases(rng)
    doc = {
        "description": (
            "Long FTML runs (thousands of steps, few elements) produced by MXNet 1.9.1 itself "
            "(scripts/compare_mxnet.py --long-runs). Arrays are stored as the hexadecimal bit patterns of "
            "their elements (float16: 4 digits, float32: 8, float64: 16). Operator cases call "
            "mx.nd.ftml_update(w, g, d, v, z, out=w, t=t0+k-1, **hyper) for k = 1..steps from zero state. "
            "Optimizer cases use o = mx.optimizer.create('ftml', lr_scheduler=scheduler, **optimizer), "
            "o.set_lr_mult(lr_mult), u = mx.optimizer.get_updater(o); at step k, u(0, g0, w0) on even k and "
            "u([0, 1], [g0, g1], [w0, w1]) on odd k. Checkpoints hold the weights and states after step k "
            "(float16 multi_precision: the float32 master copy, then d, v, z in float32)."
        ),
        "generated_with": f"MXNet {mx.__version__}, NumPy {np.__version__}, Python {platform.python_version()}, "
                          f"{platform.machine()}",
        "gradient": GRADIENT_RULE,
        "cases": cases,
    }
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, separators=(",", ":"))
        fh.write("\n")
    return cases


def replay_long_runs(cases: list[dict], stats: dict[str, Stats]) -> None:
    """ftmlopt on the long runs MXNet just produced: every checkpoint array counted."""
    for case in cases:
        dt = np.dtype(case["dtype"]).type
        label = f"long runs (t in the thousands), {case['kind']}"
        if case["kind"] == "operator":
            w = from_bits(case["initial_weight"], dt)
            d, v, z = (np.zeros_like(w) for _ in range(3))
            for k in range(1, case["steps"] + 1):
                g = long_run_grad(case["seed"], k, 0, case["scales"], dt)
                ftml_update(w, g, d, v, z, t=case["t0"] + k - 1, out=w, **case["hyper"])
                point = case["checkpoints"].get(str(k))
                if point:
                    for nm, a in zip("wdvz", (w, d, v, z)):
                        stats[label].add(a, from_bits(point[nm], dt))
            continue
        kw = dict(case["optimizer"])
        kw["param_idx2name"] = {int(i): nm for i, nm in kw["param_idx2name"].items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fo = f_opt.create("ftml", lr_scheduler=_long_scheduler(case["scheduler"], f_sched), **kw)
        fo.set_lr_mult({int(k): v for k, v in case["lr_mult"].items()})
        fu = f_opt.get_updater(fo)
        ws = {int(k): from_bits(h, dt) for k, h in case["initial_weights"].items()}
        scales = {int(k): v for k, v in case["scales"].items()}
        for k in range(1, case["steps"] + 1):
            keys = [0, 1] if k % 2 == 1 else [0]
            grads = [long_run_grad(case["seed"], k, j, scales[j], dt) for j in keys]
            if len(keys) == 1:
                fu(0, grads[0], ws[0])
            else:
                fu(keys, grads, [ws[j] for j in keys])
            point = case["checkpoints"].get(str(k))
            if point:
                for j in ws:
                    state = fu.states[j]
                    arrays = {"w": ws[j]}
                    if case["dtype"] == "float16":
                        arrays["master"] = state[0]
                        state = state[1]
                    arrays.update(dict(zip("dvz", state)))
                    for nm, a in arrays.items():
                        stats[label].add(a, from_bits(point[str(j)][nm], a.dtype.type))


# --------------------------------------------------------------------------- 6: beta**t table
def power_table(rng) -> dict:
    """``1 - beta**t`` and ``(1 - beta**t) / lr`` as MXNet's kernel computes them, read back from ``d``.

    With ``g = v = 0``, ``epsilon = 1`` and ``beta2 = 0.5`` the kernel's first line gives
    ``d_t = (1 - beta1**t) / lr * (sqrt(0) + 1)``: exactly the kernel's own constant, rounded in the
    array dtype, for any ``t`` (up to 10**6 here).
    """
    betas = [0.1, 0.5, 0.6, 0.9, 0.95, 0.99, 0.999, 0.9999, 0.99999, 0.999999]
    betas += [float(rng.uniform(0, 1)) for _ in range(4)] + [float(1 - 10 ** rng.uniform(-6.5, -1)) for _ in range(6)]
    ts = [1, 2, 3, 9, 10, 33, 100, 257, 1000, 4096, 12345, 65537, 99999, 100000, 524287, 1000000]
    ts += sorted(int(x) for x in rng.integers(2, 1_000_001, size=4))
    lrs = [1.0, float(10 ** rng.uniform(-4, 0))]
    table = {"betas": betas, "ts": ts, "lrs": lrs}
    for dtype in ("float32", "float64"):
        dt = np.dtype(dtype).type
        grid = []
        for lr in lrs:
            rows = []
            for b in betas:
                row = []
                for t in ts:
                    w, g, d, v, z = (mx.nd.zeros(1, dtype=dt) for _ in range(5))
                    mx.nd.ftml_update(w, g, d, v, z, out=w, t=t, lr=lr, beta1=b, beta2=0.5, epsilon=1.0)
                    row.append(bits(d.asnumpy())[0])
                rows.append(row)
            grid.append(rows)
        table[dtype] = grid
    return table


def write_power_table(path: str, rng) -> None:
    import json

    doc = {
        "description": (
            "The per-step constant (1 - beta1**t) / lr of MXNet 1.9.1's ftml_update kernel, read back from d after "
            "mx.nd.ftml_update(w, g, d, v, z, out=w, t=t, lr=lr, beta1=beta, beta2=0.5, epsilon=1.0) on zero "
            "arrays (then d = (1 - beta**t)/lr * (sqrt(0) + 1)). table[dtype][i][j][k] is the bit pattern (hex) "
            "for lrs[i], betas[j], ts[k]; with lr = 1 it is 1 - beta**t itself. beta and lr are passed as "
            "Python floats (MXNet parses str(x) into float32); powf / pow are the C library's, as MXNet calls them."
        ),
        "generated_with": f"MXNet {mx.__version__} (scripts/compare_mxnet.py --power-table), NumPy "
                          f"{np.__version__}, {platform.machine()}",
        **power_table(rng),
    }
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, separators=(",", ":"))
        fh.write("\n")


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=20261125)
    ap.add_argument("--op-trials", type=int, default=2000)
    ap.add_argument("--op-runs", type=int, default=200)
    ap.add_argument("--opt-runs", type=int, default=300)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--write", metavar="PATH", help="write the Markdown report here")
    ap.add_argument("--long-runs", metavar="PATH", help="also write the long-run vectors (JSON) here")
    ap.add_argument("--power-table", metavar="PATH", help="also write MXNet's (1 - beta**t)/lr table (JSON) here")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    labels = [
        "operator, single call, float32", "operator, single call, float64",
        f"operator, {args.steps}-step runs, float32", f"operator, {args.steps}-step runs, float64",
        "optimizer + updater, float32", "optimizer + updater, float64",
        "optimizer + updater, float16 (multi_precision)",
        "long runs (t in the thousands), operator", "long runs (t in the thousands), optimizer",
        "float16 operator (documented difference)",
    ]
    stats = {k: Stats(k) for k in labels}
    start = time.perf_counter()
    compare_operator_single(rng, args.op_trials, stats)
    compare_operator_multistep(rng, args.op_runs, args.steps, stats)
    compare_optimizer(rng, args.opt_runs, args.steps, stats)
    # Long runs draw from their own stream, so the rows above keep their draws.
    long_rng = np.random.default_rng(args.seed + 1)
    if args.long_runs:
        long_cases = write_long_runs(args.long_runs, long_rng)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            long_cases = long_operator_cases(long_rng) + long_optimizer_cases(long_rng)
    replay_long_runs(long_cases, stats)
    if args.power_table:
        write_power_table(args.power_table, np.random.default_rng(args.seed + 2))
    mx_nan, f_nan = measure_fp16(rng, 100, stats)
    # Ablation: what plain float32 rounding of the hyper-parameters (instead of MXNet's dmlc parser,
    # which is not correctly rounded) would give. Same kind of draws as the first rows.
    from ftmlopt.mxnet import operator as op_mod

    parse = op_mod._mxnet_param
    op_mod._mxnet_param = lambda x, double=False: np.float64(x) if double else np.float32(x)
    try:
        ablation: dict[str, Stats] = {}
        for dt in ("float32", "float64"):
            key = f"operator, single call, {dt}"
            ablation[key] = Stats(f"ablation: hyper-parameters rounded with float32(x), {dt}")
        compare_operator_single(rng, max(args.op_trials // 4, 2), ablation)
    finally:
        op_mod._mxnet_param = parse
    stats.update({v.label: v for v in ablation.values()})
    resume = measure_set_states(rng)
    elapsed = time.perf_counter() - start

    exact = [s for s in stats.values() if "documented" not in s.label and "ablation" not in s.label]
    all_exact = all(s.arrays_exact == s.arrays for s in exact)
    lines = [
        "| comparison | bit-exact arrays | bit-exact elements | max relative error |",
        "|---|---|---|---|",
        *(s.row() for s in stats.values()),
    ]
    summary = [
        f"MXNet {mx.__version__}, ftmlopt {ftmlopt.__version__}, NumPy {np.__version__}, Python "
        f"{platform.python_version()}, {platform.machine()}; seed {args.seed}; {elapsed:.0f} s.",
        "",
        *lines,
        "",
        f"All float32/float64 comparisons bit-exact: **{'yes' if all_exact else 'NO'}** "
        f"({sum(s.arrays_exact for s in exact)} of {sum(s.arrays for s in exact)} arrays, "
        f"{sum(s.elements_exact for s in exact)} of {sum(s.elements for s in exact)} elements).",
        "",
        f"float16 without multi_precision (deliberate difference): MXNet produced {mx_nan} NaN weights "
        f"(zero gradients, epsilon underflows in half precision), ftmlopt {f_nan}.",
        "",
        f"Resuming from get_states/set_states (deliberate difference): {resume}.",
    ]
    text = "\n".join(summary)
    print(text)
    if args.write:
        cmd = "PYTHONPATH=src .venv-mxnet/bin/python scripts/compare_mxnet.py " + " ".join(
            a for a in (argv if argv is not None else sys.argv[1:])
        )
        with open(args.write, "w", encoding="utf-8") as fh:
            fh.write(_REPORT_HEAD.format(cmd=cmd.strip()))
            fh.write(text + "\n")
    return 0 if all_exact else 1


_REPORT_HEAD = """# Parity with MXNet 1.9.1 (measured)

ftmlopt's NumPy operator and optimizer system were compared with the real MXNet 1.9.1 (CPU wheel
from PyPI) on random inputs by `scripts/compare_mxnet.py`. Every weight, `d`, `v` and `z` array is
compared bit for bit (NaN counted equal to NaN): after each single call, at the end of each
20-step run, and at the checkpoints of the long runs (thousands of steps, `t` up to about 10^6).
The first nine rows must be bit-exact; the float16 row measures a deliberate difference (see
the README's "Differences from MXNet" table). The two "ablation" rows show why `ftml_update`
parses hyper-parameters the way MXNet does: MXNet receives each keyword argument as `str(value)`
and dmlc-core's `ParseFloat` (not correctly rounded) turns it into the float32 field (epsilon: a
float64 field), so plain `float32(x)` rounding disagrees with MXNet for a share of random
hyper-parameters. How MXNet computes, and what ftmlopt reproduces, is in
[mxnet-semantics.md](mxnet-semantics.md).

MXNet is not a dependency of ftmlopt and this script is not part of CI. CI replays what MXNet
produced, stored in `tests/data/`: `mxnet_ftml_vectors.json` (3-step cases), the long runs in
`mxnet_ftml_long_runs.json` and MXNet's own `(1 - beta**t)/lr` for t up to 10^6 in
`mxnet_powers.json`; the same command regenerates the last two.

Reproduce (MXNet 1.9.1 needs NumPy < 1.24):

    python3 -m venv .venv-mxnet && .venv-mxnet/bin/pip install 'mxnet==1.9.1' 'numpy<1.24'
    {cmd}

## Result

"""


if __name__ == "__main__":
    raise SystemExit(main())
