r"""The fused low-bit FTML step in Triton (CUDA): 8-bit (E4M4) or 4-bit (E3M1) ``v``, one launch per group.

The same step as :mod:`ftmlopt.kernels.cpu_lowbit` (the per-element lines are there), written for
a GPU: each program takes :data:`BLOCKS` quantization blocks of 128 elements of one tensor (the
tensors of a group share one launch through a device table of addresses, as in
:mod:`ftmlopt.kernels.triton_cuda`), loads ``w``, ``g``, the codes and the block scales once,
decodes ``v`` in registers, updates, writes ``w``, reduces each block's maximum of ``u = sqrt(v)``
across the tile, and writes the codes and the new scales. 4-bit codes are handled as an even and
an odd half-tile, so a byte is read, and written, whole.

Bit-exactness: the divisions and square roots are the correctly rounded ones (``tl.div_rn``,
``tl.sqrt_rn``; Triton's ``/`` and ``tl.sqrt`` are approximate on CUDA) and the launch asks for no
FMA contraction (``enable_fp_fusion=False``), so a float32 step performs the reference's operations
(:func:`ftmlopt.lowbit.compact_step`) in its order. The block maximum is taken on the float bits
(``u >= 0``; a NaN wins, as ``max`` propagates it in the reference).

On a machine without a GPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``) on CPU
tensors, which is how the tests check it.

Example:
    >>> from ftmlopt.kernels import triton_lowbit
    >>> triton_lowbit.BLOCKS * 128
    1024
"""

import importlib.util
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ftmlopt import lowbit, rule

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["AVAILABLE", "BLOCKS", "compile_ptx", "step"]

AVAILABLE: bool = importlib.util.find_spec("triton") is not None

#: quantization blocks per Triton program
BLOCKS = 8
_STATE: dict[str, Any] = {}


def _build() -> dict[str, Any]:
    """Define the kernel (first use only: triton loads lazily, after ``TRITON_INTERPRET`` is read)."""
    if _STATE:
        return _STATE
    import triton
    import triton.language as tl

    @triton.jit
    def div_ct(a, b, F64: tl.constexpr):  # type: ignore[no-untyped-def]
        """``a / b`` correctly rounded (float64's ``/`` is; float32 needs ``div_rn``)."""
        if F64:
            return a / b
        else:
            return tl.div_rn(a, b)

    @triton.jit
    def sqrt_ct(a, F64: tl.constexpr):  # type: ignore[no-untyped-def]
        """The correctly rounded square root in the compute dtype."""
        if F64:
            return tl.sqrt(a)
        else:
            return tl.sqrt_rn(a)

    @triton.jit
    def store_p(ptr, idx, x, m, BF16: tl.constexpr):  # type: ignore[no-untyped-def]
        """Store in the param dtype; bfloat16 rounded to nearest even on the bits (torch's rule, any backend)."""
        if BF16:
            f = x.to(tl.float32)
            b = f.to(tl.int32, bitcast=True)
            r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
            r = tl.where(f != f, 0x7FC0, r & 0xFFFF)
            tl.store(ptr + idx, r.to(tl.int16).to(tl.bfloat16, bitcast=True), mask=m)
        else:
            tl.store(ptr + idx, x.to(ptr.dtype.element_ty), mask=m)

    @triton.jit
    def max_of(a, b):  # type: ignore[no-untyped-def]
        """The reduction of ``tl.reduce`` below (``tl.max`` is a library jit function, which the interpreter
        cannot call when triton was imported before ``TRITON_INTERPRET`` was set)."""
        return tl.maximum(a, b)

    globals().update(div_ct=div_ct, sqrt_ct=sqrt_ct, store_p=store_p, max_of=max_of)

    @triton.jit
    def lowbit_tile(  # type: ignore[no-untyped-def]
        w_ptr, g_ptr, idx, m, q, old_scale, coef, bias2, b2, omb2, eps, wd, clip, decay, scale,
        SHIFT: tl.constexpr, BIAS: tl.constexpr, MAXIMIZE: tl.constexpr, COUPLED_WD: tl.constexpr,
        DECOUPLED_WD: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_SCALE: tl.constexpr, MT: tl.constexpr,
        F64: tl.constexpr, BF16: tl.constexpr,
    ):
        """Decode, step and store ``w`` for one tile; returns ``u = sqrt(float32(v))`` (0 where masked)."""
        x = ((q << SHIFT) + (BIAS << 23)).to(tl.float32, bitcast=True)
        u_old = x * old_scale[:, None]
        v_old = (u_old * u_old).to(MT)
        g = tl.load(g_ptr + idx, mask=m, other=0.0).to(MT)
        if HAS_SCALE:
            g = div_ct(g, scale, F64)
            store_p(g_ptr, idx, g, m, BF16)
        if MAXIMIZE:
            g = -g
        w = tl.load(w_ptr + idx, mask=m, other=0.0).to(MT)
        if DECOUPLED_WD:
            w = w * decay
        if COUPLED_WD:
            g = g + w * wd
        if HAS_CLIP:  # NaN passes through, as in the rule's clip
            g = tl.where(g > clip, clip, g)
            g = tl.where(g < -clip, -clip, g)
        v = v_old * b2 + (g * g) * omb2
        r = sqrt_ct(v, F64)
        root = r * bias2 + eps  # the compact rule: sqrt(v) * bias2_rsqrt + eps (``bias2`` holds bias2_rsqrt)
        w = w - div_ct(g * coef, root, F64)
        store_p(w_ptr, idx, w, m, BF16)
        if F64:
            u = tl.sqrt_rn(v.to(tl.float32))  # u = sqrt(float32(v))
        else:
            u = r  # in float32, u is the step's own root: one square root per element
        return tl.where(m, u, 0.0)

    @triton.jit
    def lowbit_encode(  # type: ignore[no-untyped-def]
        u, idx, rho, key, SHIFT: tl.constexpr, BIAS: tl.constexpr, M: tl.constexpr, TOP_CODE: tl.constexpr,
        STOCHASTIC: tl.constexpr,
    ):
        """The int32 codes of a tile of ``u``; ``rho``: the blocks' ``1 / scale`` (1 where a scale is 0)."""
        x = u * rho[:, None]
        if STOCHASTIC:
            h = idx.to(tl.uint32) * 0x9E3779B1 + key  # lowbit.random_bits
            r = (h >> (32 - SHIFT)).to(tl.int32)
        else:
            r = 1 << (SHIFT - 1)
        q = (x.to(tl.int32, bitcast=True) + (r - (BIAS << 23))) >> SHIFT
        return tl.minimum(tl.maximum(q, 0), TOP_CODE)

    # Triton's interpreter resolves callees through the module's globals (not closures).
    globals().update(lowbit_tile=lowbit_tile, lowbit_encode=lowbit_encode)

    @triton.jit
    def lowbit_kernel(  # type: ignore[no-untyped-def]
        table, sizes, keys, coefs, chunk_tensor, chunk_block, n_tensors, hyper, p_like,
        BITS: tl.constexpr, SHIFT: tl.constexpr, BIAS: tl.constexpr, M: tl.constexpr, TOP_CODE: tl.constexpr,
        TOP: tl.constexpr, STOCHASTIC: tl.constexpr, MAXIMIZE: tl.constexpr, COUPLED_WD: tl.constexpr,
        DECOUPLED_WD: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_SCALE: tl.constexpr, MT: tl.constexpr,
        F64: tl.constexpr, BF16: tl.constexpr, NB: tl.constexpr,
    ):
        c = tl.program_id(0)
        # hyper: (beta2, 1 - beta2, eps, wd, clip, decay, grad scale) in the compute dtype
        b2 = tl.load(hyper)
        omb2 = tl.load(hyper + 1)
        eps = tl.load(hyper + 2)
        wd = tl.load(hyper + 3)
        clip = tl.load(hyper + 4)
        decay = tl.load(hyper + 5)
        scale = tl.load(hyper + 6)
        i = tl.load(chunk_tensor + c)
        first = tl.load(chunk_block + c)
        n = tl.load(sizes + i)
        w_ptr = tl.load(table + i).to(p_like.dtype)
        g_ptr = tl.load(table + n_tensors + i).to(p_like.dtype)
        c_ptr = tl.load(table + 2 * n_tensors + i).to(tl.pointer_type(tl.uint8))
        s_ptr = tl.load(table + 3 * n_tensors + i).to(tl.pointer_type(tl.float32))
        key = tl.load(keys + i).to(tl.uint32)
        coef = tl.load(coefs + 2 * i).to(MT)
        bias2 = tl.load(coefs + 2 * i + 1).to(MT)
        rows = first + tl.arange(0, NB)
        row_ok = rows * 128 < n
        old_scale = tl.load(s_ptr + rows, mask=row_ok, other=0.0)
        if BITS == 8:
            idx = rows[:, None] * 128 + tl.arange(0, 128)[None, :]
            m = idx < n
            q = tl.load(c_ptr + idx, mask=m, other=0).to(tl.int32)
            u = lowbit_tile(w_ptr, g_ptr, idx, m, q, old_scale, coef, bias2, b2, omb2, eps, wd, clip, decay, scale,
                            SHIFT, BIAS, MAXIMIZE, COUPLED_WD, DECOUPLED_WD, HAS_CLIP, HAS_SCALE, MT, F64, BF16)
            umax = tl.reduce(u.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 1, max_of).to(tl.float32, bitcast=True)
            new_scale = tl.div_rn(umax, TOP)
            rho = tl.div_rn(tl.full(new_scale.shape, 1.0, tl.float32), tl.where(new_scale > 0.0, new_scale, 1.0))
            code = lowbit_encode(u, idx, rho, key, SHIFT, BIAS, M, TOP_CODE, STOCHASTIC)
            tl.store(c_ptr + idx, code.to(tl.uint8), mask=m)
        else:
            byte_idx = rows[:, None] * 64 + tl.arange(0, 64)[None, :]
            even = 2 * byte_idx
            m_even = even < n
            m_odd = even + 1 < n
            byte = tl.load(c_ptr + byte_idx, mask=m_even, other=0).to(tl.int32)
            u_lo = lowbit_tile(w_ptr, g_ptr, even, m_even, byte & 15, old_scale, coef, bias2, b2, omb2, eps, wd,
                               clip, decay, scale, SHIFT, BIAS, MAXIMIZE, COUPLED_WD, DECOUPLED_WD, HAS_CLIP,
                               HAS_SCALE, MT, F64, BF16)
            u_hi = lowbit_tile(w_ptr, g_ptr, even + 1, m_odd, byte >> 4, old_scale, coef, bias2, b2, omb2, eps, wd,
                               clip, decay, scale, SHIFT, BIAS, MAXIMIZE, COUPLED_WD, DECOUPLED_WD, HAS_CLIP,
                               HAS_SCALE, MT, F64, BF16)
            bits_max = tl.maximum(u_lo.to(tl.int32, bitcast=True) & 0x7FFFFFFF,
                                  u_hi.to(tl.int32, bitcast=True) & 0x7FFFFFFF)
            umax = tl.reduce(bits_max, 1, max_of).to(tl.float32, bitcast=True)
            new_scale = tl.div_rn(umax, TOP)
            rho = tl.div_rn(tl.full(new_scale.shape, 1.0, tl.float32), tl.where(new_scale > 0.0, new_scale, 1.0))
            lo = lowbit_encode(u_lo, even, rho, key, SHIFT, BIAS, M, TOP_CODE, STOCHASTIC)
            hi = tl.where(m_odd, lowbit_encode(u_hi, even + 1, rho, key, SHIFT, BIAS, M, TOP_CODE, STOCHASTIC), 0)
            tl.store(c_ptr + byte_idx, (lo | (hi << 4)).to(tl.uint8), mask=m_even)
        tl.store(s_ptr + rows, new_scale, mask=row_ok)

    _STATE.update(kernel=lowbit_kernel)
    return _STATE


def _constexprs(bits: int, rounding: str, param: str, flags: dict[str, bool]) -> dict[str, Any]:
    """The kernel's compile-time switches for a launch (``param``: a torch dtype name)."""
    import triton.language as tl

    e_bits, m_bits = lowbit.format_of(bits)
    f64 = param == "float64"
    out: dict[str, Any] = dict(
        BITS=bits, SHIFT=23 - m_bits, BIAS=127 - (2**e_bits - 1), M=m_bits, TOP_CODE=2 ** (e_bits + m_bits) - 1,
        TOP=lowbit.top(bits), STOCHASTIC=lowbit.check_rounding(rounding) == "stochastic", MAXIMIZE=False,
        COUPLED_WD=False, DECOUPLED_WD=False, HAS_CLIP=False, HAS_SCALE=False,
        MT=tl.float64 if f64 else tl.float32, F64=f64, BF16=param == "bfloat16", NB=BLOCKS,
    )
    out.update(flags)
    return out


def compile_ptx(bits: int = 8, param: str = "float32", arch: int = 90, rounding: str = "stochastic",
                **flags: bool) -> str:
    """Compile the kernel ahead of time for ``sm_<arch>`` (no GPU needed) and return its PTX.

    ``flags`` set the option switches (``MAXIMIZE``, ``COUPLED_WD``, ``DECOUPLED_WD``, ``HAS_CLIP``,
    ``HAS_SCALE``). The launch options are :func:`step`'s (``enable_fp_fusion=False``), so the PTX
    shows what the GPU runs: ``div.rn``/``sqrt.rn`` and no contracted ``fma`` in float32.

    Example:
        >>> from ftmlopt.kernels import triton_lowbit
        >>> ptx = triton_lowbit.compile_ptx(4, "bfloat16")  # doctest: +SKIP
        >>> "div.rn.f32" in ptx and "fma.rn.f32" not in ptx  # doctest: +SKIP
        True
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = _build()["kernel"]
    short = {"float32": "fp32", "float64": "fp64", "float16": "fp16", "bfloat16": "bf16"}
    ct = "fp64" if param == "float64" else "fp32"
    signature = dict(table="*i64", sizes="*i64", keys="*i64", coefs=f"*{ct}", chunk_tensor="*i64",
                     chunk_block="*i64", n_tensors="i32", hyper=f"*{ct}", p_like=f"*{short[param]}")
    consts = _constexprs(bits, rounding, param, flags)
    source = ASTSource(fn=kernel, signature={**signature, **dict.fromkeys(consts, "constexpr")}, constexprs=consts)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"enable_fp_fusion": False})
    return str(compiled.asm["ptx"])


def step(
    params: "list[Tensor]",
    grads: "list[Tensor]",
    codes: "list[Tensor]",
    scales: "list[Tensor]",
    seeds: Sequence[int],
    steps: Sequence[int],
    constants: "Sequence[rule.Constants]",
    *,
    bits: int,
    rounding: str = "stochastic",
    grad_scale: float | None = None,
) -> None:
    r"""One fused low-bit compact step for tensors of one CUDA device (or CPU tensors in the interpreter).

    The arguments are :func:`ftmlopt.torch._fused_lowbit.step_lowbit`'s (checked there): params and
    grads of one float dtype, each param's codes, scales, seed, step count and constants (which may
    differ only in their step). Non-contiguous tensors go through contiguous copies written back.

    Example:
        >>> import torch
        >>> from ftmlopt import lowbit, rule
        >>> from ftmlopt.kernels import triton_lowbit
        >>> w, g = torch.ones(300, device="cuda"), torch.full((300,), 0.5, device="cuda")  # doctest: +SKIP
        >>> q, s = lowbit.zeros_state(300, 8, ops=lowbit.ops_for(w))  # doctest: +SKIP
        >>> triton_lowbit.step([w], [g], [q], [s], [0], [1], [rule.constants(0.1, 1, 0.6, 0.999, 1e-8)],
        ...                    bits=8)  # doctest: +SKIP
    """
    import torch

    if not AVAILABLE:
        raise RuntimeError("the fused low-bit step on CUDA needs triton: pip install 'ftmlopt[triton]'")
    kernel = _build()["kernel"]
    if not params:
        return
    device = params[0].device
    p_dtype = params[0].dtype
    staged = []

    def usable(t: "Tensor", write_back: bool) -> "Tensor":
        if t.dtype == p_dtype and t.is_contiguous():
            return t
        copy = torch.empty(t.shape, dtype=p_dtype, device=device).copy_(t)
        if write_back:
            staged.append((t, copy))
        return copy

    ws = [usable(p, True) for p in params]
    gs = [usable(g, grad_scale is not None) for g in grads]
    c0 = constants[0]
    mt = torch.float64 if p_dtype == torch.float64 else torch.float32
    sizes = [p.numel() for p in params]
    owner, first = [], []
    for i, n in enumerate(sizes):
        for b in range(0, lowbit.n_blocks(n), BLOCKS):
            owner.append(i)
            first.append(b)
    if not owner:
        return

    def dev(values: Any, dtype: Any) -> "Tensor":
        return torch.tensor(values, dtype=dtype).to(device)

    table = dev([[t.data_ptr() for t in row] for row in (ws, gs, codes, scales)], torch.int64)
    keys = dev([lowbit.step_key(s, t) for s, t in zip(seeds, steps)], torch.int64)
    coefs = dev([[c.step_size, c.bias2_rsqrt] for c in constants], torch.float64).to(mt)
    # rounded once to the compute dtype, as Constants.cast and the CPU kernel do
    hyper = dev([c0.beta2, c0.one_minus_beta2, c0.eps, 0.0 if c0.wd is None else c0.wd,
                 float("inf") if c0.clip is None else c0.clip, 1.0 if c0.decay is None else c0.decay,
                 1.0 if grad_scale is None else grad_scale], torch.float64).to(mt)
    flags = dict(MAXIMIZE=c0.sign < 0, COUPLED_WD=c0.wd is not None, DECOUPLED_WD=c0.decay is not None,
                 HAS_CLIP=c0.clip is not None, HAS_SCALE=grad_scale is not None)
    kernel[(len(owner),)](
        table, dev(sizes, torch.int64), keys, coefs, dev(owner, torch.int64), dev(first, torch.int64), len(params),
        hyper, ws[0], **_constexprs(bits, rounding, str(p_dtype).split(".")[-1], flags), enable_fp_fusion=False,
    )
    for original, copy in staged:
        original.copy_(copy)
