"""Print the measured parity of the optax and Keras front ends (not a test; run it by hand).

    KERAS_BACKEND=jax JAX_ENABLE_X64=1 python tests/jax/parity_report.py
    KERAS_BACKEND=torch JAX_ENABLE_X64=1 python tests/jax/parity_report.py

For float32 and float64, over 200 steps of random gradients (N=4096, with coupled weight decay
and clipping on), it prints the largest tensor-wise relative error
``max|a - b| / max|b|`` of the new weight and of ``z``, against ``ftmlopt.ftml_update`` and
``ftmlopt.torch.FTML``: "one step" starts every step from the reference state; "trajectory" runs
freely. Hyper-parameters are exact in float32 so that the float64 comparison is meaningful.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import torch

from ftmlopt import ftml_update
from ftmlopt.keras import FTML as KerasFTML
from ftmlopt.optax import FTMLState, ftml
from ftmlopt.torch import FTML as TorchFTML

N, T = 4096, 200
MX = {"lr": 0.125, "beta1": 0.5, "beta2": 0.875, "epsilon": 2.0**-20, "wd": 0.25, "clip_grad": 0.75}


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


class Optax:
    def __init__(self, w0):
        self.tx = ftml(0.125, 0.5, 0.875, 2.0**-20, weight_decay=0.25, clip_gradient=0.75, compact=False)
        self.update = jax.jit(self.tx.update)
        self.w = jnp.asarray(w0)
        self.state = self.tx.init(self.w)

    def load(self, w, d, v, z, t):
        # private copies: jnp.asarray may alias NumPy memory that ftml_update then overwrites
        self.w = jnp.asarray(w.copy())
        self.state = FTMLState(jnp.int32(t - 1), *(jnp.asarray(a.copy()) for a in (d, v, z)))

    def step(self, g):
        u, self.state = self.update(jnp.asarray(g), self.state, self.w)
        self.w = optax.apply_updates(self.w, u)
        return np.asarray(self.w), np.asarray(self.state.z)


class Keras:
    def __init__(self, w0):
        self.var = keras.Variable(w0, dtype=str(w0.dtype))
        self.opt = KerasFTML(
            0.125, 0.5, 0.875, 2.0**-20, coupled_weight_decay=0.25, clip_gradient=0.75, compact=False
        )
        self.opt.build([self.var])
        self.dtype = str(w0.dtype)

    def load(self, w, d, v, z, t):
        for mine, ref in zip((self.var, self.opt._d[0], self.opt._v[0], self.opt._z[0]), (w, d, v, z)):
            mine.assign(ref.copy())
        self.opt.iterations.assign(t - 1)

    def step(self, g):
        self.opt.apply([keras.ops.convert_to_tensor(g, dtype=self.dtype)], [self.var])
        return np.array(keras.ops.convert_to_numpy(self.var)), np.array(keras.ops.convert_to_numpy(self.opt._z[0]))


class Torch:
    def __init__(self, w0):
        self.p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
        self.opt = TorchFTML(
            [self.p], lr=0.125, betas=(0.5, 0.875), eps=2.0**-20, weight_decay=0.25, clip_gradient=0.75, compact=False
        )

    def load(self, w, d, v, z, t):
        with torch.no_grad():
            self.p.copy_(torch.from_numpy(w))
            if self.opt.state[self.p]:
                for key, ref in (("d", d), ("v", v), ("z", z)):
                    self.opt.state[self.p][key].copy_(torch.from_numpy(ref))

    def step(self, g):
        self.p.grad = torch.from_numpy(g.copy())
        self.opt.step()
        return self.p.detach().numpy().copy(), self.opt.state[self.p]["z"].numpy().copy()


def main() -> None:
    print(f"keras backend: {keras.backend.backend()}; x64: {jax.config.jax_enable_x64}; N={N}, T={T}")
    for dtype in (np.float32, np.float64):
        rng = np.random.default_rng(0)
        w0 = rng.standard_normal(N).astype(dtype)
        grads = rng.standard_normal((T, N)).astype(dtype)
        for mode in ("one step", "trajectory"):
            fronts = {"optax": Optax(w0), "keras": Keras(w0), "torch": Torch(w0)}
            worst = {(a, b, q): 0.0 for a in ("optax", "keras") for b in ("ftml_update", "torch") for q in "wz"}
            w, d, v, z = w0.copy(), np.zeros_like(w0), np.zeros_like(w0), np.zeros_like(w0)
            for t in range(1, T + 1):
                if mode == "one step":
                    for f in fronts.values():
                        f.load(w, d, v, z, t)
                out = {name: f.step(grads[t - 1]) for name, f in fronts.items()}
                ftml_update(w, grads[t - 1], d, v, z, t=t, out=w, **MX)
                out["ftml_update"] = (w, z)
                for a, b, q in worst:
                    i = "wz".index(q)
                    worst[a, b, q] = max(worst[a, b, q], rel(out[a][i], out[b][i]))
            for (a, b, q), e in worst.items():
                print(f"{np.dtype(dtype).name:8s} {mode:10s} {a:5s} vs {b:11s} {q}: {e:.2e}")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
