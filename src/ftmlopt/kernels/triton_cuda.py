r"""The CUDA FTML kernel in Triton: one launch per (device, dtype) group, all tensors at once.

Multi-tensor design (as torch's ``_fused_adam_`` and apex): the host builds, once per list of
tensors (cached by address), a device table with the address and size of every w, g, d, v, z
and step tensor, and a list of chunk descriptors (tensor index, first element). Each Triton
program takes one chunk of ``CHUNK`` elements. Nothing about a step is read on the host:

* the step counters are incremented on the device (``torch._foreach_add_``) and each program
  reads its tensor's step; ``lr`` is a device tensor; the bias corrections
  ``1 - beta^t`` are computed per program in float64;
* ``found_inf`` (when given) masks every load and store, and the step increment is reverted
  afterwards (``_foreach_sub_``), so a skipped step changes nothing;
* the arithmetic runs in float32 (float64 for float64 tensors), fp16/bf16 are loaded and
  stored in their own precision. The rule is :mod:`ftmlopt.rule`'s (as in :mod:`ftmlopt.kernels.cpu`):
  the wrapper takes the step-independent constants from :func:`ftmlopt.rule.constants`, and the
  kernel derives the lr- and step-dependent ones (``1 - beta^t``, ``step_size``, ``d_scale``,
  ``1 - lr wd``) from the device's lr and step with the same formulas.

With a fixed set of tensors the launch is capturable in a CUDA graph (the tables are built
before capture and reused). The launch goes through ``torch.library.triton_op``
(``ftmlopt::ftml_multi_tensor_``), so ``torch.compile`` sees a registered op with declared
mutations; building the address tables reads ``data_ptr()`` and therefore runs eagerly.

On a machine without a GPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``)
on CPU tensors, which is how the test suite checks it.

Example:
    >>> from ftmlopt.kernels import triton_cuda
    >>> isinstance(triton_cuda.AVAILABLE, bool)
    True
"""

import importlib.util
import math
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from ftmlopt import rule

if TYPE_CHECKING:
    from torch import Tensor

# No `from __future__ import annotations` here: triton_op reads the op's annotations at runtime.

__all__ = ["AVAILABLE", "BLOCK", "CHUNK", "compile_ptx", "multi_tensor_step"]

AVAILABLE: bool = importlib.util.find_spec("triton") is not None

#: elements per Triton program (one chunk of one tensor) and per vector block inside it
CHUNK = 4096
BLOCK = 1024
_TABLES: OrderedDict[Any, Any] = OrderedDict()  # address tables by tensor addresses (small LRU)
_TABLES_MAX = 16
_STATE: dict[str, Any] = {}


def _build() -> dict[str, Any]:
    """Define the kernel and register the op (first use only: triton and torch load lazily)."""
    if _STATE:
        return _STATE
    import torch
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def ftml_block(  # type: ignore[no-untyped-def]
        w_ptr, g_ptr, d_ptr, v_ptr, z_ptr, offs, n, coef, bias2, eps, wd, clip, decay, b1m, omb1, b2m, omb2, scale,
        live, COMPACT: tl.constexpr, MAXIMIZE: tl.constexpr, COUPLED_WD: tl.constexpr, DECOUPLED_WD: tl.constexpr,
        HAS_CLIP: tl.constexpr, HAS_SCALE: tl.constexpr, MT: tl.constexpr, MASKED: tl.constexpr,
    ):
        """The FTML rule on one block of elements (loads in storage precision, math in ``MT``)."""
        m = offs < n if MASKED else None
        g = tl.load(g_ptr + offs, mask=m).to(MT)
        if HAS_SCALE:
            g = g / scale
            tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=m)
        if MAXIMIZE:
            g = -g
        w = tl.load(w_ptr + offs, mask=m).to(MT)
        if DECOUPLED_WD:
            w = w * decay
        if COUPLED_WD:
            g = g + wd * w
        if HAS_CLIP:  # NaN passes through, as in torch.clamp
            g = tl.where(g > clip, clip, g)
            g = tl.where(g < -clip, -clip, g)
        v = b2m * tl.load(v_ptr + offs, mask=m).to(MT) + omb2 * (g * g)
        tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=m)
        if COMPACT:  # the compact rule: sqrt(v) * bias2_rsqrt + eps (``bias2`` holds bias2_rsqrt here)
            root = tl.sqrt(v) * bias2 + eps
        else:
            root = tl.sqrt(v / bias2) + eps
        if COMPACT:
            w = w - coef * g / root
        else:
            # ``live`` is lr != 0: at lr 0 the MXNet form keeps d and z (d_t would be infinite) and
            # the weight stays; only v takes the gradient (rule.mxnet_step's convention)
            z0 = tl.load(z_ptr + offs, mask=m).to(MT)
            d0 = tl.load(d_ptr + offs, mask=m).to(MT)
            z = z0
            if DECOUPLED_WD:
                z = z * decay
            d_t = coef * root
            z = b1m * z + omb1 * g - (d_t - b1m * d0) * w
            z = tl.where(live, z, z0)
            d_t = tl.where(live, d_t, d0)
            tl.store(z_ptr + offs, z.to(z_ptr.dtype.element_ty), mask=m)
            tl.store(d_ptr + offs, d_t.to(d_ptr.dtype.element_ty), mask=m)
            w = tl.where(live, -z / d_t, w)
        tl.store(w_ptr + offs, w.to(w_ptr.dtype.element_ty), mask=m)

    # Triton's interpreter resolves callees through the module's globals (not closures).
    globals()["ftml_block"] = ftml_block

    @triton.jit
    def ftml_kernel(  # type: ignore[no-untyped-def]
        table, sizes, chunk_tensor, chunk_start, n_tensors, lr_ptr, found_inf_ptr, scale_ptr, hyper,
        p_like, s_like, step_like,
        COMPACT: tl.constexpr, MAXIMIZE: tl.constexpr, COUPLED_WD: tl.constexpr, DECOUPLED_WD: tl.constexpr,
        HAS_CLIP: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, MT: tl.constexpr,
        ALIGNED: tl.constexpr,
        CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    ):
        c = tl.program_id(0)
        i = tl.load(chunk_tensor + c)
        lo = tl.multiple_of(tl.load(chunk_start + c), CHUNK)
        n = tl.load(sizes + i)
        w_ptr = tl.load(table + i).to(p_like.dtype)
        g_ptr = tl.load(table + n_tensors + i).to(p_like.dtype)
        v_ptr = tl.load(table + 3 * n_tensors + i).to(s_like.dtype)
        step_ptr = tl.load(table + 5 * n_tensors + i).to(step_like.dtype)
        if ALIGNED:  # every address is 16-byte aligned (checked on the host): vector loads
            w_ptr = tl.multiple_of(w_ptr, 16)
            g_ptr = tl.multiple_of(g_ptr, 16)
            v_ptr = tl.multiple_of(v_ptr, 16)
        # float64 scalars from rule.constants (see multi_tensor_step): hyper = (beta1, 1 - beta1, beta2,
        # 1 - beta2, eps, wd, clip, ln beta1, ln beta2). What depends on the device's lr and step is
        # derived here with rule.constants' formulas (reading them on the host would sync).
        t = tl.load(step_ptr).to(tl.float64)
        lr = tl.load(lr_ptr).to(tl.float64)
        omb1_64 = tl.load(hyper + 1)
        c1 = 1.0 - tl.exp(t * tl.load(hyper + 7))  # bias1 = 1 - beta1**t
        c2 = 1.0 - tl.exp(t * tl.load(hyper + 8))  # bias2 = 1 - beta2**t
        mt: tl.constexpr = MT  # the math type: float32, or float64 for float64 tensors
        if COMPACT:
            coef = (lr * omb1_64 / c1).to(mt)  # step_size
        else:
            coef = (c1 / lr).to(mt)  # d_scale
        if COMPACT:
            bias2 = (1.0 / tl.sqrt(c2)).to(mt)  # bias2_rsqrt
        else:
            bias2 = c2.to(mt)
        eps = tl.load(hyper + 4).to(mt)
        wd = tl.load(hyper + 5).to(mt)
        clip = tl.load(hyper + 6).to(mt)
        decay = (1.0 - lr * tl.load(hyper + 5)).to(mt)
        b1m = tl.load(hyper).to(mt)
        omb1 = omb1_64.to(mt)
        b2m = tl.load(hyper + 2).to(mt)
        omb2 = tl.load(hyper + 3).to(mt)
        d_ptr = w_ptr
        z_ptr = w_ptr
        if not COMPACT:
            d_ptr = tl.load(table + 2 * n_tensors + i).to(s_like.dtype)
            z_ptr = tl.load(table + 4 * n_tensors + i).to(s_like.dtype)
            if ALIGNED:
                d_ptr = tl.multiple_of(d_ptr, 16)
                z_ptr = tl.multiple_of(z_ptr, 16)
        if HAS_FOUND_INF:  # a non-finite gradient somewhere: touch nothing
            n = tl.where(tl.load(found_inf_ptr) == 0, n, 0)
        scale = tl.load(scale_ptr).to(mt) if HAS_SCALE else 1.0
        live = lr != 0.0
        if lo + CHUNK <= n:  # a full chunk: no masks, so the loads can be vectorized
            for off in tl.range(0, CHUNK, BLOCK):
                ftml_block(w_ptr, g_ptr, d_ptr, v_ptr, z_ptr, lo + off + tl.arange(0, BLOCK), n,
                           coef, bias2, eps, wd, clip, decay, b1m, omb1, b2m, omb2, scale, live,
                           COMPACT, MAXIMIZE, COUPLED_WD, DECOUPLED_WD, HAS_CLIP, HAS_SCALE, MT, False)
        else:
            for off in tl.range(0, CHUNK, BLOCK):
                ftml_block(w_ptr, g_ptr, d_ptr, v_ptr, z_ptr, lo + off + tl.arange(0, BLOCK), n,
                           coef, bias2, eps, wd, clip, decay, b1m, omb1, b2m, omb2, scale, live,
                           COMPACT, MAXIMIZE, COUPLED_WD, DECOUPLED_WD, HAS_CLIP, HAS_SCALE, MT, True)

    @triton_op("ftmlopt::ftml_multi_tensor_", mutates_args={"params", "grads", "ds", "vs", "zs"})
    def ftml_multi_tensor_(
        params: list[torch.Tensor], grads: list[torch.Tensor], ds: list[torch.Tensor], vs: list[torch.Tensor],
        zs: list[torch.Tensor], table: torch.Tensor, sizes: torch.Tensor, chunk_tensor: torch.Tensor,
        chunk_start: torch.Tensor, lr: torch.Tensor, found_inf: torch.Tensor | None,
        grad_scale: torch.Tensor | None, hyper: torch.Tensor, p_like: torch.Tensor, s_like: torch.Tensor,
        step_like: torch.Tensor, flags: list[bool],
    ) -> None:
        """Mutates the listed tensors through the addresses in ``table`` (one launch)."""
        compact, maximize, coupled, decoupled, has_clip, aligned = flags
        if chunk_tensor.numel() == 0:
            return
        wrap_triton(ftml_kernel)[(chunk_tensor.numel(),)](
            table, sizes, chunk_tensor, chunk_start, sizes.numel(), lr,
            found_inf if found_inf is not None else lr, grad_scale if grad_scale is not None else lr, hyper,
            p_like, s_like, step_like,
            COMPACT=compact, MAXIMIZE=maximize, COUPLED_WD=coupled, DECOUPLED_WD=decoupled, HAS_CLIP=has_clip,
            HAS_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
            MT=tl.float64 if p_like.dtype == torch.float64 else tl.float32, ALIGNED=aligned, CHUNK=CHUNK, BLOCK=BLOCK,
        )

    _STATE.update(op=ftml_multi_tensor_, kernel=ftml_kernel)
    return _STATE


def compile_ptx(arch: int = 90, param_dtype: str = "fp32", state_dtype: str = "fp32", **flags: bool) -> str:
    """Compile the kernel ahead of time for ``sm_<arch>`` and return its PTX (no GPU needed).

    ``flags`` override the constexpr switches (``COMPACT``, ``MAXIMIZE``, ``COUPLED_WD``,
    ``DECOUPLED_WD``, ``HAS_CLIP``, ``HAS_SCALE``, ``HAS_FOUND_INF``, ``ALIGNED``; all False by
    default). Useful to inspect the generated code, e.g. that aligned full chunks use 128-bit
    loads (``ld.global.v4``), and to check that the kernel compiles on a machine without a GPU.

    Example:
        >>> from ftmlopt.kernels import triton_cuda
        >>> ptx = triton_cuda.compile_ptx(ALIGNED=True)  # doctest: +SKIP
        >>> "ld.global.v4" in ptx  # doctest: +SKIP
        True
    """
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = _build()["kernel"]
    pointers = dict(table="*i64", sizes="*i64", chunk_tensor="*i64", chunk_start="*i64", n_tensors="i32",
                    lr_ptr="*fp64", found_inf_ptr="*fp32", scale_ptr="*fp32", hyper="*fp64",
                    p_like=f"*{param_dtype}", s_like=f"*{state_dtype}", step_like="*fp32")
    switches = dict.fromkeys(("COMPACT", "MAXIMIZE", "COUPLED_WD", "DECOUPLED_WD", "HAS_CLIP", "HAS_SCALE",
                              "HAS_FOUND_INF", "ALIGNED"), False)
    switches.update(flags)
    consts = {**switches, "MT": tl.float64 if param_dtype == "fp64" else tl.float32, "CHUNK": CHUNK, "BLOCK": BLOCK}
    source = ASTSource(fn=kernel, signature={**pointers, **dict.fromkeys(consts, "constexpr")}, constexprs=consts)
    return str(triton.compile(source, target=GPUTarget("cuda", arch, 32)).asm["ptx"])


def _tables(rows: "list[list[Tensor | None]]", device: Any) -> "tuple[Tensor, Tensor, Tensor, Tensor, bool]":
    """Device address table, sizes, chunk descriptors and 16-byte alignment, cached by address."""
    import torch

    key = (device, tuple(tuple(t.data_ptr() if t is not None else 0 for t in row) for row in rows),
           tuple(t.numel() if t is not None else 0 for t in rows[0]))
    hit: Any = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit  # type: ignore[no-any-return]
    sizes = list(key[2])
    owner, start = [], []
    for i, n in enumerate(sizes):
        for s in range(0, n, CHUNK):
            owner.append(i)
            start.append(s)
    as_dev = lambda x: torch.tensor(x, dtype=torch.int64, device=device)  # noqa: E731
    aligned = all(a % 16 == 0 for row in key[1] for a in row)
    out = (as_dev([list(r) for r in key[1]]), as_dev(sizes), as_dev(owner), as_dev(start), aligned)
    _TABLES[key] = out
    if len(_TABLES) > _TABLES_MAX:
        _TABLES.popitem(last=False)
    return out


def _hyper(device: Any, *values: float) -> "Tensor":
    """``values`` as a float64 device tensor, cached by value (built before a CUDA graph capture, reused in it)."""
    import torch

    key = ("hyper", device, *map(float, values))
    hit: Any = _TABLES.get(key)
    if hit is None:
        hit = torch.tensor([float(x) for x in values], dtype=torch.float64).to(device)
        _TABLES[key] = hit
        if len(_TABLES) > _TABLES_MAX:
            _TABLES.popitem(last=False)
    out: Tensor = hit
    return out


def multi_tensor_step(
    lists: "list[list[Tensor]]", steps: "list[Tensor]", opts: Any, *, grad_scale: "Tensor | None",
    found_inf: "Tensor | None",
) -> None:
    r"""One fused FTML step for a (device, dtype) group of tensors: one Triton launch.

    ``lists`` is ``[params, grads, ds, vs, zs]`` (``[params, grads, vs]`` when ``compact``),
    all on one device; ``steps`` are float32 step counters on that device (incremented here).
    ``opts`` holds the hyper-parameters by name (``lr``, ``beta1``, ``beta2``, ``eps``,
    ``weight_decay``, ``clip_gradient``, ``decoupled_weight_decay``, ``compact``, ``maximize``):
    the torch front end's ``StepOptions``, which this layer does not import. The rule is
    :func:`ftmlopt.torch._fused._fused_ftml`'s. Non-contiguous tensors are stepped on contiguous
    copies that are written back.

    Example:
        >>> import torch
        >>> from ftmlopt.kernels import triton_cuda
        >>> w, g = torch.ones(3), torch.full((3,), 0.5)  # doctest: +SKIP
        >>> v, step = torch.zeros(3), torch.zeros(())  # doctest: +SKIP
        >>> from ftmlopt.torch._constants import StepOptions  # doctest: +SKIP
        >>> opts = StepOptions(lr=0.1, beta1=0.6, beta2=0.999, eps=1e-8, weight_decay=0.0, clip_gradient=None,
        ...                    decoupled_weight_decay=False, compact=True, maximize=False)  # doctest: +SKIP
        >>> triton_cuda.multi_tensor_step([[w], [g], [v]], [step], opts, grad_scale=None,
        ...                               found_inf=None)  # doctest: +SKIP
    """
    import torch

    if not AVAILABLE:
        raise RuntimeError("FTML(fused=True) on CUDA needs triton: pip install 'ftmlopt[triton]'")
    lr, weight_decay, compact = opts.lr, opts.weight_decay, opts.compact
    state = _build()
    device = lists[0][0].device
    p_dtype = lists[0][0].dtype
    s_dtype = lists[2][0].dtype if compact else lists[3][0].dtype
    # Contiguous, uniformly typed tensors are used in place; the rest go through copies.
    staged = []
    work = [list(lst) for lst in lists]
    for pos, lst in enumerate(work):
        want = p_dtype if pos < 2 else s_dtype
        for i, t in enumerate(lst):
            if t.dtype != want or not t.is_contiguous():
                copy = torch.empty(t.shape, dtype=want, device=device).copy_(t)
                staged.append((t, copy, pos != 1 or grad_scale is not None))
                lst[i] = copy
    if any(s.dtype != torch.float32 or s.device != device for s in steps):
        raise RuntimeError("fused FTML on CUDA needs float32 step tensors on the parameters' device")
    none: list[Tensor | None] = [None] * len(work[0])
    rows: list[list[Tensor | None]]
    if compact:
        w, g, v = work
        ds: list[Tensor] = []
        zs: list[Tensor] = []
        rows = [[*w], [*g], none, [*v], none, [*steps]]
    else:
        w, g, ds, v, zs = work
        rows = [[*w], [*g], [*ds], [*v], [*zs], [*steps]]
    table, sizes, chunk_tensor, chunk_start, aligned = _tables(rows, device)
    # A float lr becomes a cached device scalar: created on the first (warm-up) step, reused while a
    # CUDA graph is captured (no host-to-device copy inside the capture), as torch bakes a float lr.
    lr_t = lr.to(device=device, dtype=torch.float64) if isinstance(lr, torch.Tensor) else _hyper(device, lr)
    # The step-independent constants come from the rule (float64); lr and t live on the device, so
    # the placeholders lr=1, t=1 only stand in for them and nothing derived from them is used here.
    c = rule.constants(1.0, 1, opts.beta1, opts.beta2, opts.eps, weight_decay=weight_decay,
                       decoupled=opts.decoupled_weight_decay, clip=opts.clip_gradient, maximize=opts.maximize)
    hyper = _hyper(device, c.beta1, c.one_minus_beta1, c.beta2, c.one_minus_beta2, c.eps, weight_decay,
                   math.inf if c.clip is None else c.clip,
                   *(math.log(b) if b > 0 else -math.inf for b in (c.beta1, c.beta2)))
    likes = [torch.empty(0, dtype=dt, device=device) for dt in (p_dtype, s_dtype, torch.float32)]
    if found_inf is None:
        torch._foreach_add_(steps, 1)
    else:  # a skipped step is not counted: add (found_inf == 0), on the device, no host sync
        inc = (found_inf.to(device) == 0).to(torch.float32)
        torch._foreach_add_(steps, [inc] * len(steps))
    state["op"](
        w, g, ds, v, zs, table, sizes, chunk_tensor, chunk_start, lr_t,
        None if found_inf is None else found_inf.to(device), None if grad_scale is None else grad_scale.to(device),
        hyper, *likes,
        [compact, c.sign < 0, c.wd is not None, c.decay is not None, c.clip is not None, aligned],
    )
    for original, copy, write_back in staged:
        if write_back:
            original.copy_(copy)
    torch.autograd.graph.increment_version([t for lst in lists for t in lst])
