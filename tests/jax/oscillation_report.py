"""Does FTML stay on a parabola's minimum? Both evaluation orders of the MXNet form, and the compact form.

Not a test (the name does not start with ``test_``); run it by hand::

    PYTHONPATH=src JAX_PLATFORMS=cpu python tests/jax/oscillation_report.py
    PYTHONPATH=src JAX_PLATFORMS=cpu XLA_FLAGS=--xla_cpu_max_isa=SSE4_2 python tests/jax/oscillation_report.py

(the second run keeps XLA from emitting FMA instructions). Loss ``sum((w - w*)^2)`` from ``w = 0``,
lr 0.3, FTML's default betas and eps, float32. Prints ``max|w - w*|`` after 1000, 3000 and 10000
steps, for the rule evaluated op by op in NumPy (every operation rounded, no FMA) and under
``jax.jit`` (a ``lax.scan``, which XLA compiles, contracting ``a*b + c`` into FMAs where the CPU has them).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from ftmlopt import rule

LR, STEPS = 0.3, (1000, 3000, 10000)
TARGETS = ([1.0, -1.0, 1.0], [0.7, -1.3, 2.1])


def f32_constants(t, xp):
    c = rule.constants(lr=LR, t=t, beta1=0.6, beta2=0.999, eps=1e-8)
    fields = {k: (x if k == "sign" or x is None else xp.asarray(x, xp.float32)) for k, x in c._asdict().items()}
    return rule.Constants(**fields)


def step(form, w, g, d, v, z, c, xp, clip):
    if form == "compact":
        w, v = rule.compact_step(w, g, v, c, sqrt=xp.sqrt, clip=clip)
        return w, d, v, z
    return rule.mxnet_step(w, g, d, v, z, c, sqrt=xp.sqrt, clip=clip, stable=form == "mxnet, stable order")


FORMS = ("mxnet, MXNet's order", "mxnet, stable order", "compact")


def numpy_run(form, target):
    target = np.asarray(target, np.float32)
    w = d = v = z = np.zeros(3, np.float32)
    out = []
    for t in range(1, max(STEPS) + 1):
        g = np.float32(2) * (w - target)
        c = f32_constants(t, np)
        w, d, v, z = step(form, w, g, d, v, z, c, np, np.clip)
        if t in STEPS:
            out.append(float(np.max(np.abs(w - target))))
    return out


def jax_run(form, target):
    target = jnp.asarray(target, jnp.float32)

    @functools.partial(jax.jit, static_argnums=0)
    def run(n):
        def body(carry, t):
            w, d, v, z = carry
            tf = t.astype(jnp.float32)
            c = rule.constants(lr=jnp.float32(LR), t=tf, beta1=jnp.float32(0.6), beta2=jnp.float32(0.999), eps=1e-8)
            c = rule.Constants(
                **{k: (x if k == "sign" or x is None else jnp.asarray(x, jnp.float32)) for k, x in c._asdict().items()}
            )
            return step(form, w, 2.0 * (w - target), d, v, z, c, jnp, jnp.clip), None

        zeros = jnp.zeros(3, jnp.float32)
        (w, *_), _ = jax.lax.scan(body, (zeros, zeros, zeros, zeros), jnp.arange(1, n + 1))
        return jnp.max(jnp.abs(w - target))

    return [float(run(n)) for n in STEPS]


if __name__ == "__main__":
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; max|w - w*| after {STEPS} steps, lr {LR}, float32")
    for target in TARGETS:
        for form in FORMS:
            a = ", ".join(f"{x:.2g}" for x in numpy_run(form, target))
            b = ", ".join(f"{x:.2g}" for x in jax_run(form, target))
            print(f"  w* = {target}  {form:22s}  NumPy: {a:24s}  jit: {b}")
