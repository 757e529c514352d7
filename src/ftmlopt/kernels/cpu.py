r"""CPU FTML kernels: LLVM IR built here, compiled in milliseconds, run on the caller's thread budget.

Why not a JIT compiler with an OpenMP threading layer: it changes the process's thread
settings (``torch.get_num_threads()`` went from 1 to 2 after one step, and ``OMP_NUM_THREADS``
was overridden), and a new process paid 1-7 s of JIT before its first step. This module instead

* writes each kernel as a plain scalar loop in LLVM IR (:mod:`llvmlite.ir`) and lets LLVM's
  loop vectorizer widen it for the host CPU. No ``fastmath``: no
  reassociation, no contraction of ``a*b + c`` into an FMA, so every element is computed with
  exactly the operations, in exactly the order, of :func:`ftmlopt.rule.compact_step` /
  :func:`ftmlopt.rule.mxnet_step` (float64 results are bit-identical to the rule's). Compiling
  one variant takes tens of milliseconds, there is no cache to fill, and nothing is written to disk;
* walks each piece in strips of :data:`STRIP` elements and, before a strip, prefetches every
  stream :data:`PREFETCH_AHEAD` elements ahead: the hardware prefetchers start over at every
  4 KiB page of every stream, and a step that also keeps the divider busy then waits on memory;
* runs a step on ``threads`` threads (the caller passes ``torch.get_num_threads()``), on **torch's
  own OpenMP team** when torch is loaded and ATen runs on GNU libgomp (torch's wheels ship
  ``torch/lib/libgomp.so.1``): a small generic body compiled here is handed to that library's
  ``GOMP_parallel``, each team member steps its share of the pieces, and the threads ATen keeps
  spinning between its ops do the work instead of competing with a pool of ours (see
  :func:`backend`). Elsewhere (no torch, another OpenMP runtime, a forked child) the calling
  thread plus ``threads - 1`` workers of a private pool that block on a queue between steps. No
  process-global setting is touched either way. Small steps run on the calling thread alone.

Storage types: parameters and gradients (``P``) and state (``S``) may each be float32,
float64, float16 or bfloat16; the arithmetic runs in float64 when either is float64 and in
float32 otherwise (:func:`ftmlopt.rule.compute_dtype`), and half types are converted in
registers (bfloat16 rounds to nearest even, as torch), so no staging copy is made.

Per element (``k`` are the step's constants from :func:`ftmlopt.rule.constants`, rounded once to
the compute type; ``coef`` is ``step_size`` (compact) or ``d_scale`` (three-state) of the
tensor's own step)::

    g <- g / scale (written back when asked: torch's GradScaler protocol);  g <- -g  (maximize)
    w <- w * decay, z <- z * decay                       (decoupled weight decay)
    g <- g + w * wd                                      (coupled weight decay)
    g <- clip(g, -c, c)                                  (NaN passes through)
    v <- v * b2 + (g * g) * (1 - b2)
    compact:      root = sqrt(v) * bias2_rsqrt + eps;  w <- w - (g * coef) / root
    three-state:  root = sqrt(v / bias2) + eps;  d_t = root * coef;
                  z <- z * b1 + g * (1 - b1) - (d_t - d * b1) * w;  d <- d_t;  w <- -z / d_t

:class:`Spec` ``"operator"`` is MXNet 1.9.1's ``ftml_update`` in the order of
:func:`ftmlopt.mxnet.operator._numpy_kernel` (bit-identical to it); the MXNet system binds it to its
constants in :mod:`ftmlopt.mxnet._kernel` (this module imports nothing from :mod:`ftmlopt.mxnet`).

Example:
    >>> import numpy as np
    >>> from ftmlopt import rule
    >>> from ftmlopt.kernels import cpu
    >>> w, g, v = np.array([1.0, -2.0]), np.array([0.5, 0.0]), np.zeros(2)
    >>> c = rule.constants(lr=0.1, t=1, beta1=0.6, beta2=0.999, eps=1e-8)
    >>> cpu.AVAILABLE  # llvmlite is installed ('ftmlopt[cpu]')
    True
    >>> cpu.step_arrays([w], [g], [v], c, compact=True)
    >>> [round(float(x), 6) for x in w]
    [0.9, -2.0]
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import itertools
import os
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np

from ftmlopt import rule
from ftmlopt.kernels import omp_team

__all__ = [
    "AVAILABLE", "CHUNK", "DTYPES", "LINE", "PARALLEL_MIN", "PREFETCH_AHEAD", "STRIP", "Prepared", "Spec",
    "available_dtypes", "backend", "bump_counters", "counter_kernel", "default_threads", "kernel", "run", "step_arrays",
]


def _load_llvmlite() -> tuple[Any, Any] | None:
    try:
        llvm = importlib.import_module("llvmlite.binding")
        llvm_ir = importlib.import_module("llvmlite.ir")
    except ImportError:
        return None
    if not hasattr(llvm, "create_pass_builder"):  # llvmlite < 0.44: no new pass manager
        return None
    return llvm, llvm_ir


_LLVM = _load_llvmlite()
#: whether the kernels can be compiled here (llvmlite >= 0.44 is installed: ``pip install 'ftmlopt[cpu]'``)
AVAILABLE: bool = _LLVM is not None

#: storage dtypes the kernels read and write
DTYPES: tuple[str, ...] = tuple(sorted(rule.FLOAT_DTYPES))

#: below this many elements a step runs on the calling thread alone (waking workers costs more)
PARALLEL_MIN = 1 << 16

#: large tensors are cut into pieces of this many elements to spread them over threads
CHUNK = 1 << 16

#: how far ahead of the elements being stepped the kernels prefetch every stream they read, in elements.
#: The hardware prefetchers stop at each 4 KiB page and ramp up again; a loop busy on the divider
#: then waits for memory at every page of every stream (``ftmlopt bench``, 16M float32 params: the
#: 8-bit step went from 0.74x fused Adam's time to 0.56x with it; ``docs/benchmarks.md``)
PREFETCH_AHEAD = 1024

#: elements per strip of the float-state loop: the prefetches for a strip are issued once, before it
STRIP = 128

#: bytes per cache line, the prefetch granularity
LINE = 64

#: scalar slots of the ``k`` vector every kernel takes, in this order
K_FIELDS = ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "wd", "clip", "scale", "decay")


class Spec(NamedTuple):
    """One compiled variant: the form, the storage types and the options that change the loop body.

    ``form`` is ``"compact"``, ``"mxnet"`` (three states, torch semantics) or ``"operator"``
    (MXNet's ``ftml_update``: ``g * rescale_grad``, L2 always added, ``out`` may differ from ``w``).
    """

    form: str
    param: str
    state: str
    maximize: bool = False
    coupled_wd: bool = False
    decoupled_wd: bool = False
    clip: bool = False
    #: divide the gradient by ``k.scale`` (torch's grad_scale); the operator multiplies instead
    scale: bool = False
    #: store the unscaled gradient back (torch's fused protocol)
    write_grad: bool = False
    #: the operator's ``out`` is another array than ``w``
    separate_out: bool = False

    @property
    def compute(self) -> str:
        return rule.compute_dtype(self.param, self.state)  # the one decision (float64 if either is)


# ============================================================================ code generation
_ENGINE_LOCK = threading.Lock()
_KERNELS: dict[Spec, Callable[..., None]] = {}
_KEEP: list[Any] = []  # execution engines: their code lives as long as they do
_TARGET: list[Any] = []
_SIGNATURE = ctypes.CFUNCTYPE(None, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)


def _target_machine() -> Any:
    if not _TARGET:
        assert _LLVM is not None
        llvm = _LLVM[0]
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        target = llvm.Target.from_default_triple()
        features = llvm.get_host_cpu_features().flatten()
        _TARGET.append(target.create_target_machine(cpu=llvm.get_host_cpu_name(), features=features, opt=3))
        _TARGET.append("+f16c" in features.split(","))
    return _TARGET[0]


def _module(ir_text: str, *, optimize: bool = True, slp: bool = True) -> Any:
    """``ir_text`` parsed and verified for this host, then (``optimize``) run through the O3 pipeline
    with loop vectorization (and SLP vectorization unless ``slp=False``)."""
    assert _LLVM is not None
    llvm = _LLVM[0]
    tm = _target_machine()
    mod = llvm.parse_assembly(ir_text)
    mod.triple = tm.triple
    mod.data_layout = str(tm.target_data)
    mod.verify()
    if optimize:
        pto = llvm.create_pipeline_tuning_options(speed_level=3)
        pto.loop_vectorization = True
        pto.slp_vectorization = slp
        builder = llvm.create_pass_builder(tm, pto)
        builder.getModulePassManager().run(mod, builder)
    return mod


def _jit(ir_text: str, *, optimize: bool = True, slp: bool = True) -> int:
    """Compile ``ir_text`` (see :func:`_module`) and return the address of its function ``run``.

    The execution engine is kept for the life of the process (its code lives as long as it does).
    """
    assert _LLVM is not None
    engine = _LLVM[0].create_mcjit_compiler(_module(ir_text, optimize=optimize, slp=slp), _target_machine())
    engine.finalize_object()
    _KEEP.append(engine)
    return int(engine.get_function_address("run"))


@contextlib.contextmanager
def _loop(b: Any, n: Any, names: tuple[str, str] = ("loop", "done")) -> Iterator[Any]:
    """Emit ``for i in range(n)`` (``n`` an i64 value) where builder ``b`` stands; yields ``i``.

    The body is what the ``with`` block emits; afterwards ``b`` stands in the block after the loop.
    The loop's two blocks (``names``) are appended to ``b``'s function.
    """
    i64 = n.type
    entry = b.block
    loop, done = (b.function.append_basic_block(name) for name in names)
    b.cbranch(b.icmp_signed(">", n, i64(0)), loop, done)
    b.position_at_end(loop)
    i = b.phi(i64)
    i.add_incoming(i64(0), entry)
    yield i
    nxt = b.add(i, i64(1))
    i.add_incoming(nxt, b.block)
    b.cbranch(b.icmp_signed("<", nxt, n), loop, done)
    b.position_at_end(done)


def available_dtypes() -> tuple[str, ...]:
    """The storage dtypes this CPU can use without staging (float16 needs the F16C instructions).

    Example:
        >>> from ftmlopt.kernels import cpu
        >>> "float32" in cpu.available_dtypes()
        True
    """
    if not AVAILABLE:
        return ()
    _target_machine()
    return DTYPES if _TARGET[1] else tuple(d for d in DTYPES if d != "float16")


def _codegen(spec: Spec) -> str:
    """LLVM IR of ``run(n_pieces, ptrs, counts, coefs, k)`` for ``spec`` (see :func:`kernel`)."""
    assert _LLVM is not None
    ir = _LLVM[1]
    i16, i64 = ir.IntType(16), ir.IntType(64)
    f32, f64 = ir.FloatType(), ir.DoubleType()
    storage = {"float32": f32, "float64": f64, "float16": ir.HalfType(), "bfloat16": i16}
    ct = f64 if spec.compute == "float64" else f32
    pt, st = storage[spec.param], storage[spec.state]
    module = ir.Module(name=f"ftml_{'_'.join(map(str, spec))}")
    mxnet = spec.form in ("mxnet", "operator")
    scalars = [ct] * (2 + len(K_FIELDS))
    piece_args = [pt.as_pointer(), pt.as_pointer(), st.as_pointer(), st.as_pointer(), st.as_pointer(),
                  pt.as_pointer(), i64, *scalars]
    piece = ir.Function(module, ir.FunctionType(ir.VoidType(), piece_args), name="piece")
    piece.linkage = "internal"
    for a in piece.args[:6]:
        a.add_attribute("noalias")
    w_p, g_p, d_p, v_p, z_p, out_p, n = piece.args[:7]
    coef, bias2, *kv = piece.args[7:]
    k = dict(zip(K_FIELDS, kv))

    b = ir.IRBuilder(piece.append_basic_block("entry"))
    # strips of STRIP elements: each strip first prefetches its streams PREFETCH_AHEAD elements on,
    # then steps its elements in a loop LLVM vectorizes (the per-element operations are unchanged)
    strips = b.udiv(b.add(n, i64(STRIP - 1)), i64(STRIP))
    streams = [(w_p, not spec.separate_out), (g_p, spec.scale and spec.write_grad), (v_p, True)]
    streams += [(d_p, True), (z_p, True)] if mxnet else []  # the compact form passes v's address for d and z
    streams += [(out_p, True)] if spec.separate_out else []
    with _loop(b, strips, ("strip", "strips_done")) as s:
        first = b.mul(s, i64(STRIP))
        for ptr, write in streams:
            _prefetch(b, ptr, first, STRIP, write=write)
        w_p, g_p, d_p, v_p, z_p, out_p = (b.gep(x, [first]) for x in (w_p, g_p, d_p, v_p, z_p, out_p))
        left = b.sub(n, first)
        with _loop(b, b.select(b.icmp_signed("<", left, i64(STRIP)), left, i64(STRIP))) as j:

            def load(ptr: Any, ty: Any) -> Any:
                return _load(b, ptr, j, ty, ct)

            def store(ptr: Any, ty: Any, x: Any) -> None:
                _store(b, ptr, j, ty, ct, x)

            sqrt = module.declare_intrinsic("llvm.sqrt", [ct])
            g, w = _gradient(b, spec, k, lambda: load(g_p, pt), lambda: load(w_p, pt), lambda g: store(g_p, pt, g),
                             operator=spec.form == "operator")
            v = b.fadd(b.fmul(load(v_p, st), k["beta2"]), b.fmul(b.fmul(g, g), k["one_minus_beta2"]))
            store(v_p, st, v)
            if not mxnet:  # the compact rule: sqrt(v) * bias2_rsqrt (the piece's second coefficient)
                root = b.fadd(b.fmul(b.call(sqrt, [v]), bias2), k["eps"])
            else:
                root = b.fadd(b.call(sqrt, [b.fdiv(v, bias2)]), k["eps"])
            if not mxnet:
                new_w = b.fsub(w, b.fdiv(b.fmul(g, coef), root))
            else:
                d_t = b.fmul(root, coef)
                z = load(z_p, st)
                if spec.decoupled_wd:
                    z = b.fmul(z, k["decay"])
                z = b.fadd(b.fmul(z, k["beta1"]), b.fmul(g, k["one_minus_beta1"]))
                z = b.fsub(z, b.fmul(b.fsub(d_t, b.fmul(load(d_p, st), k["beta1"])), w))
                store(z_p, st, z)
                store(d_p, st, d_t)
                new_w = b.fdiv(b.fneg(z), d_t)
            store(out_p if spec.separate_out else w_p, pt, new_w)
    b.ret_void()

    types = (pt, pt, st, st, st, pt)
    _emit_run(module, piece, ct, lambda b, word: [b.inttoptr(word(r), ty.as_pointer()) for r, ty in enumerate(types)])
    return str(module)


def _prefetch(b: Any, ptr: Any, first: Any, count: int, *, write: bool, ahead: int = PREFETCH_AHEAD) -> None:
    """Emit prefetches of the cache lines of elements ``first + ahead`` .. ``+ count - 1`` of ``ptr``.

    ``write``: the lines will be written (``prefetchw`` where the CPU has it). A prefetch never
    faults, so the lines may lie past the end of the array; the address is computed without
    ``inbounds`` for the same reason.
    """
    assert _LLVM is not None
    ir = _LLVM[1]
    i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
    fn = _intrinsic(b.module, "llvm.prefetch.p0", ir.VoidType(), [i8.as_pointer(), i32, i32, i32])
    size = _size(ptr.type.pointee)
    at = b.add(first, i64(ahead))
    for line in range(max(1, count * size // LINE)):
        p = b.bitcast(b.gep(ptr, [b.add(at, i64(line * LINE // size))]), i8.as_pointer())
        b.call(fn, [p, i32(int(write)), i32(3), i32(1)])  # read/write, locality 3 (keep in all levels), data


def _intrinsic(module: Any, name: str, ret: Any, args: list[Any]) -> Any:
    """LLVM intrinsic ``name`` (type ``ret(args)``) declared in ``module`` once; for those
    ``module.declare_intrinsic`` does not know (prefetch, integer min/max, vector reductions)."""
    assert _LLVM is not None
    ir = _LLVM[1]
    return module.globals.get(name) or ir.Function(module, ir.FunctionType(ret, args), name=name)


def _vec(ty: Any, lanes: int) -> Any:
    """``ty``, or a vector of ``lanes`` of it when ``lanes`` is not 0."""
    assert _LLVM is not None
    return _LLVM[1].VectorType(ty, lanes) if lanes else ty


def _const(ty: Any, value: Any, lanes: int = 0) -> Any:
    """The constant ``value`` of type ``ty``, splat over ``lanes`` lanes when ``lanes`` is not 0."""
    assert _LLVM is not None
    return _LLVM[1].Constant(_vec(ty, lanes), [value] * lanes if lanes else value)


def _size(ty: Any) -> int:
    """Bytes of one element of LLVM type ``ty`` (an integer or floating-point type)."""
    return {"half": 2, "float": 4, "double": 8}.get(str(ty)) or ty.width // 8


def _element_ptr(b: Any, ptr: Any, i: Any, lanes: int) -> Any:
    """Address of element ``i`` of ``ptr``; with ``lanes``, of the vector of ``lanes`` elements starting there."""
    p = b.gep(ptr, [i])
    return b.bitcast(p, _vec(ptr.type.pointee, lanes).as_pointer()) if lanes else p


def _load(b: Any, ptr: Any, i: Any, ty: Any, ct: Any, lanes: int = 0) -> Any:
    """Emit: element ``i`` of ``ptr`` (storage type ``ty``; bfloat16 is an i16) widened to the compute type ``ct``.

    With ``lanes``, the ``lanes`` elements from ``i`` on, as a vector (element alignment only).
    """
    assert _LLVM is not None
    ir = _LLVM[1]
    i32, f32 = ir.IntType(32), ir.FloatType()
    x = b.load(_element_ptr(b, ptr, i, lanes), align=_size(ty) if lanes else None)
    if ty == ir.IntType(16):  # bfloat16: the high half of a float32
        x = b.bitcast(b.shl(b.zext(x, _vec(i32, lanes)), _const(i32, 16, lanes)), _vec(f32, lanes))
    return x if x.type == _vec(ct, lanes) else b.fpext(x, _vec(ct, lanes))


def _store(b: Any, ptr: Any, i: Any, ty: Any, ct: Any, x: Any, lanes: int = 0) -> None:
    """Emit: ``x`` (compute type ``ct``) rounded to the storage type ``ty`` and stored as element ``i`` of ``ptr``.

    With ``lanes``, ``x`` is a vector stored at elements ``i`` to ``i + lanes - 1``.
    """
    assert _LLVM is not None
    ir = _LLVM[1]
    i16, i32, f32 = ir.IntType(16), ir.IntType(32), ir.FloatType()
    if ty == i16:
        f = x if x.type == _vec(f32, lanes) else b.fptrunc(x, _vec(f32, lanes))
        bits = b.bitcast(f, _vec(i32, lanes))  # round to nearest even; NaN -> a quiet NaN (torch's rule)
        odd = b.and_(b.lshr(bits, _const(i32, 16, lanes)), _const(i32, 1, lanes))
        rounded = b.trunc(b.lshr(b.add(bits, b.add(_const(i32, 0x7FFF, lanes), odd)), _const(i32, 16, lanes)),
                          _vec(i16, lanes))
        x = b.select(b.fcmp_unordered("uno", f, f), _const(i16, 0x7FC0, lanes), rounded)
    elif ty != ct:
        x = b.fptrunc(x, _vec(ty, lanes))
    b.store(x, _element_ptr(b, ptr, i, lanes), align=_size(ty) if lanes else None)


def _gradient(
    b: Any, spec: Any, k: dict[str, Any], load_g: Callable[[], Any], load_w: Callable[[], Any],
    store_g: Callable[[Any], None], *, operator: bool = False,
) -> tuple[Any, Any]:
    """Emit :func:`ftmlopt.rule.gradient` for one element; returns ``(g', w)`` (``w`` decayed when decoupled).

    ``spec``'s flags (``scale``, ``write_grad``, ``maximize``, ``decoupled_wd``, ``coupled_wd``,
    ``clip``) pick the passes; ``k`` holds the scalars by :data:`K_FIELDS` name. ``operator``: MXNet's
    ``ftml_update`` (the gradient times ``rescale_grad``, L2 always added).
    """
    g = load_g()
    if spec.scale:
        g = b.fdiv(g, k["scale"])
        if spec.write_grad:
            store_g(g)
    if operator:
        g = b.fmul(g, k["scale"])
    if spec.maximize:
        g = b.fneg(g)
    w = load_w()
    if spec.decoupled_wd:
        w = b.fmul(w, k["decay"])
    if spec.coupled_wd or operator:
        g = b.fadd(g, b.fmul(w, k["wd"]))
    if spec.clip:
        c = k["clip"]
        g = b.select(b.fcmp_ordered(">", g, c), c, g)
        neg = b.fneg(c)
        g = b.select(b.fcmp_ordered("<", g, neg), neg, g)
    return g, w


def _emit_run(module: Any, piece: Any, ct: Any, addresses: Callable[[Any, Callable[[int], Any]], list[Any]]) -> None:
    """Add ``run(n_pieces, ptrs, counts, coefs, k)`` (:func:`kernel`'s C signature) to ``module``.

    For each piece it calls ``piece(*addresses(b, word), count, coef, bias2, *k)``: ``word(r)`` loads
    the piece's ``r``-th word of ``ptrs`` (6 per piece) and ``addresses`` turns them into ``piece``'s
    leading arguments; ``ct`` is the compute type of ``coefs`` and ``k``.
    """
    assert _LLVM is not None
    ir = _LLVM[1]
    i64 = ir.IntType(64)
    vp = i64.as_pointer()
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [i64, vp, vp, ct.as_pointer(), ct.as_pointer()]), "run")
    n_pieces, ptrs, counts, coefs, kp = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    kvals = [b.load(b.gep(kp, [i64(i)])) for i in range(len(K_FIELDS))]
    with _loop(b, n_pieces, ("body", "end")) as p:
        base = b.mul(p, i64(6))
        args = addresses(b, lambda r: b.load(b.gep(ptrs, [b.add(base, i64(r))])))
        count = b.load(b.gep(counts, [p]))
        pc = [b.load(b.gep(coefs, [b.add(b.mul(p, i64(2)), i64(r))])) for r in range(2)]
        b.call(piece, [*args, count, *pc, *kvals])
    b.ret_void()


def _compile(spec: Spec) -> Callable[..., None]:
    _target_machine()
    if spec.param == "float16" or spec.state == "float16":
        if not _TARGET[1]:
            raise RuntimeError("float16 kernels need a CPU with F16C instructions")
    return compile_ir(_codegen(spec))


def compile_ir(text: str) -> Callable[..., None]:
    """Compile LLVM IR defining ``run`` with :func:`kernel`'s C signature (another kernel family's hook)."""
    return _SIGNATURE(_jit(text))  # a ctypes call: releases the GIL


def kernel(spec: Spec) -> Callable[..., None]:
    """The compiled kernel for ``spec`` (compiled on first request, tens of milliseconds).

    It is a C function ``run(n_pieces, ptrs, counts, coefs, k)``: ``ptrs`` holds 6 addresses per
    piece (w, g, d, v, z, out: the first element of the piece), ``counts`` the elements per
    piece, ``coefs`` two compute-type numbers per piece (compact: ``step_size``, ``bias2_rsqrt``;
    three-state: ``d_scale``, ``bias2``) and ``k`` the compute-type scalars named by :data:`K_FIELDS`.

    Example:
        >>> from ftmlopt.kernels import cpu
        >>> callable(cpu.kernel(cpu.Spec("compact", "float32", "float32")))
        True
    """
    if not AVAILABLE:
        raise ImportError("the CPU kernels need llvmlite >= 0.44: pip install 'ftmlopt[cpu]'")
    fn = _KERNELS.get(spec)
    if fn is None:
        with _ENGINE_LOCK:
            fn = _KERNELS.get(spec)
            if fn is None:
                fn = _KERNELS[spec] = _compile(spec)
    return fn


def assembly(spec: Spec) -> str:
    """The x86 (or host) assembly of ``spec``'s kernel, to check vectorization by eye."""
    return str(_target_machine().emit_assembly(_module(_codegen(spec))))


_COUNTERS: dict[str, Callable[..., None]] = {}
_COUNTER_SIGNATURE = ctypes.CFUNCTYPE(None, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_double)


def _counter_ir(dtype: str) -> str:
    assert _LLVM is not None
    ir = _LLVM[1]
    i64, f64 = ir.IntType(64), ir.DoubleType()
    ty = f64 if dtype == "float64" else ir.FloatType()
    module = ir.Module(name=f"ftml_counters_{dtype}")
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [i64, i64.as_pointer(), f64.as_pointer(), f64]), "run")
    n, ptrs, out, inc = fn.args
    b = ir.IRBuilder(fn.append_basic_block("e"))
    with _loop(b, n, ("b", "x")) as i:
        ptr = b.inttoptr(b.load(b.gep(ptrs, [i])), ty.as_pointer())
        add = inc if ty == f64 else b.fptrunc(inc, ty)
        value = b.fadd(b.load(ptr), add)
        b.store(value, ptr)
        b.store(value if ty == f64 else b.fpext(value, f64), b.gep(out, [i]))
    b.ret_void()
    return str(module)


def bump_counters(addresses: np.ndarray, dtype: str, increment: float = 1.0) -> np.ndarray:
    """Add ``increment`` to one-element step counters (float32/float64) at ``addresses``; return them as float64.

    One call for thousands of counters (``torch._foreach_add_`` on 0-dim tensors costs microseconds each).

    Example:
        >>> import numpy as np
        >>> from ftmlopt.kernels import cpu
        >>> steps = np.array([0.0, 4.0], dtype=np.float32)
        >>> addresses = np.array([steps.ctypes.data, steps.ctypes.data + 4], dtype=np.int64)
        >>> cpu.bump_counters(addresses, "float32").tolist()
        [1.0, 5.0]
    """
    fn = counter_kernel(dtype)
    addresses = np.ascontiguousarray(addresses, dtype=np.int64)
    out = np.empty(addresses.size, dtype=np.float64)
    fn(addresses.size, addresses.ctypes.data, out.ctypes.data, float(increment))
    return out


def counter_kernel(dtype: str) -> Callable[..., None]:
    """The compiled ``run(n, addresses, out, increment)`` behind :func:`bump_counters` (``dtype``: float32/64).

    For callers that keep their address and output arrays between calls (their ``ctypes.data``
    taken once).
    """
    fn = _COUNTERS.get(dtype)
    if fn is None:
        if not AVAILABLE:
            kernel(Spec("compact", "float32", "float32"))  # raises ImportError, naming what to install
        with _ENGINE_LOCK:
            fn = _COUNTERS.get(dtype)
            if fn is None:
                fn = _COUNTERS[dtype] = _COUNTER_SIGNATURE(_jit(_counter_ir(dtype), optimize=False))
    return fn


# ============================================================================ threads
_POOL: list[ThreadPoolExecutor] = []
_POOL_LOCK = threading.Lock()
_POOL_PID = [0]


def default_threads() -> int:
    """Threads for a step when the caller names none: torch's setting when torch is loaded, else
    ``OMP_NUM_THREADS`` when set, else the CPUs this process may run on.

    Example:
        >>> from ftmlopt.kernels import cpu
        >>> cpu.default_threads() >= 1
        True
    """
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_num_threads"):
        return max(1, int(torch.get_num_threads()))
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _pool(workers: int) -> ThreadPoolExecutor:
    with _POOL_LOCK:
        if _POOL and _POOL_PID[0] != os.getpid():  # a forked child: the parent's worker threads are not here
            _POOL.clear()
        if not _POOL or _POOL[0]._max_workers < workers:
            if _POOL:
                _POOL.pop().shutdown(wait=False)
            _POOL.append(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ftmlopt-cpu"))
            _POOL_PID[0] = os.getpid()
        return _POOL[0]


def _split(counts: np.ndarray, threads: int) -> list[int]:
    """Boundaries (piece indices) of ``threads`` runs of pieces with about equal elements."""
    cum = np.cumsum(counts)
    targets = cum[-1] * np.arange(1, threads) / threads
    cuts = np.searchsorted(cum, targets, side="left") + 1
    return [0, *sorted(set(np.minimum(cuts, counts.size).tolist())), counts.size]


def backend() -> str:
    """Where a multi-threaded step runs now: ``"openmp"`` (torch's own OpenMP team, GNU libgomp) or
    ``"pool"`` (this module's private workers: torch not loaded, another OpenMP runtime, a forked child).

    Example:
        >>> from ftmlopt.kernels import cpu
        >>> cpu.backend() in ("openmp", "pool")
        True
    """
    return "pool" if omp_team.team() is None else "openmp"


def run(
    fn: Callable[..., None], ptrs: np.ndarray, counts: np.ndarray, coefs: np.ndarray, k: np.ndarray, threads: int,
    *, trace: np.ndarray | None = None,
) -> None:
    """Call kernel ``fn`` over the pieces, on up to ``threads`` threads (the caller's is one of them).

    Pieces are dealt out in contiguous runs of about equal size; large tensors should already be
    cut (see :func:`pieces`). The arrays must be C-contiguous (int64, int64, compute dtype x2).
    The threads are torch's OpenMP team when :func:`backend` says ``"openmp"``, else a private
    pool. ``trace`` (int64, ``3 * threads`` entries) records, on the OpenMP path only, each
    member's thread number, team size and native thread id (see :func:`omp_team.launch`).
    """
    total = int(counts.sum())
    if threads <= 1 or total < PARALLEL_MIN or counts.size == 1:
        fn(counts.size, ptrs.ctypes.data, counts.ctypes.data, coefs.ctypes.data, k.ctypes.data)
        return
    team = omp_team.team()
    if team is not None:
        omp_team.launch(team, fn, ptrs, counts, coefs, k, threads, trace)
        return
    bounds = _split(counts, threads)
    item = coefs.itemsize
    calls = [
        (hi - lo, ptrs.ctypes.data + 48 * lo, counts.ctypes.data + 8 * lo, coefs.ctypes.data + 2 * item * lo,
         k.ctypes.data)
        for lo, hi in itertools.pairwise(bounds) if hi > lo
    ]
    if len(calls) == 1:
        fn(*calls[0])
        return
    pool = _pool(len(calls) - 1)
    futures: list[Future[None]] = [pool.submit(fn, *c) for c in calls[1:]]
    fn(*calls[0])
    for f in futures:
        f.result()


_run_pieces = run  # what Prepared falls back to (bound here: a spy on cpu.run sees only direct calls)


class Prepared:
    """A kernel call over pieces whose arrays stay put between calls: :func:`run` with the addresses taken once.

    ``ptrs`` and ``counts`` are :func:`pieces`' (or a kernel family's own cutting), ``owner`` the
    index of each piece's tensor. The call owns its per-piece coefficients (``coefs``, two per
    piece) and scalars (``k``, :data:`K_FIELDS`) in the compute ``dtype``; the caller fills them
    before each call (:meth:`set_coefs`, ``k[:] = ...``). :meth:`point` moves an address column to
    other tensors of the same sizes (new gradients each step), :meth:`set_column` writes a
    per-tensor value into every piece of a column. ``prepared(threads)`` runs on ``threads``
    threads exactly as :func:`run` would (torch's OpenMP team, else the pool).

    Example:
        >>> import numpy as np
        >>> from ftmlopt import rule
        >>> from ftmlopt.kernels import cpu
        >>> w, g, v = np.ones(4, np.float32), np.full(4, 0.5, np.float32), np.zeros(4, np.float32)
        >>> row = [w.ctypes.data, g.ctypes.data, v.ctypes.data, v.ctypes.data, v.ctypes.data, w.ctypes.data]
        >>> call = cpu.Prepared(cpu.kernel(cpu.Spec("compact", "float32", "float32")), np.array([row]),
        ...                     np.array([4]), np.array([0]), np.float32, tracked={1: (g.ctypes.data,)})
        >>> c = rule.constants(0.1, 1, 0.6, 0.999, 1e-8)
        >>> call.set_coefs((c.step_size, c.bias2_rsqrt))
        >>> call.k[:] = cpu.k_vector(c, np.float32)
        >>> call(1)
        >>> [round(float(x), 6) for x in w]
        [0.9, 0.9, 0.9, 0.9]
    """

    __slots__ = ("_args", "_offsets", "_omp", "_pointed", "_total", "coefs", "counts", "fn", "k", "owner", "ptrs")

    def __init__(self, fn: Callable[..., None], ptrs: np.ndarray, counts: np.ndarray, owner: np.ndarray,
                 dtype: Any, *, tracked: Mapping[int, tuple[int, ...]] | None = None) -> None:
        """``tracked``: for each address column :meth:`point` may move, the addresses ``ptrs`` was built with."""
        self.fn = fn
        self.ptrs = np.array(ptrs, dtype=np.int64, order="C")  # its own copy: point() and set_column() write it
        self.counts = np.ascontiguousarray(counts, dtype=np.int64)
        self.owner = np.asarray(owner, dtype=np.intp)
        self.coefs = np.zeros((self.counts.size, 2), dtype=dtype)
        self.k = np.zeros(len(K_FIELDS), dtype=dtype)
        tracked = dict(tracked or {})
        self._pointed = tracked
        # each piece's byte offset inside its tensor, per tracked column
        self._offsets = {col: self.ptrs[:, col] - np.array(addresses, dtype=np.int64)[self.owner]
                         for col, addresses in tracked.items()}
        self._args = (self.counts.size, self.ptrs.ctypes.data, self.counts.ctypes.data, self.coefs.ctypes.data,
                      self.k.ctypes.data)
        self._total = int(self.counts.sum())
        self._omp: tuple[Any, np.ndarray, int] | None = None  # (team, data block, its address)

    def point(self, col: int, addresses: tuple[int, ...]) -> None:
        """Point address column ``col`` at the tensors at ``addresses`` (same sizes as before); no-op if unmoved."""
        if addresses != self._pointed[col]:
            self.ptrs[:, col] = np.array(addresses, dtype=np.int64)[self.owner] + self._offsets[col]
            self._pointed[col] = addresses

    def set_column(self, col: int, values: np.ndarray) -> None:
        """Write each tensor's ``values[i]`` into column ``col`` of all its pieces."""
        self.ptrs[:, col] = values[self.owner]

    def set_coefs(self, per: Any) -> None:
        """The per-piece coefficients: one pair for every piece, or an ``(n_tensors, 2)`` array."""
        # rounded once to the dtype; a pair of Python floats (the usual case) without NumPy's shape inspection
        pair = type(per) is tuple and len(per) == 2 and type(per[0]) is float
        self.coefs[:] = per if pair or np.ndim(per) == 1 else np.asarray(per)[self.owner]

    def __call__(self, threads: int, *, trace: np.ndarray | None = None) -> None:
        """Run the call on up to ``threads`` threads; ``trace`` as in :func:`run` (OpenMP path only)."""
        if threads <= 1 or self._total < PARALLEL_MIN or self.counts.size == 1:
            self.fn(*self._args)
            return
        team = omp_team.team()
        if team is None or trace is not None:
            _run_pieces(self.fn, self.ptrs, self.counts, self.coefs, self.k, threads, trace=trace)
            return
        omp = self._omp
        if omp is None or omp[0] is not team:
            data = omp_team.prepare(team, self.fn, self.ptrs, self.counts, self.coefs, self.k)
            omp = self._omp = (team, data, data.ctypes.data)
        team.parallel(omp_team.body_address(), omp[2], threads, 0)


def pieces(addresses: np.ndarray, sizes: np.ndarray, itemsizes: Sequence[int], per: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut tensors into pieces of at most :data:`CHUNK` elements.

    ``addresses`` is ``(n, 6)`` int64 (w, g, d, v, z, out), ``sizes`` ``(n,)``, ``itemsizes`` the
    six element sizes in bytes, ``per`` ``(n, 2)`` per-tensor coefficients. Returns the
    ``(ptrs, counts, coefs)`` arrays :func:`run` takes.
    """
    n_chunks = np.maximum((sizes + CHUNK - 1) // CHUNK, 1)
    if (n_chunks == 1).all():
        return np.ascontiguousarray(addresses), np.ascontiguousarray(sizes), np.ascontiguousarray(per)
    owner = np.repeat(np.arange(sizes.size), n_chunks)
    first = np.arange(owner.size) - np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
    start = first * CHUNK
    counts = np.minimum(sizes[owner] - start, CHUNK)
    ptrs = addresses[owner] + start[:, None] * np.asarray(itemsizes, dtype=np.int64)[None, :]
    return np.ascontiguousarray(ptrs), counts.astype(np.int64), np.ascontiguousarray(per[owner])


# ============================================================================ entry points
def k_vector(c: rule.Constants, dtype: Any, *, scale: Any = 1.0) -> np.ndarray:
    """The :data:`K_FIELDS` scalars of ``c`` rounded once to ``dtype`` (off options: harmless values).

    The rounding is :meth:`ftmlopt.rule.Constants.cast` (exact when ``c`` is already in ``dtype``).
    """
    ct = np.dtype(dtype).type
    with np.errstate(over="ignore"):  # constants no kernel reads (d_scale at a tiny lr) may overflow
        c = c.cast(ct)
    values = {
        "beta1": c.beta1, "one_minus_beta1": c.one_minus_beta1, "beta2": c.beta2,
        "one_minus_beta2": c.one_minus_beta2, "eps": c.eps, "wd": ct(0) if c.wd is None else c.wd,
        "clip": ct(np.inf) if c.clip is None else c.clip, "scale": ct(scale),
        "decay": ct(1) if c.decay is None else c.decay,
    }
    return np.array([values[f] for f in K_FIELDS], dtype=ct)

def step_arrays(
    ws: Sequence[np.ndarray],
    gs: Sequence[np.ndarray],
    vs: Sequence[np.ndarray],
    c: rule.Constants,
    *,
    compact: bool,
    ds: Sequence[np.ndarray] = (),
    zs: Sequence[np.ndarray] = (),
    threads: int | None = None,
) -> None:
    """One step of the rule on NumPy arrays, in place (all C-contiguous, one dtype: float32/float64).

    ``c`` comes from :func:`ftmlopt.rule.constants` (``grad_scale`` multiplies, as in the rule).
    This is the readable entry point the tests use to hold the kernels to the rule.
    """
    dtype = ws[0].dtype
    spec = Spec(
        "compact" if compact else "mxnet", dtype.name, vs[0].dtype.name, maximize=c.sign < 0,
        coupled_wd=c.wd is not None, decoupled_wd=c.decay is not None, clip=c.clip is not None,
    )
    ct = np.dtype(spec.compute)
    k = k_vector(c, ct)
    if c.grad_scale is not None:  # the rule multiplies: fold it into the gradient first, as it does
        gs = [np.multiply(g, np.asarray(c.grad_scale, dtype=g.dtype)) for g in gs]
    n = len(ws)
    rows = [ws, gs, vs if compact else ds, vs, vs if compact else zs, ws]
    addresses = np.array([[a.ctypes.data for a in row] for row in rows], dtype=np.int64).T
    sizes = np.array([a.size for a in ws], dtype=np.int64)
    pair = (c.step_size, c.bias2_rsqrt) if compact else (c.d_scale, c.bias2)
    per = np.tile(np.array(pair, dtype=np.float64).astype(ct), (n, 1))
    itemsizes = [a[0].itemsize for a in rows]
    ptrs, counts, coefs = pieces(addresses, sizes, itemsizes, per)
    run(kernel(spec), ptrs, counts, coefs, k, default_threads() if threads is None else threads)

