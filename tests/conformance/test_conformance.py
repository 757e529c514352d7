"""One conformance battery: every implementation of FTML against the rule, step by step, state included.

The reference is :mod:`ftmlopt.rule` evaluated in float64 on NumPy arrays. The rule itself is first
checked against the plain float64 formulas written in ``tests/conftest.py`` (which import nothing
from ftmlopt), so the battery is not circular.

Each implementation is driven through its public API for a few steps with a changing learning rate.
At every step the *implementation's own* previous weights and state (read back as float64) are fed
into one step of the rule, and the implementation's new weights and state must match that step
within the tolerance of the dtype. Comparing single steps from the same state keeps the float32 and
half-precision tolerances tight (no accumulated drift) and checks the state, not only the weights.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from ftmlopt import rule

pytestmark = pytest.mark.frameworks

BETA1, BETA2, EPS = 0.6, 0.999, 1e-8
#: a changing learning rate with a 0 in it: the two forms must agree through it, and lr 0 is "no
#: step" everywhere (the weights stay, v takes the gradient, the step is counted)
LRS = (0.1, 0.0, 0.03, 0.3, 0.05)
#: for the MXNet system, whose operator refuses lr 0 (MXNet 1.9.1's own check)
LRS_POSITIVE = (0.1, 0.03, 0.3, 0.05)
SHAPE = (3, 7)

#: option sets: name -> rule keyword arguments (weight_decay, decoupled, clip, maximize)
OPTIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "coupled_wd": {"weight_decay": 0.1},
    "decoupled_wd": {"weight_decay": 0.1, "decoupled": True},
    "clip": {"clip": 0.05},
    "maximize": {"maximize": True},
    "grad_scale": {"grad_scale": 0.5},
}

#: (rtol, atol) per compute precision of the implementation under test
TOL: dict[str, tuple[float, float]] = {
    "float64": (1e-12, 1e-14),
    "float32": (2e-5, 2e-6),
    "bfloat16": (1.6e-2, 1e-3),
    "float16": (2e-3, 1e-4),
}

State = dict[str, np.ndarray]


def rule_step(
    form: str,
    w: np.ndarray,
    g: np.ndarray,
    state: State,
    *,
    lr: float,
    t: int,
    opts: dict[str, Any],
    f32_hyper: bool = False,
    f32_lr: bool = False,
) -> tuple[np.ndarray, State]:
    """One step of the rule in float64 (the reference); ``f32_hyper`` rounds lr, betas, wd, clip to float32 first."""

    def r(x: float) -> float:
        return float(np.float32(x)) if f32_hyper else x

    opts = {k: (r(v) if isinstance(v, float) else v) for k, v in opts.items()}
    if f32_lr:
        lr = float(np.float32(lr))
    c = rule.constants(r(lr), t, r(BETA1), r(BETA2), EPS, **opts)
    if form == "compact":
        w1, v1 = rule.compact_step(w, g, state["v"], c, sqrt=np.sqrt, clip=np.clip)
        return w1, {"v": v1}
    w1, d1, v1, z1 = rule.mxnet_step(w, g, state["d"], state["v"], state["z"], c, sqrt=np.sqrt, clip=np.clip)
    return w1, {"d": d1, "v": v1, "z": z1}


def zero_state(form: str, shape: tuple[int, ...]) -> State:
    names = ("v",) if form == "compact" else ("d", "v", "z")
    return {n: np.zeros(shape) for n in names}


def _seed(*parts: str) -> int:
    """A seed that is the same in every process (``hash`` of a string is not)."""
    return zlib.crc32("/".join(parts).encode())


def problem(seed: int, steps: int = len(LRS)) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    w0 = rng.normal(size=SHAPE)
    grads = [rng.normal(size=SHAPE) * 10.0 ** rng.uniform(-2, 1, size=SHAPE) for _ in range(steps)]
    grads[1][0, :3] = 0.0  # zero gradients: no NaN, no drift
    return w0, grads


# ----------------------------------------------------------------------------- the rule itself
@pytest.mark.parametrize("opts", [{}, {"weight_decay": 0.1}, {"clip": 0.05}, {"weight_decay": 0.2, "clip": 0.5}])
def test_rule_matches_the_plain_formulas(ref, opts) -> None:
    """The rule's MXNet form against conftest's formula, and its compact form against Theorem 1."""
    w0, grads = problem(1, steps=len(LRS_POSITIVE))
    w, d, v, z = w0, *(np.zeros(SHAPE) for _ in range(3))
    wc, vc = w0, np.zeros(SHAPE)
    for t, (g, lr) in enumerate(zip(grads, LRS_POSITIVE), start=1):
        exp = ref.step_f64(
            w,
            g,
            d,
            v,
            z,
            lr=lr,
            t=t,
            beta1=BETA1,
            beta2=BETA2,
            epsilon=EPS,
            wd=opts.get("weight_decay", 0.0),
            clip=opts.get("clip"),
        )
        w_r, st = rule_step("mxnet", w, g, {"d": d, "v": v, "z": z}, lr=lr, t=t, opts=opts)
        np.testing.assert_allclose(w_r, exp[0], rtol=1e-13, atol=1e-15)
        for name, e in zip("dvz", exp[1:]):
            np.testing.assert_allclose(st[name], e, rtol=1e-13, atol=1e-15)
        w, d, v, z = exp
        # compact: the same g' and v_t, Theorem 1's closed form
        gp = wc * 0 + g + opts.get("weight_decay", 0.0) * wc
        if opts.get("clip") is not None:
            gp = np.clip(gp, -opts["clip"], opts["clip"])
        v_exp = BETA2 * vc + (1 - BETA2) * gp**2
        w_exp = ref.theorem1(wc, gp, v_exp, lr=lr, t=t, beta1=BETA1, beta2=BETA2, epsilon=EPS)
        wc_r, stc = rule_step("compact", wc, g, {"v": vc}, lr=lr, t=t, opts=opts)
        np.testing.assert_allclose(wc_r, w_exp, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(stc["v"], v_exp, rtol=1e-13, atol=1e-15)
        wc, vc = w_exp, v_exp
    # Theorem 1: both forms give the same weights through a changing learning rate
    np.testing.assert_allclose(wc, w, rtol=1e-9)


def test_rule_decoupled_decay_is_adamw_convention() -> None:
    """Decoupled decay multiplies w (and z) by 1 - lr*wd before the step; the forms still agree."""
    w0, grads = problem(2)
    opts = {"weight_decay": 0.3, "decoupled": True}
    w_m, st_m = w0, zero_state("mxnet", SHAPE)
    w_c, st_c = w0, zero_state("compact", SHAPE)
    for t, (g, lr) in enumerate(zip(grads, LRS), start=1):
        w_m, st_m = rule_step("mxnet", w_m, g, st_m, lr=lr, t=t, opts=opts)
        w_c, st_c = rule_step("compact", w_c, g, st_c, lr=lr, t=t, opts=opts)
    np.testing.assert_allclose(w_c, w_m, rtol=1e-9)
    # and a pure-decay step (zero gradient) is exactly the factor
    c = rule.constants(0.1, 1, BETA1, BETA2, EPS, **opts)
    w1, _ = rule.compact_step(w0, np.zeros(SHAPE), np.zeros(SHAPE), c, sqrt=np.sqrt, clip=np.clip)
    np.testing.assert_allclose(w1, w0 * (1 - 0.1 * 0.3), rtol=1e-15)


@pytest.mark.parametrize("form", ["compact", "mxnet"])
def test_rule_lr_zero_is_no_step(form) -> None:
    """lr 0: the weights stay, v takes the gradient (as Adam's moments do), d and z are kept."""
    w0, grads = problem(3)
    st = zero_state(form, SHAPE)
    w1, st1 = rule_step(form, w0, grads[0], st, lr=0.1, t=1, opts={})
    w2, st2 = rule_step(form, w1, grads[1], st1, lr=0.0, t=2, opts={})
    assert np.array_equal(w2, w1) and all(np.isfinite(a).all() for a in st2.values())
    np.testing.assert_allclose(st2["v"], BETA2 * st1["v"] + (1 - BETA2) * grads[1] ** 2, rtol=1e-15)
    if form == "mxnet":
        assert np.array_equal(st2["d"], st1["d"]) and np.array_equal(st2["z"], st1["z"])


def test_rule_forms_agree_through_a_warmup_from_zero() -> None:
    """Theorem 1 holds through lr 0 steps: both forms give the same weights afterwards."""
    w0, grads = problem(4, steps=6)
    lrs = (0.0, 0.0, 0.02, 0.05, 0.0, 0.1)
    w_m, st_m = w0, zero_state("mxnet", SHAPE)
    w_c, st_c = w0, zero_state("compact", SHAPE)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        w_m, st_m = rule_step("mxnet", w_m, g, st_m, lr=lr, t=t, opts={})
        w_c, st_c = rule_step("compact", w_c, g, st_c, lr=lr, t=t, opts={})
        np.testing.assert_allclose(w_c, w_m, rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------- implementations
@dataclass
class Impl:
    """How to drive one implementation: ``run(form, dtype, opts, w0, grads, lrs) -> [(w, state), ...]``."""

    name: str
    run: Callable[..., list[tuple[np.ndarray, State]]]
    forms: tuple[str, ...]
    dtypes: tuple[str, ...]
    options: tuple[str, ...]
    skip: set[tuple[str, str]] = field(default_factory=set)  # (form, option) pairs the API cannot express
    #: MXNet's operator receives float hyper-parameters as float32 (whatever the array dtype)
    float32_hyper: bool = False
    #: Keras keeps the learning rate in a float32 variable, whatever the parameter dtype
    float32_lr: bool = False
    #: the learning rates it is driven through
    lrs: tuple[float, ...] = LRS
    #: the dtype whose tolerance applies when it is not the parameter's (lower-precision state, float32 masters)
    tol_dtype: str | None = None


def _numpy_operator(kernel: str) -> Callable[..., list[tuple[np.ndarray, State]]]:
    def run(form, dtype, opts, w0, grads, lrs, monkeypatch):
        from ftmlopt import ftml_update

        if kernel == "numpy":
            monkeypatch.setenv("FTMLOPT_DISABLE_CPU_KERNELS", "1")
        else:
            monkeypatch.delenv("FTMLOPT_DISABLE_CPU_KERNELS", raising=False)
        dt = np.dtype(dtype)
        w = w0.astype(dt)
        d, v, z = (np.zeros_like(w) for _ in range(3))
        out = []
        for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
            clip = opts.get("clip")
            ftml_update(
                w,
                g.astype(dt),
                d,
                v,
                z,
                lr=lr,
                t=t,
                beta1=BETA1,
                beta2=BETA2,
                epsilon=EPS,
                wd=opts.get("weight_decay", 0.0),
                rescale_grad=opts.get("grad_scale", 1.0),
                clip_grad=-1.0 if clip is None else clip,
                out=w,
            )
            out.append(
                (
                    w.astype(np.float64),
                    {"d": d.astype(np.float64), "v": v.astype(np.float64), "z": z.astype(np.float64)},
                )
            )
        return out

    return run


def _mxnet_optimizer(multi_precision: bool) -> Callable[..., list[tuple[np.ndarray, State]]]:
    """The MXNet system's ``Optimizer`` class (``ftmlopt.mxnet.optimizer.FTML``), as MXNet's Updater drives it."""

    def run(form, dtype, opts, w0, grads, lrs, monkeypatch):
        from ftmlopt.mxnet.optimizer import FTML

        dt = np.dtype(dtype)
        opt = FTML(
            learning_rate=lrs[0],
            beta1=BETA1,
            beta2=BETA2,
            epsilon=EPS,
            wd=opts.get("weight_decay", 0.0),
            rescale_grad=opts.get("grad_scale", 1.0),
            clip_gradient=opts.get("clip"),
            multi_precision=multi_precision,
        )
        w = w0.astype(dt)
        state = opt.create_state_multi_precision(0, w)
        out = []
        for g, lr in zip(grads, lrs):
            opt.set_learning_rate(lr)
            opt.update_multi_precision(0, w, g.astype(dt), state)
            if multi_precision:  # (float32 master, (d, v, z)): the master is the weight the step computes
                master, (d, v, z) = state
            else:
                master, (d, v, z) = w, state
            out.append(
                (master.astype(np.float64), {n: a.astype(np.float64) for n, a in zip("dvz", (d, v, z))})
            )
        return out

    return run


def _torch_path(path: str, **extra: Any) -> Callable[..., list[tuple[np.ndarray, State]]]:
    """One torch path; ``extra`` adds FTML arguments (``state_dtype``, ``multi_precision``)."""

    def run(form, dtype, opts, w0, grads, lrs, monkeypatch):
        import torch

        from ftmlopt.torch import FTML

        tdt = getattr(torch, dtype)
        if isinstance(extra.get("state_dtype"), str):
            extra["state_dtype"] = getattr(torch, extra["state_dtype"])
        p = torch.nn.Parameter(torch.tensor(w0, dtype=tdt))
        flags = {"forloop": dict(foreach=False, fused=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[
            path
        ]
        opt = FTML(
            [p],
            lr=lrs[0],
            betas=(BETA1, BETA2),
            eps=EPS,
            weight_decay=opts.get("weight_decay", 0.0),
            decoupled_weight_decay=opts.get("decoupled", False),
            clip_gradient=opts.get("clip"),
            maximize=opts.get("maximize", False),
            compact=form == "compact",
            **flags,
            **extra,
        )
        if "grad_scale" in opts:  # torch's GradScaler protocol: the fused step divides by opt.grad_scale
            opt.grad_scale = torch.tensor(1.0 / opts["grad_scale"])
            opt.found_inf = torch.tensor(0.0)
        out = []
        for g, lr in zip(grads, lrs):
            opt.param_groups[0]["lr"] = lr
            p.grad = torch.tensor(g, dtype=tdt)
            opt.step()
            st = opt.state[p]
            names = ("v",) if form == "compact" else ("d", "v", "z")
            w = st["master"] if extra.get("multi_precision") else p
            out.append((w.detach().double().numpy().copy(), {n: st[n].detach().double().numpy().copy() for n in names}))
        return out

    return run


def _optax(direct: bool) -> Callable[..., list[tuple[np.ndarray, State]]]:
    def run(form, dtype, opts, w0, grads, lrs, monkeypatch):
        import jax
        import jax.numpy as jnp
        import optax

        from ftmlopt import optax as fo

        with jax.enable_x64(dtype == "float64"):
            jdt = getattr(jnp, dtype)
            table = jnp.asarray(lrs, dtype=jnp.float64 if dtype == "float64" else jnp.float32)
            kw = dict(
                learning_rate=lambda count: table[count],
                b1=BETA1,
                b2=BETA2,
                eps=EPS,
                weight_decay=opts.get("weight_decay", 0.0),
                clip_gradient=opts.get("clip"),
                compact=form == "compact",
            )
            if opts.get("decoupled"):
                kw["decoupled_weight_decay"] = True
            params = {"w": jnp.asarray(w0, dtype=jdt)}
            if direct:
                tx = fo.ftml_direct(**kw)
                state = tx.init(params)
                step = jax.jit(tx.step)
            else:
                tx = fo.ftml(**kw)
                state = tx.init(params)

                @jax.jit
                def step(g, s, p):
                    u, s = tx.update(g, s, p)
                    return optax.apply_updates(p, u), s

            out = []
            for g in grads:
                params, state = step({"w": jnp.asarray(g, dtype=jdt)}, state, params)
                names = ("v",) if form == "compact" else ("d", "v", "z")
                out.append(
                    (
                        np.asarray(params["w"], dtype=np.float64),
                        {n: np.asarray(getattr(state, n)["w"], dtype=np.float64) for n in names},
                    )
                )
            return out

    return run


#: Keras' cases (run by tests/keras in each backend's own process, with :func:`check_run`)
KERAS_DTYPES = ("float64", "float32", "bfloat16", "float16")
KERAS_OPTS = ("plain", "coupled_wd", "decoupled_wd", "clip")


def _triton_interpreted(form, dtype, opts, w0, grads, lrs, monkeypatch):
    """The CUDA kernel run by Triton's interpreter on CPU tensors (the env var is read when it is built)."""
    import torch

    from ftmlopt.kernels import triton_cuda

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    tdt = getattr(torch, dtype)
    sdt = torch.float32 if dtype in ("bfloat16", "float16") else tdt  # rule.state_dtype
    w = torch.tensor(w0, dtype=tdt)
    names = ("v",) if form == "compact" else ("d", "v", "z")
    state = {n: torch.zeros(w.shape, dtype=sdt) for n in names}
    step = torch.zeros((), dtype=torch.float32)
    out = []
    for g, lr in zip(grads, lrs):
        lists = [[w], [torch.tensor(g, dtype=tdt)], *([state[n]] for n in ("d", "v", "z") if n in state)]
        triton_cuda.multi_tensor_step(
            lists,
            [step],
            grad_scale=None,
            found_inf=None,
            lr=lr,
            beta1=BETA1,
            beta2=BETA2,
            eps=EPS,
            weight_decay=opts.get("weight_decay", 0.0),
            clip_gradient=opts.get("clip"),
            decoupled_weight_decay=opts.get("decoupled", False),
            compact=form == "compact",
            maximize=opts.get("maximize", False),
        )
        out.append((w.double().numpy().copy(), {n: state[n].double().numpy().copy() for n in names}))
    return out


ALL_OPTS = tuple(o for o in OPTIONS if o != "grad_scale")
OPERATOR_OPTS = ("plain", "coupled_wd", "clip", "grad_scale")  # MXNet's operator: L2, clip, rescale_grad
HALF = ("float16", "bfloat16")
TORCH_DTYPES = ("float64", "float32", "bfloat16", "float16")
IMPLS = [
    *(
        Impl(
            f"ftml_update[{k}]",
            _numpy_operator(k),
            ("mxnet",),
            ("float64", "float32", "float16"),
            OPERATOR_OPTS,
            float32_hyper=True,
            lrs=LRS_POSITIVE,
        )
        for k in ("numpy", "default")
    ),
    Impl(
        "mxnet.optimizer.FTML",
        _mxnet_optimizer(multi_precision=False),
        ("mxnet",),
        ("float64", "float32", "float16"),
        OPERATOR_OPTS,
        float32_hyper=True,
        lrs=LRS_POSITIVE,
    ),
    Impl(
        "mxnet.optimizer.FTML[multi_precision]",
        _mxnet_optimizer(multi_precision=True),
        ("mxnet",),
        ("float16",),
        OPERATOR_OPTS,
        float32_hyper=True,
        lrs=LRS_POSITIVE,
        tol_dtype="float32",
    ),
    *(
        Impl(f"torch[{path}]", _torch_path(path), ("compact", "mxnet"), TORCH_DTYPES, ALL_OPTS)
        for path in ("forloop", "foreach", "fused")
    ),
    # torch's GradScaler protocol (grad_scale / found_inf) is the fused path's
    Impl("torch[fused,grad_scale]", _torch_path("fused"), ("compact", "mxnet"), TORCH_DTYPES, ("grad_scale",)),
    *(
        Impl(
            f"torch[{path},state_dtype={sd}]",
            _torch_path(path, state_dtype=sd),
            ("compact", "mxnet"),
            ("float32", "bfloat16") if sd == "float64" else ("float32",),
            ("plain", "decoupled_wd"),
            # the state's rounding bounds the agreement when it is the coarser of the two
            tol_dtype=None if sd == "float64" else "bfloat16",
        )
        for path in ("forloop", "foreach", "fused")
        for sd in ("float64", "bfloat16")
    ),
    *(
        Impl(
            f"torch[{path},multi_precision]",
            _torch_path(path, multi_precision=True),
            ("compact", "mxnet"),
            HALF,
            ("plain", "coupled_wd", "clip"),
            tol_dtype="float32",  # the float32 master is what the step computes
        )
        for path in ("forloop", "foreach", "fused")
    ),
    Impl(
        "triton[interpreter]", _triton_interpreted, ("compact", "mxnet"), ("float64", "float32", "bfloat16"), ALL_OPTS
    ),
    Impl(
        "optax.ftml",
        _optax(direct=False),
        ("compact", "mxnet"),
        ("float64", "float32", "bfloat16"),
        ("plain", "coupled_wd", "decoupled_wd", "clip"),
    ),
    Impl(
        "optax.ftml_direct",
        _optax(direct=True),
        ("compact", "mxnet"),
        ("float64", "float32", "bfloat16"),
        ("plain", "coupled_wd", "decoupled_wd", "clip"),
    ),
]

CASES = [
    pytest.param(impl, form, dtype, opt, id=f"{impl.name}-{form}-{dtype}-{opt}")
    for impl in IMPLS
    for form, dtype, opt in itertools.product(impl.forms, impl.dtypes, impl.options)
    if (form, opt) not in impl.skip
]


def _tolerance(dtype: str, form: str) -> tuple[float, float]:
    rtol, atol = TOL[dtype]
    if form == "mxnet" and dtype != "float64":
        # w = -z/d: z_t subtracts (d_t - beta1 d) w from beta1 z + (1 - beta1) g', so a rounding of
        # the stored d or z is amplified by |w d / z| (about 1/lr). Loosen by that factor's order.
        rtol, atol = rtol * 20, atol * 20
    return rtol, atol


@pytest.mark.parametrize(("impl", "form", "dtype", "opt"), CASES)
def test_matches_the_rule_every_step(impl: Impl, form: str, dtype: str, opt: str, monkeypatch) -> None:
    opts = OPTIONS[opt]
    w0, grads = problem(_seed(impl.name, form, dtype, opt), steps=len(impl.lrs))
    results = impl.run(form, dtype, opts, w0, grads, impl.lrs, monkeypatch)
    check_run(
        impl.name,
        results,
        form=form,
        dtype=dtype,
        opts=opts,
        w0=w0,
        grads=grads,
        lrs=impl.lrs,
        f32_hyper=impl.float32_hyper,
        f32_lr=impl.float32_lr,
        tol_dtype=impl.tol_dtype,
    )


def check_run(
    name: str,
    results: list[tuple[np.ndarray, State]],
    *,
    form: str,
    dtype: str,
    opts: dict[str, Any],
    w0: np.ndarray,
    grads: list[np.ndarray],
    lrs: tuple[float, ...],
    f32_hyper: bool = False,
    f32_lr: bool = False,
    tol_dtype: str | None = None,
) -> None:
    """Each step of ``results`` (weights, state) against one step of the rule from the previous ones."""
    assert len(results) == len(lrs)
    rtol, atol = _tolerance(tol_dtype or dtype, form)
    # the implementation's starting point, as it stored it (half params are rounded on the way in)
    w_prev = _as_dtype(w0, dtype)
    st_prev = zero_state(form, SHAPE)
    for t, ((w_got, st_got), g, lr) in enumerate(zip(results, grads, lrs), start=1):
        g_in = _as_dtype(g, dtype)
        w_exp, st_exp = rule_step(
            form, w_prev, g_in, st_prev, lr=lr, t=t, opts=opts, f32_hyper=f32_hyper, f32_lr=f32_lr
        )
        assert set(st_got) == set(st_exp), f"state names {sorted(st_got)} at step {t}"
        for state_name in st_exp:
            _close(st_got[state_name], st_exp[state_name], rtol, atol, f"{name} state {state_name} at step {t}")
        _close(w_got, w_exp, rtol, atol, f"{name} weight at step {t}")
        assert np.isfinite(w_got).all()
        w_prev, st_prev = w_got, st_got


def _as_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        import ml_dtypes

        return x.astype(ml_dtypes.bfloat16).astype(np.float64)
    return x.astype(np.dtype(dtype)).astype(np.float64)


def _close(got: np.ndarray, exp: np.ndarray, rtol: float, atol: float, what: str) -> None:
    scale = atol * max(1.0, float(np.max(np.abs(exp))))
    np.testing.assert_allclose(got, exp, rtol=rtol, atol=scale, err_msg=what)
