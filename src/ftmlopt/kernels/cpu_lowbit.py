r"""The fused low-bit FTML step on the CPU: ``v`` kept as 8-bit (E4M4) or 4-bit (E3M1) codes of ``sqrt(v)``.

One pass per block of :data:`BLOCK` = 128 consecutive elements (the quantization block of
:mod:`ftmlopt.lowbit`): the kernel reads ``w``, ``g``, the block's codes and its float32 scale once,
decodes ``v`` in registers, runs the compact step in the rule's operation order, writes ``w``,
takes the block's new maximum of ``u = sqrt(v)`` and writes the codes encoded with the new scale
and the step's counter-based random bits, then the scale. Nothing else is read or written: 14 bytes
moved per float32 parameter at 8 bits, 13 at 4 bits (the float32-state compact step: 20).
The whole blocks of a piece are software-pipelined: one vectorized loop steps block ``k`` (the
divisions and square roots, which bound the kernel on the CPU's divider) while it encodes block
``k - 1`` (integer work and the hash, on the other vector units), so the two overlap. Each vector
of the step first prefetches the lines of ``w``, ``g`` and the codes
:data:`ftmlopt.kernels.cpu.PREFETCH_AHEAD` elements ahead, so the loop does not wait on memory at
every page. With float32 compute that loop is written in explicit vectors of :data:`LANES`
elements (the same operations, so the same bits), which lets LLVM narrow the codes with saturating
packs instead of clamps and shuffles, and join 4-bit codes in registers.

Per element ``i`` of a block with old scale ``s`` and new scale ``s'`` (``E``, ``M``: exponent and
mantissa bits; ``k``: the step's constants, as in :mod:`ftmlopt.kernels.cpu`)::

    x(q) = bitcast<f32>((q << (23 - M)) + ((127 - (2^E - 1)) << 23))        (exact)
    u = x(q) * s;  v = u * u                                                   (float32)
    g' = rule.gradient(g, w);  v <- v * b2 + (g' * g') * (1 - b2)              (compute type)
    w <- w - (g' * step_size) / (sqrt(v) * bias2_rsqrt + eps)                  (rule.compact_step)
    u = sqrt(float32(v));  s' = max_block(u) / TOP;  rho = 1 / s' (1 if s' <= 0)  (float32)
    q = clamp((bitcast<i32>(u * rho) + (r_i - ((127 - (2^E - 1)) << 23))) >> (23 - M), 0, 2^(E+M) - 1)

with ``r_i = ((i * 0x9E3779B1 + key) mod 2^32) >> (9 + M)`` (stochastic rounding; ``key`` from the tensor's seed
and step; the whole-block loops add the constant per element instead of multiplying) or ``2^(22 - M)``
(round to nearest). No fast-math and no FMA contraction: float32
parameters give codes, scales and weights bit-identical to :mod:`ftmlopt.lowbit`.

The compiled functions have the C signature of :func:`ftmlopt.kernels.cpu.kernel`'s
(``run(n_pieces, ptrs, counts, coefs, k)``, six 64-bit words per piece), so they run on
:func:`ftmlopt.kernels.cpu.run`'s threads; a piece is a run of whole blocks of one tensor and its
six words are ``(w, g, codes, scales, first element, key)``.

Example:
    >>> import numpy as np
    >>> from ftmlopt import lowbit, rule
    >>> from ftmlopt.kernels import cpu_lowbit
    >>> w, g = np.ones(300, dtype=np.float32), np.full(300, 0.5, dtype=np.float32)
    >>> codes, scales = lowbit.zeros_state(300, bits=8)
    >>> c = rule.constants(lr=0.1, t=1, beta1=0.6, beta2=0.999, eps=1e-8)
    >>> cpu_lowbit.step_arrays([w], [g], [codes], [scales], c, seeds=[0], step=1, bits=8, rounding="nearest")
    >>> float(w[0]), int(codes[0]), bool(scales[0] * np.float32(1.9375) == np.sqrt(np.float32(0.00025)))
    (0.8999999761581421, 255, True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from ftmlopt import lowbit, rule
from ftmlopt.kernels import cpu

__all__ = ["AVAILABLE", "BLOCK", "CHUNK", "LowbitSpec", "kernel", "make_pieces", "step_arrays"]

#: whether the kernels can be compiled here (see :data:`ftmlopt.kernels.cpu.AVAILABLE`)
AVAILABLE: bool = cpu.AVAILABLE

#: elements per quantization block (one float32 scale each): the format's
BLOCK = lowbit.BLOCK

#: elements per explicit vector in the whole-block loops (float32 compute); LLVM splits it to the host's width
LANES = 16

#: elements per piece of work handed to a thread: whole blocks
CHUNK = 512 * BLOCK



class LowbitSpec(NamedTuple):
    """One compiled variant of the low-bit step: code width, parameter dtype, rounding and options."""

    bits: int
    param: str
    rounding: str = "stochastic"
    maximize: bool = False
    coupled_wd: bool = False
    decoupled_wd: bool = False
    clip: bool = False
    #: divide the gradient by ``k.scale`` (torch's grad_scale)
    scale: bool = False
    #: store the unscaled gradient back (torch's fused protocol)
    write_grad: bool = False

    @property
    def compute(self) -> str:
        return rule.compute_dtype(self.param)


# ============================================================================ code generation
def _codegen(spec: LowbitSpec) -> str:
    """LLVM IR of ``run(n_pieces, ptrs, counts, coefs, k)`` for ``spec`` (see the module docstring)."""
    assert cpu._LLVM is not None
    ir = cpu._LLVM[1]
    i8, i16, i32, i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
    f32, f64 = ir.FloatType(), ir.DoubleType()
    storage = {"float32": f32, "float64": f64, "float16": ir.HalfType(), "bfloat16": i16}
    ct = f64 if spec.compute == "float64" else f32
    pt = storage[spec.param]
    e_bits, m_bits = lowbit.format_of(spec.bits)
    shift = 23 - m_bits
    bias = 127 - (2**e_bits - 1)
    top_code = 2 ** (e_bits + m_bits) - 1
    top = lowbit.top(spec.bits)
    module = ir.Module(name=f"ftml_lowbit_{'_'.join(map(str, spec))}")
    k_fields = cpu.K_FIELDS
    piece_args = [pt.as_pointer(), pt.as_pointer(), i8.as_pointer(), f32.as_pointer(), i64, i32, i64,
                  ct, ct, *([ct] * len(k_fields))]
    piece = ir.Function(module, ir.FunctionType(ir.VoidType(), piece_args), name="piece")
    piece.linkage = "internal"
    for a in piece.args[:4]:
        a.add_attribute("noalias")
    w_p, g_p, c_p, s_p, start, key, count = piece.args[:7]
    coef, bias2, *kv = piece.args[7:]
    k = dict(zip(k_fields, kv))
    sqrt_ct = module.declare_intrinsic("llvm.sqrt", [ct])
    sqrt_f32 = module.declare_intrinsic("llvm.sqrt", [f32])

    def scratch() -> tuple[Any, Any, Any]:
        """The function's block buffers: ``u``, and for 4 bits the old and new codes one per byte."""
        buf = b.alloca(ir.ArrayType(f32, BLOCK), name="u")
        qin = b.alloca(ir.ArrayType(i8, BLOCK), name="qin")
        qout = b.alloca(ir.ArrayType(i8, BLOCK + 1), name="qout")
        for a in (buf, qin, qout):
            a.align = 64
        return buf, qin, qout

    b = ir.IRBuilder(piece.append_basic_block("entry"))
    buf, qin, qout = scratch()

    def loop(n: Any, inits: list[Any], body: Callable[[Any, list[Any]], list[Any]], name: str) -> list[Any]:
        """``for j in range(n)`` carrying ``inits`` through ``body``; returns their final values."""
        pre = b.block
        head = piece.append_basic_block(name)
        end = piece.append_basic_block(name + "_end")
        b.cbranch(b.icmp_signed(">", n, n.type(0)), head, end)
        b.position_at_end(head)
        j = b.phi(n.type)
        j.add_incoming(n.type(0), pre)
        phis = []
        for v in inits:
            phi = b.phi(v.type)
            phi.add_incoming(v, pre)
            phis.append(phi)
        new = body(j, phis)
        latch = b.block
        nxt = b.add(j, n.type(1))
        j.add_incoming(nxt, latch)
        for phi, v in zip(phis, new):
            phi.add_incoming(v, latch)
        b.cbranch(b.icmp_signed("<", nxt, n), head, end)
        b.position_at_end(end)
        out = []
        for v0, v1 in zip(inits, new):
            phi = b.phi(v0.type)
            phi.add_incoming(v0, pre)
            phi.add_incoming(v1, latch)
            out.append(phi)
        return out

    def widen(x: Any) -> Any:
        return x if x.type == ct else b.fpext(x, ct)

    def load_p(ptr: Any, i: Any) -> Any:
        return cpu._load(b, ptr, i, pt, ct)

    def store_p(ptr: Any, i: Any, x: Any) -> None:
        cpu._store(b, ptr, i, pt, ct, x)

    def element(i: Any, q: Any, old_scale: Any) -> Any:
        """Decode code ``q`` (i32), step element ``i``; returns ``u = sqrt(v)`` (float32)."""
        x = b.bitcast(b.add(b.shl(q, i32(shift)), i32(bias << 23)), f32)
        u_old = b.fmul(x, old_scale)
        v_old = widen(b.fmul(u_old, u_old))
        g, w = cpu._gradient(b, spec, k, lambda: load_p(g_p, i), lambda: load_p(w_p, i), lambda g: store_p(g_p, i, g))
        v = b.fadd(b.fmul(v_old, k["beta2"]), b.fmul(b.fmul(g, g), k["one_minus_beta2"]))
        r = b.call(sqrt_ct, [v])
        root = b.fadd(b.fmul(r, bias2), k["eps"])  # the compact rule: sqrt(v) * bias2_rsqrt + eps
        store_p(w_p, i, b.fsub(w, b.fdiv(b.fmul(g, coef), root)))
        # u = sqrt(float32(v)): in float32 it is the step's own root (one square root per element)
        return r if ct == f32 else b.call(sqrt_f32, [b.fptrunc(v, f32)])

    def keep(j: Any, u: Any, mx: Any) -> Any:
        """Store ``u`` in the block buffer; fold its bits into the running maximum (u >= 0: int order)."""
        b.store(u, b.gep(buf, [i64(0), j]))
        ub = b.and_(b.bitcast(u, i32), i32(0x7FFFFFFF))  # any NaN sorts above +inf and wins
        return b.select(b.icmp_signed(">", ub, mx), ub, mx)

    def encode(j: Any, i: Any, rho: Any) -> Any:
        """The code (i32) of buffered element ``j`` (flat index ``i`` mod 2**32, i32), ``rho`` = 1 / scale."""
        x = b.fmul(b.load(b.gep(buf, [i64(0), j])), rho)
        if spec.rounding == "stochastic":
            r = b.lshr(b.add(b.mul(i, i32(0x9E3779B1)), key), i32(32 - shift))  # lowbit.random_bits
        else:
            r = i32(1 << (shift - 1))
        q = b.ashr(b.add(b.bitcast(x, i32), b.sub(r, i32(bias << 23))), i32(shift))
        q = b.select(b.icmp_signed("<", q, i32(0)), i32(0), q)
        return b.select(b.icmp_signed(">", q, i32(top_code)), i32(top_code), q)

    def unpack_block(base: Any, nb: Any) -> None:
        """4-bit: the bytes of the block at ``base`` into ``qin``, one code per element (a loop LLVM vectorizes)."""
        c_base = b.lshr(base, i64(1))

        def unpack(j: Any, _: list[Any]) -> list[Any]:
            byte = b.load(b.gep(c_p, [b.add(c_base, j)]))
            j0 = b.shl(j, i64(1))
            b.store(b.and_(byte, i8(15)), b.gep(qin, [i64(0), j0]))
            b.store(b.lshr(byte, i8(4)), b.gep(qin, [i64(0), b.add(j0, i64(1))]))
            return []

        loop(b.lshr(b.add(nb, i64(1)), i64(1)), [], unpack, "unpack")

    def pack_block(base: Any, nb: Any) -> None:
        """4-bit: ``qout`` two codes per byte into the block at ``base``; an odd block's last high nibble is 0."""
        c_base = b.lshr(base, i64(1))
        b.store(i8(0), b.gep(qout, [i64(0), nb]))

        def pack(j: Any, _: list[Any]) -> list[Any]:
            j0 = b.shl(j, i64(1))
            lo = b.load(b.gep(qout, [i64(0), j0]))
            hi = b.load(b.gep(qout, [i64(0), b.add(j0, i64(1))]))
            b.store(b.or_(lo, b.shl(hi, i8(4))), b.gep(c_p, [b.add(c_base, j)]))
            return []

        loop(b.lshr(b.add(nb, i64(1)), i64(1)), [], pack, "pack")

    def code_in(base: Any, j: Any) -> Any:
        """The old code (i32) of element ``j`` of the block at ``base``."""
        return b.zext(b.load(b.gep(c_p, [b.add(base, j)]) if spec.bits == 8 else b.gep(qin, [i64(0), j])), i32)

    def code_out(base: Any, j: Any, q: Any) -> None:
        b.store(b.trunc(q, i8), b.gep(c_p, [b.add(base, j)]) if spec.bits == 8 else b.gep(qout, [i64(0), j]))

    def scale_ptr(base: Any) -> Any:
        return b.gep(s_p, [b.lshr(base, i64(7))])

    def new_scale(base: Any, mx: Any) -> Any:
        """Store the block's new scale (from the bits ``mx`` of its largest ``u``); returns its ``rho = 1 / scale``."""
        scale = b.fdiv(b.bitcast(mx, f32), f32(top))
        b.store(scale, scale_ptr(base))
        # an all-zero block: scale 0, and every code 0 (u * 1 = 0 encodes below the smallest code)
        return b.fdiv(f32(1.0), b.select(b.fcmp_ordered(">", scale, f32(0.0)), scale, f32(1.0)))

    def step_block(base: Any, nb: Any) -> Any:
        """Step the ``nb`` elements of the block at ``base``, their ``u`` into ``buf``; returns the block's rho."""
        if spec.bits == 4:
            unpack_block(base, nb)
        old_scale = b.load(scale_ptr(base))

        def step(j: Any, carried: list[Any]) -> list[Any]:
            return [keep(j, element(b.add(base, j), code_in(base, j), old_scale), carried[0])]

        return new_scale(base, loop(nb, [i32(0)], step, "step")[0])

    def encode_block(base: Any, nb: Any, rho: Any) -> None:
        """Write the codes of the block at ``base`` from the ``u`` in ``buf``."""
        base32 = b.trunc(base, i32)

        def enc(j: Any, _: list[Any]) -> list[Any]:
            code_out(base, j, encode(j, b.add(base32, b.trunc(j, i32)), rho))  # 32-bit index: i mod 2**32
            return []

        loop(nb, [], enc, "encode")
        if spec.bits == 4:
            pack_block(base, nb)

    # ---------------------------------------------------------------- whole blocks in explicit vectors
    # For float32, float16 and bfloat16 parameters (float32 compute) whole blocks are written with
    # explicit vectors of LANES elements: the same operations per element as above, in the same
    # order, so the results are identical. LLVM then clamps and narrows the codes with saturating
    # packs, and 4-bit codes are split and joined in registers (no qin/qout pass per block; the
    # nibble shuffles reinterpret vectors, so this path is taken on little-endian hosts only).
    vector = ct == f32 and str(cpu._target_machine().target_data).startswith("e")
    lanes = LANES
    vf32, vi32, vi8 = ir.VectorType(f32, lanes), ir.VectorType(i32, lanes), ir.VectorType(i8, lanes)

    def intrinsic(name: str, ret: Any, args: list[Any]) -> Any:
        return cpu._intrinsic(module, name, ret, args)

    smax_v = intrinsic(f"llvm.smax.v{lanes}i32", vi32, [vi32, vi32])
    smin_v = intrinsic(f"llvm.smin.v{lanes}i32", vi32, [vi32, vi32])
    umin_v8 = intrinsic(f"llvm.umin.v{lanes}i8", vi8, [vi8, vi8])
    sqrt_v = intrinsic(f"llvm.sqrt.v{lanes}f32", vf32, [vf32])
    reduce_smax = intrinsic(f"llvm.vector.reduce.smax.v{lanes}i32", i32, [vi32])
    vi16, hi32, hi16 = ir.VectorType(i16, lanes), ir.VectorType(i32, lanes // 2), ir.VectorType(i16, lanes // 2)

    def vc(ty: Any, value: Any) -> Any:
        return cpu._const(ty, value, lanes)

    def splat(x: Any) -> Any:
        v = b.insert_element(ir.Constant(ir.VectorType(x.type, lanes), ir.Undefined), x, i32(0))
        return b.shuffle_vector(v, ir.Constant(ir.VectorType(x.type, lanes), ir.Undefined),
                                ir.Constant(vi32, [0] * lanes))

    buf_align = min(64, lanes * 4)  # buf is 64-byte aligned; chunk j starts at a multiple of lanes floats

    def vbuf(j: Any) -> Any:
        return b.bitcast(b.gep(buf, [i64(0), j]), vf32.as_pointer())

    def vcodes_in(base: Any, j: Any) -> Any:
        """The old codes of elements ``j .. j + lanes - 1`` of the block at ``base``, as i32 lanes."""
        if spec.bits == 8:
            q = b.load(cpu._element_ptr(b, c_p, b.add(base, j), lanes), align=1)
        else:  # byte k -> the 16-bit halves (low nibble, high nibble) of one i32: element 2k, 2k + 1
            byte = b.load(cpu._element_ptr(b, c_p, b.lshr(b.add(base, j), i64(1)), lanes // 2), align=1)
            word = b.zext(byte, hi32)
            pair = b.or_(b.and_(word, cpu._const(i32, 15, lanes // 2)),
                         b.shl(b.and_(word, cpu._const(i32, 0xF0, lanes // 2)), cpu._const(i32, 12, lanes // 2)))
            return b.zext(b.bitcast(pair, vi16), vi32)
        return b.zext(q, vi32)

    def vcodes_out(base: Any, j: Any, q: Any) -> None:
        """Store codes ``q`` (i32 lanes, already in range) of elements ``j ..`` of the block at ``base``."""
        if spec.bits == 8:
            b.store(b.trunc(q, vi8), cpu._element_ptr(b, c_p, b.add(base, j), lanes), align=1)
        else:  # elements 2k, 2k + 1 as the two bytes of one i16, folded into its low byte
            pair = b.bitcast(b.call(umin_v8, [b.trunc(q, vi8), cpu._const(i8, top_code, lanes)]), hi16)
            byte = b.trunc(b.or_(pair, b.lshr(pair, cpu._const(i16, 4, lanes // 2))), ir.VectorType(i8, lanes // 2))
            b.store(byte, cpu._element_ptr(b, c_p, b.lshr(b.add(base, j), i64(1)), lanes // 2), align=1)

    def prefetch(i: Any, n: int) -> None:
        """Prefetch ``w``, ``g`` and the codes of the ``n`` elements :data:`ftmlopt.kernels.cpu.PREFETCH_AHEAD`
        after element ``i`` (at least a line each). The vector loops call it per vector rather than per
        block: the 18 lines of a block issued at once measured slower (8-bit 0.53x fused Adam's step
        against 0.46x). Scales, one line per 16 blocks, are left to the hardware."""
        cpu._prefetch(b, w_p, i, n, write=True)
        cpu._prefetch(b, g_p, i, n, write=spec.scale and spec.write_grad)
        per_byte = 8 // spec.bits  # codes per byte
        cpu._prefetch(b, c_p, b.lshr(i, i64(per_byte - 1)), n // per_byte, write=True,
                      ahead=cpu.PREFETCH_AHEAD // per_byte)

    def vstep(base: Any, j: Any, old_scale: Any, kv: dict[str, Any], coef_v: Any, bias2_v: Any, mx: Any) -> Any:
        """Step elements ``j .. j + lanes - 1`` of the block at ``base`` (see ``element``); their ``u``
        into ``buf``; returns the running maximum (i32 lanes) of the bits of ``u``."""
        i = b.add(base, j)
        prefetch(i, lanes)
        x = b.bitcast(b.add(b.shl(vcodes_in(base, j), vc(i32, shift)), vc(i32, bias << 23)), vf32)
        u_old = b.fmul(x, old_scale)
        v_old = b.fmul(u_old, u_old)
        g, w = cpu._gradient(b, spec, kv, lambda: cpu._load(b, g_p, i, pt, ct, lanes),
                             lambda: cpu._load(b, w_p, i, pt, ct, lanes),
                             lambda g: cpu._store(b, g_p, i, pt, ct, g, lanes))
        v = b.fadd(b.fmul(v_old, kv["beta2"]), b.fmul(b.fmul(g, g), kv["one_minus_beta2"]))
        r = b.call(sqrt_v, [v])
        root = b.fadd(b.fmul(r, bias2_v), kv["eps"])
        cpu._store(b, w_p, i, pt, ct, b.fsub(w, b.fdiv(b.fmul(g, coef_v), root)), lanes)
        b.store(r, vbuf(j), align=buf_align)
        ub = b.and_(b.bitcast(r, vi32), vc(i32, 0x7FFFFFFF))  # any NaN sorts above +inf and wins
        return b.call(smax_v, [ub, mx])

    def hash_at(first: Any) -> Any:
        """``i * 0x9E3779B1 + key`` (mod 2**32) for the ``lanes`` elements from flat index ``first``."""
        h0 = b.add(b.mul(b.trunc(first, i32), i32(0x9E3779B1)), key)
        return b.add(splat(h0), ir.Constant(vi32, [(j * 0x9E3779B1) & 0xFFFFFFFF for j in range(lanes)]))

    def vencode(base: Any, j: Any, rho_v: Any, h: Any) -> Any:
        """Encode the buffered ``u`` of elements ``j ..`` of the block at ``base`` (see ``encode``); ``h``
        is their :func:`hash_at`. Returns the next chunk's ``h``."""
        x = b.fmul(b.load(vbuf(j), align=buf_align), rho_v)
        if spec.rounding == "stochastic":
            r = b.lshr(h, vc(i32, 32 - shift))  # lowbit.random_bits
        else:
            r = vc(i32, 1 << (shift - 1))
        q = b.ashr(b.add(b.bitcast(x, vi32), b.sub(r, vc(i32, bias << 23))), vc(i32, shift))
        # clamped to [0, 255] (what saturating packs do for free), then to the top code as bytes
        vcodes_out(base, j, b.call(smin_v, [b.call(smax_v, [q, vc(i32, 0)]), vc(i32, 255)]))
        return b.add(h, vc(i32, (lanes * 0x9E3779B1) & 0xFFFFFFFF))

    def vector_block_steps() -> tuple[Callable[[Any], Any], Callable[[Any, Any, Any], Any], Callable[[Any, Any], None]]:
        """The three block bodies of :func:`whole_blocks` in explicit vectors (float32 compute)."""
        ks = {name: splat(value) for name, value in k.items()}
        coef_v, bias2_v = splat(coef), splat(bias2)
        chunks = i64(BLOCK // lanes)

        def step_only(base: Any) -> Any:
            old_scale = splat(b.load(scale_ptr(base)))

            def body(c: Any, mx: list[Any]) -> list[Any]:
                return [vstep(base, b.mul(c, i64(lanes)), old_scale, ks, coef_v, bias2_v, mx[0])]

            mx = loop(chunks, [vc(i32, 0)], body, "vstep")[0]
            return new_scale(base, b.call(reduce_smax, [mx]))

        def step_and_encode(prev: Any, base: Any, rho: Any) -> Any:
            rho_v = splat(rho)
            old_scale = splat(b.load(scale_ptr(base)))

            def both(c: Any, carried: list[Any]) -> list[Any]:
                j = b.mul(c, i64(lanes))
                h = vencode(prev, j, rho_v, carried[1])
                return [vstep(base, j, old_scale, ks, coef_v, bias2_v, carried[0]), h]

            mx = loop(chunks, [vc(i32, 0), hash_at(prev)], both, "vboth")[0]
            return new_scale(base, b.call(reduce_smax, [mx]))

        def encode_only(base: Any, rho: Any) -> None:
            rho_v = splat(rho)

            def body(c: Any, h: list[Any]) -> list[Any]:
                return [vencode(base, b.mul(c, i64(lanes)), rho_v, h[0])]

            loop(chunks, [hash_at(base)], body, "vencode")

        return step_only, step_and_encode, encode_only

    def scalar_block_steps() -> tuple[Callable[[Any], Any], Callable[[Any, Any, Any], Any], Callable[[Any, Any], None]]:
        """The three block bodies of :func:`whole_blocks` as scalar loops (LLVM vectorizes them)."""

        def step_and_encode(prev: Any, base: Any, rho: Any) -> Any:
            if spec.bits == 4:
                unpack_block(base, full)
            prefetch(base, BLOCK)
            old_scale = b.load(scale_ptr(base))
            prev32 = b.trunc(prev, i32)

            def both(j: Any, mx: list[Any]) -> list[Any]:
                code_out(prev, j, encode(j, b.add(prev32, b.trunc(j, i32)), rho))
                return [keep(j, element(b.add(base, j), code_in(base, j), old_scale), mx[0])]

            mx = loop(full, [i32(0)], both, "both")[0]
            if spec.bits == 4:
                pack_block(prev, full)
            return new_scale(base, mx)

        return (lambda base: step_block(base, full)), step_and_encode, (lambda base, rho: encode_block(base, full, rho))

    def whole_blocks(step_only: Callable[[Any], Any], step_and_encode: Callable[[Any, Any, Any], Any],
                     encode_only: Callable[[Any, Any], None]) -> None:
        """All whole blocks of the piece, software-pipelined: step the first block, then per block ``k``
        step it while encoding block ``k - 1`` (its ``rho`` carried), then encode the last. Element
        ``j``'s ``u`` of block ``k - 1`` is read from ``buf`` before block ``k``'s is written there."""
        with b.if_then(b.icmp_signed(">", n_full, i64(0))):
            rho0 = step_only(start)

            def pipelined(blk: Any, carried: list[Any]) -> list[Any]:
                prev = b.add(start, b.mul(blk, full))
                return [step_and_encode(prev, b.add(prev, full), carried[0])]

            rho_last = loop(b.sub(n_full, i64(1)), [rho0], pipelined, "pipelined")[0]
            encode_only(b.add(start, b.mul(b.sub(n_full, i64(1)), full)), rho_last)

    # Whole blocks are software-pipelined: stepping block k (divisions and square roots) and encoding
    # block k - 1 (integer work and the hash) in one loop lets the two kinds of work overlap.
    full = i64(BLOCK)
    n_full = b.udiv(count, full)
    whole_blocks(*(vector_block_steps() if vector else scalar_block_steps()))
    # A partial last block goes to ``tail``, a function with ``piece``'s signature compiled for size
    # (its loops are not vectorized): it runs once per piece, and vectorizing it doubled the time
    # LLVM takes to compile the kernel, which a new process pays on its first step.
    tail = ir.Function(module, piece.function_type, name="tail")
    tail.linkage = "internal"
    for attr in ("noinline", "minsize", "optsize"):
        tail.attributes.add(attr)
    for a in tail.args[:4]:
        a.add_attribute("noalias")
    tail_base = b.mul(n_full, full)
    with b.if_then(b.icmp_signed(">", count, tail_base)):
        b.call(tail, [w_p, g_p, c_p, s_p, b.add(start, tail_base), key, b.sub(count, tail_base), coef, bias2, *kv])
    b.ret_void()
    # the helpers above read these names when called: rebound to ``tail``'s, they emit its body
    main, piece = piece, tail
    b = ir.IRBuilder(tail.append_basic_block("entry"))
    buf, qin, qout = scratch()
    w_p, g_p, c_p, s_p, start, key, count = tail.args[:7]
    coef, bias2, *kv = tail.args[7:]
    k = dict(zip(k_fields, kv))
    encode_block(start, count, step_block(start, count))
    b.ret_void()

    # run(n_pieces, ptrs[6 per piece], counts[per piece], coefs[2 per piece], k[K_FIELDS]): cpu.kernel's ABI
    def addresses(b: Any, word: Callable[[int], Any]) -> list[Any]:  # w, g, codes, scales, start, key
        words = [word(r) for r in range(6)]
        return [*(b.inttoptr(words[r], ty.as_pointer()) for r, ty in enumerate((pt, pt, i8, f32))),
                words[4], b.trunc(words[5], i32)]

    cpu._emit_run(module, main, ct, addresses)
    return str(module)


_KERNELS: dict[LowbitSpec, Callable[..., None]] = {}


def kernel(spec: LowbitSpec) -> Callable[..., None]:
    """The compiled low-bit kernel for ``spec`` (compiled on first request, tens of milliseconds).

    A C function with :func:`ftmlopt.kernels.cpu.kernel`'s signature ``run(n_pieces, ptrs, counts,
    coefs, k)``; per piece ``ptrs`` holds ``(w, g, codes, scales, first, key)`` (the first three
    addresses are the tensor's, not the piece's; ``first`` is the piece's first element, a multiple
    of :data:`BLOCK`), ``counts`` its element count and ``coefs`` ``(step_size, bias2_rsqrt)``.

    Example:
        >>> from ftmlopt.kernels import cpu_lowbit
        >>> callable(cpu_lowbit.kernel(cpu_lowbit.LowbitSpec(8, "float32")))
        True
    """
    lowbit.format_of(spec.bits)  # ValueError naming a width other than 8 or 4
    lowbit.check_rounding(spec.rounding)
    fn = _KERNELS.get(spec)
    if fn is None:
        if spec.param not in cpu.available_dtypes():
            if not AVAILABLE:
                cpu.kernel(cpu.Spec("compact", "float32", "float32"))  # raises ImportError, naming what to install
            raise TypeError(f"no low-bit CPU kernel for {spec.param} parameters on this CPU")
        with cpu._ENGINE_LOCK:
            fn = _KERNELS.get(spec)
            if fn is None:
                fn = _KERNELS[spec] = cpu.compile_ir(_codegen(spec))
    return fn


def make_pieces(addresses: np.ndarray, sizes: np.ndarray, keys: np.ndarray, per: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut tensors into pieces of whole blocks (at most :data:`CHUNK` elements) for :func:`ftmlopt.kernels.cpu.run`.

    ``addresses`` is ``(n, 4)`` int64 (w, g, codes, scales), ``sizes`` ``(n,)``, ``keys`` ``(n,)``
    the step keys, ``per`` ``(n, 2)`` the ``(step_size, bias2_rsqrt)`` of each tensor in the compute dtype.
    Returns ``(ptrs, counts, coefs)``: ``ptrs`` has the six words per piece :func:`kernel` reads.

    Example:
        >>> import numpy as np
        >>> ptrs, counts, coefs = make_pieces(np.zeros((1, 4), np.int64), np.array([CHUNK + 5]),
        ...                                   np.array([7]), np.ones((1, 2), np.float32))
        >>> counts.tolist(), ptrs[:, 4].tolist(), ptrs[:, 5].tolist()
        ([65536, 5], [0, 65536], [7, 7])
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    n_chunks = np.maximum((sizes + CHUNK - 1) // CHUNK, 1)
    owner = np.repeat(np.arange(sizes.size), n_chunks)
    first = (np.arange(owner.size) - np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)) * CHUNK
    ptrs = np.empty((owner.size, 6), dtype=np.int64)
    ptrs[:, :4] = np.asarray(addresses, dtype=np.int64)[owner]
    ptrs[:, 4] = first
    ptrs[:, 5] = np.asarray(keys, dtype=np.int64)[owner]
    counts = np.ascontiguousarray(np.minimum(sizes[owner] - first, CHUNK))
    return ptrs, counts, np.ascontiguousarray(np.asarray(per)[owner])


def step_arrays(
    ws: Sequence[np.ndarray],
    gs: Sequence[np.ndarray],
    codes: Sequence[np.ndarray],
    scales: Sequence[np.ndarray],
    c: rule.Constants,
    *,
    seeds: Sequence[int],
    step: int,
    bits: int,
    rounding: str = "stochastic",
    threads: int | None = None,
) -> None:
    """One low-bit compact step on NumPy arrays, in place (C-contiguous; float32 or float64 ``ws``/``gs``).

    ``codes`` are uint8 arrays of :func:`ftmlopt.lowbit.n_code_bytes` bytes, ``scales`` float32 arrays of
    ``ceil(numel / BLOCK)`` elements; ``c`` comes from :func:`ftmlopt.rule.constants` for ``step``
    (``grad_scale`` multiplies, as in the rule); ``seeds`` are the tensors' seeds. The readable
    entry point the tests hold against :mod:`ftmlopt.lowbit`.
    """
    dtype = ws[0].dtype
    spec = LowbitSpec(bits, dtype.name, rounding, maximize=c.sign < 0, coupled_wd=c.wd is not None,
                      decoupled_wd=c.decay is not None, clip=c.clip is not None)
    fn = kernel(spec)
    ct = np.dtype(spec.compute)
    if c.grad_scale is not None:  # the rule multiplies first: fold it into the gradient, as it does
        gs = [np.multiply(g, np.asarray(c.grad_scale, dtype=g.dtype)) for g in gs]
    sizes = np.array([w.size for w in ws], dtype=np.int64)
    for w, g, q, s in zip(ws, gs, codes, scales):
        _check_arrays(w, g, q, s, bits)
    addresses = np.array([[a.ctypes.data for a in row] for row in zip(ws, gs, codes, scales)],
                         dtype=np.int64).reshape(-1, 4)
    keys = np.array([lowbit.step_key(seed, step) for seed in seeds], dtype=np.int64)
    per = np.tile(np.array([c.step_size, c.bias2_rsqrt], dtype=np.float64).astype(ct), (len(ws), 1))
    ptrs, counts, coefs = make_pieces(addresses, sizes, keys, per)
    cpu.run(fn, ptrs, counts, coefs, cpu.k_vector(c, ct), cpu.default_threads() if threads is None else threads)


def _check_arrays(w: np.ndarray, g: np.ndarray, q: np.ndarray, s: np.ndarray, bits: int) -> None:
    n = w.size
    if g.size != n or g.dtype != w.dtype or not (w.flags.c_contiguous and g.flags.c_contiguous):
        raise ValueError(f"w and g must be C-contiguous arrays of one dtype and size, got {w.dtype}/{g.dtype}")
    if q.dtype != np.uint8 or q.size != lowbit.n_code_bytes(n, bits) or not q.flags.c_contiguous:
        raise ValueError(f"codes must be {lowbit.n_code_bytes(n, bits)} contiguous uint8 bytes for {n} elements "
                         f"at {bits} bits, got {q.size} of {q.dtype}")
    if s.dtype != np.float32 or s.size != lowbit.n_blocks(n) or not s.flags.c_contiguous:
        raise ValueError(f"scales must be {lowbit.n_blocks(n)} contiguous float32 values, got {s.size} of {s.dtype}")
