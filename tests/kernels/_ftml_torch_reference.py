"""A readable, per-tensor FTML step with torch semantics, used to check the fused kernels.

Written here, independently of the code under test: float64 math, one tensor at a time, the
results rounded to each tensor's own dtype when stored.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ftmlopt.torch._fused import _fused_ftml


def reference_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict[str, Any]],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    clip_gradient: float | None,
    decoupled_weight_decay: bool,
    compact: bool,
    maximize: bool,
    grad_scale: float | None = None,
) -> None:
    """One step, in place; ``states[i]`` holds ``step`` and ``v`` (and ``d``, ``z`` unless compact)."""
    for p, g, st in zip(params, grads, states):
        st["step"] += 1
        t = float(st["step"])
        w = p.double()
        gr = g.double()
        if grad_scale is not None:
            gr = gr / grad_scale
            g.copy_(gr)  # the unscaled gradient is written back, as torch's fused Adam does
        if maximize:
            gr = -gr
        z = None if compact else st["z"].double()
        if weight_decay != 0:
            if decoupled_weight_decay:
                w = w * (1 - lr * weight_decay)
                if z is not None:
                    z = z * (1 - lr * weight_decay)
            else:
                gr = gr + weight_decay * w
        if clip_gradient is not None:
            gr = gr.clamp(-clip_gradient, clip_gradient)
        v = beta2 * st["v"].double() + (1 - beta2) * gr * gr
        root = torch.sqrt(v / (1 - beta2**t)) + eps
        if compact:
            w = w - lr * (1 - beta1) / (1 - beta1**t) * gr / root
        else:
            d_t = (1 - beta1**t) / lr * root
            z = beta1 * z + (1 - beta1) * gr - (d_t - beta1 * st["d"].double()) * w
            w = -z / d_t
            st["d"].copy_(d_t)
            st["z"].copy_(z)
        st["v"].copy_(v)
        p.copy_(w)
    assert math.isfinite(lr)



HYPER = dict(lr=0.05, beta1=0.6, beta2=0.999, eps=1e-8)
OPTIONS = [
    dict(weight_decay=0.0, clip_gradient=None, decoupled_weight_decay=False, maximize=False),
    dict(weight_decay=0.01, clip_gradient=0.5, decoupled_weight_decay=False, maximize=False),
    dict(weight_decay=0.1, clip_gradient=None, decoupled_weight_decay=True, maximize=True),
    dict(weight_decay=0.0, clip_gradient=1e-3, decoupled_weight_decay=False, maximize=True),  # clips nearly all
]
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=1e-6),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
}
SHAPES = [(), (0,), (1,), (7,), (3, 5), (40_001,)]  # 40,001 > one 32,768-element chunk


def _make(shapes, dtype, state_dtype, gen, *, transpose_every=0):
    """params and zero state; every ``transpose_every``-th 2-d param is a non-contiguous view."""
    params = []
    for i, shape in enumerate(shapes):
        p = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        if transpose_every and len(shape) == 2 and i % transpose_every == 0:
            p = p.t().contiguous().t()  # same shape, column-major: not contiguous
        params.append(p)
    return params


class Pair:
    """The fused side and the reference side, with identical starting values."""

    def __init__(self, params, *, compact: bool, state_dtype=None, fused=_fused_ftml):
        self.compact = compact
        self.fused = fused
        self.fused_p = [p.clone() if p.is_contiguous() else p.t().clone().t() for p in params]
        self.ref_p = [p.clone() for p in params]
        sd = (lambda p: {"dtype": state_dtype}) if state_dtype else (lambda p: {})
        self.steps = [torch.zeros((), dtype=torch.float32) for _ in params]
        self.vs = [torch.zeros_like(p, **sd(p)) for p in self.fused_p]
        self.ds = [] if compact else [torch.zeros_like(p, **sd(p)) for p in self.fused_p]
        self.zs = [] if compact else [torch.zeros_like(p, **sd(p)) for p in self.fused_p]
        self.ref_states = []
        for p in self.ref_p:
            st = {"step": 0, "v": torch.zeros_like(p, **sd(p))}
            if not compact:
                st.update(d=torch.zeros_like(p, **sd(p)), z=torch.zeros_like(p, **sd(p)))
            self.ref_states.append(st)

    def step(self, grads, idx=None, *, grad_scale=None, found_inf=None, **kw):
        idx = list(range(len(self.fused_p))) if idx is None else idx
        fg = [grads[i].clone() for i in idx]
        rg = [grads[i].clone() for i in idx]
        def pick(lst):
            return [lst[i] for i in idx]

        self.fused(
            pick(self.fused_p), fg, [] if self.compact else pick(self.ds), pick(self.vs),
            [] if self.compact else pick(self.zs), pick(self.steps),
            grad_scale=None if grad_scale is None else torch.tensor(grad_scale), found_inf=found_inf,
            compact=self.compact, has_complex=False, capturable=False, differentiable=False, **kw,
        )
        if found_inf is None or float(found_inf) == 0:
            reference_step([self.ref_p[i] for i in idx], rg, [self.ref_states[i] for i in idx],
                           compact=self.compact, grad_scale=grad_scale, **kw)
        return fg, rg

    def check(self, dtype, msg=""):
        tol = TOL[dtype]
        for i, (fp, rp) in enumerate(zip(self.fused_p, self.ref_p)):
            st = self.ref_states[i]
            assert float(self.steps[i]) == st["step"], (msg, i)
            assert fp.dtype == rp.dtype and fp.shape == rp.shape
            torch.testing.assert_close(fp, rp, **tol, msg=lambda m, i=i: f"{msg} param {i}: {m}")
            torch.testing.assert_close(self.vs[i], st["v"], **tol, msg=lambda m, i=i: f"{msg} v {i}: {m}")
            if not self.compact:
                torch.testing.assert_close(self.ds[i], st["d"], **tol, msg=lambda m, i=i: f"{msg} d {i}: {m}")
                torch.testing.assert_close(self.zs[i], st["z"], **tol, msg=lambda m, i=i: f"{msg} z {i}: {m}")


def _grads(params, gen, scale=1.0):
    return [(torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale).to(p.dtype) for p in params]
