r"""The benchmark's traffic floors: kernels that move exactly an optimizer's bytes and compute nothing.

A floor reads and writes the same arrays as the step it stands for (FTML three-state: read
``w, g, d, v, z``, write ``w, d, v, z``; compact: read ``w, g, v``, write ``w, v``), on the same
threads, with the same pieces and the same vectorized loop shape as the real kernel, so
``floor time / step time`` says how close a step is to the memory limit. Each written element is
``old ^ (other & mask)`` with a runtime ``mask`` of 0: nothing changes, nothing can be folded away.

* CPU: LLVM IR compiled through llvmlite and run by :func:`ftmlopt.kernels.cpu.run` (the fused
  step's threads: torch's OpenMP team where there is one, ``torch.get_num_threads()`` of them);
* CUDA: a Triton kernel over the fused step's chunk tables.

Example:
    >>> import numpy as np
    >>> from ftmlopt.bench import floors
    >>> arrays = [np.full(4, float(k), np.float32) for k in range(5)]  # w, g, d, v, z
    >>> floors.cpu_available()  # llvmlite is installed ('ftmlopt[cpu]')
    True
    >>> floors.cpu_floor(arrays[:1], arrays[1:2], arrays[2:3], arrays[3:4], arrays[4:5], threads=1)
    >>> [float(a[0]) for a in arrays]  # moved, not changed
    [0.0, 1.0, 2.0, 3.0, 4.0]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["cpu_available", "cpu_floor", "cuda_floor"]

_CPU: dict[tuple[int, int, str], Callable[..., None]] = {}
_STATES = {"three": (2, 3, 4), "compact": (3,), "adam": (2, 3)}  # which of d, v, z are read and written
_KEEP: list[Any] = []


def cpu_available() -> bool:
    """Whether the CPU floor can be compiled here (the fused CPU kernels' requirement)."""
    from ftmlopt.kernels import cpu

    return cpu.AVAILABLE


def _ir(p_bytes: int, s_bytes: int, form: str) -> str:
    import llvmlite.ir as ir  # type: ignore[import-untyped]

    i64 = ir.IntType(64)
    pt, st = ir.IntType(8 * p_bytes), ir.IntType(8 * s_bytes)
    module = ir.Module(name="floor")
    vp = i64.as_pointer()
    # run(n_pieces, ptrs[6 per piece], counts, coefs (unused), mask): the fused kernels' signature
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [i64, vp, vp, vp, vp]), "run")
    piece = ir.Function(module, ir.FunctionType(ir.VoidType(), [pt.as_pointer(), pt.as_pointer(), st.as_pointer(),
                                                                st.as_pointer(), st.as_pointer(), i64, i64]),
                        "piece")
    piece.linkage = "internal"
    for a in piece.args[:5]:
        a.add_attribute("noalias")
    w, g, _d, _v, _z, n, mask = piece.args
    entry, loop, done = piece.append_basic_block("e"), piece.append_basic_block("l"), piece.append_basic_block("d")
    b = ir.IRBuilder(entry)
    b.cbranch(b.icmp_signed(">", n, i64(0)), loop, done)
    b.position_at_end(loop)
    j = b.phi(i64)
    j.add_incoming(i64(0), entry)
    pm, sm = b.trunc(mask, pt), b.trunc(mask, st)
    gw = b.and_(b.load(b.gep(g, [j])), pm)
    b.store(b.xor(b.load(b.gep(w, [j])), gw), b.gep(w, [j]))
    for arr in (piece.args[i] for i in _STATES[form]):
        b.store(b.xor(b.load(b.gep(arr, [j])), sm), b.gep(arr, [j]))
    nxt = b.add(j, i64(1))
    j.add_incoming(nxt, b.block)
    b.cbranch(b.icmp_signed("<", nxt, n), loop, done)
    b.position_at_end(done)
    b.ret_void()

    n_pieces, ptrs, counts, _coefs, maskp = fn.args
    entry, body, end = fn.append_basic_block("e"), fn.append_basic_block("b"), fn.append_basic_block("x")
    b = ir.IRBuilder(entry)
    m = b.load(maskp)
    b.cbranch(b.icmp_signed(">", n_pieces, i64(0)), body, end)
    b.position_at_end(body)
    p = b.phi(i64)
    p.add_incoming(i64(0), entry)
    base = b.mul(p, i64(6))
    args = [b.inttoptr(b.load(b.gep(ptrs, [b.add(base, i64(r))])), ty.as_pointer())
            for r, ty in enumerate((pt, pt, st, st, st))]
    b.call(piece, [*args, b.load(b.gep(counts, [p])), m])
    nxt = b.add(p, i64(1))
    p.add_incoming(nxt, b.block)
    b.cbranch(b.icmp_signed("<", nxt, n_pieces), body, end)
    b.position_at_end(end)
    b.ret_void()
    return str(module)


def _cpu_kernel(p_bytes: int, s_bytes: int, form: str) -> Callable[..., None]:
    import ctypes

    import llvmlite.binding as llvm  # type: ignore[import-untyped]

    from ftmlopt.kernels import cpu

    key = (p_bytes, s_bytes, form)
    if key not in _CPU:
        tm = cpu._target_machine()
        mod = llvm.parse_assembly(_ir(p_bytes, s_bytes, form))
        mod.triple = tm.triple
        mod.data_layout = str(tm.target_data)
        pto = llvm.create_pipeline_tuning_options(speed_level=3)
        pto.loop_vectorization = True
        builder = llvm.create_pass_builder(tm, pto)
        builder.getModulePassManager().run(mod, builder)
        engine = llvm.create_mcjit_compiler(mod, tm)
        engine.finalize_object()
        _KEEP.append(engine)
        sig = ctypes.CFUNCTYPE(None, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_void_p)
        _CPU[key] = sig(engine.get_function_address("run"))
    return _CPU[key]


def cpu_floor(
    ws: Sequence[Any], gs: Sequence[Any], ds: Sequence[Any], vs: Sequence[Any], zs: Sequence[Any], *,
    threads: int, form: str = "three",
) -> None:
    """Move one step's bytes once over NumPy arrays or CPU tensors (see :func:`cpu_floor_step`)."""
    cpu_floor_step(ws, gs, ds, vs, zs, threads=threads, form=form)()


def _address(a: Any) -> int:
    return int(a.ctypes.data) if isinstance(a, np.ndarray) else int(a.data_ptr())


def _itemsize(a: Any) -> int:
    return int(a.itemsize) if isinstance(a, np.ndarray) else int(a.element_size())


def _size(a: Any) -> int:
    return int(a.size) if isinstance(a, np.ndarray) else int(a.numel())


def cpu_floor_step(
    ws: Sequence[Any], gs: Sequence[Any], ds: Sequence[Any], vs: Sequence[Any], zs: Sequence[Any], *,
    threads: int | Callable[[], int], form: str = "three",
) -> Callable[[], None]:
    """A callable that runs the CPU floor over these arrays (the address table is built once).

    ``form``: ``"three"`` (FTML's three states: d, v, z read and written), ``"compact"`` (v only;
    ``ds``/``zs`` ignored) or ``"adam"`` (d and v stand for Adam's m and v; ``zs`` ignored).
    ``threads`` may be a callable read at each step (``torch.get_num_threads``).
    """
    from ftmlopt.kernels import cpu

    if form not in _STATES:
        raise ValueError(f"form must be one of {sorted(_STATES)}, got {form!r}")
    if form != "three":
        zs = vs
    if form == "compact":
        ds = vs
    p_bytes, s_bytes = _itemsize(ws[0]), _itemsize(vs[0])
    fn = _cpu_kernel(p_bytes, s_bytes, form)
    rows = [ws, gs, ds, vs, zs, ws]
    addresses = np.array([[_address(a) for a in row] for row in rows], dtype=np.int64).T.copy()
    sizes = np.array([_size(a) for a in ws], dtype=np.int64)
    per = np.zeros((len(ws), 2), dtype=np.int64)
    ptrs, counts, coefs = cpu.pieces(addresses, sizes, [p_bytes, p_bytes, s_bytes, s_bytes, s_bytes, p_bytes], per)
    mask = np.zeros(1, dtype=np.int64)
    keep = (ws, gs, ds, vs, zs)  # the table holds raw addresses: keep the arrays alive with it

    def step() -> None:
        assert keep
        cpu.run(fn, ptrs, counts, coefs, mask, threads() if callable(threads) else threads)

    return step


_CUDA: dict[str, Any] = {}


def cuda_floor(lists: list[list[Any]], compact: bool = False) -> Callable[[], None]:
    """A callable that moves one FTML step's bytes on CUDA in one Triton launch (``lists``: w, g, d, v, z).

    Example:
        >>> import torch  # doctest: +SKIP
        >>> arrays = [[torch.full((4,), float(k), device="cuda")] for k in range(5)]  # doctest: +SKIP
        >>> cuda_floor(arrays)()  # doctest: +SKIP
    """
    import torch

    from ftmlopt.kernels import triton_cuda

    if not _CUDA:
        import triton
        import triton.language as tl

        @triton.jit
        def floor_kernel(table, sizes, chunk_tensor, chunk_start, n_tensors, p_like, s_like,  # type: ignore[no-untyped-def]
                         COMPACT: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
            c = tl.program_id(0)
            i = tl.load(chunk_tensor + c)
            lo = tl.multiple_of(tl.load(chunk_start + c), CHUNK)
            n = tl.load(sizes + i)
            w_ptr = tl.load(table + i).to(p_like.dtype)
            g_ptr = tl.load(table + n_tensors + i).to(p_like.dtype)
            d_ptr = tl.load(table + 2 * n_tensors + i).to(s_like.dtype)
            v_ptr = tl.load(table + 3 * n_tensors + i).to(s_like.dtype)
            z_ptr = tl.load(table + 4 * n_tensors + i).to(s_like.dtype)
            for off in tl.range(0, CHUNK, BLOCK):
                offs = lo + off + tl.arange(0, BLOCK)
                m = offs < n
                g = tl.load(g_ptr + offs, mask=m)
                tl.store(w_ptr + offs, tl.where(g != g, g, tl.load(w_ptr + offs, mask=m)), mask=m)  # w unless NaN
                if COMPACT:
                    tl.store(v_ptr + offs, tl.load(v_ptr + offs, mask=m) + 0.0, mask=m)
                else:
                    old_d = tl.load(d_ptr + offs, mask=m)
                    tl.store(d_ptr + offs, tl.load(v_ptr + offs, mask=m), mask=m)
                    tl.store(v_ptr + offs, tl.load(z_ptr + offs, mask=m), mask=m)
                    tl.store(z_ptr + offs, old_d, mask=m)

        _CUDA["kernel"] = floor_kernel
    kernel = _CUDA["kernel"]
    device = lists[0][0].device
    w, g, d, v, z = lists
    if compact:
        d = z = v
    table, sizes, chunk_tensor, chunk_start, _aligned = triton_cuda._tables([*map(list, (w, g, d, v, z)),
                                                                             [None] * len(w)], device)
    likes = [torch.empty(0, dtype=w[0].dtype, device=device), torch.empty(0, dtype=v[0].dtype, device=device)]

    def step() -> None:
        kernel[(chunk_tensor.numel(),)](table, sizes, chunk_tensor, chunk_start, sizes.numel(), *likes,
                                        COMPACT=compact, CHUNK=triton_cuda.CHUNK, BLOCK=triton_cuda.BLOCK)

    return step
