r"""Run a CPU kernel's pieces on torch's own OpenMP team (GNU libgomp's ``GOMP_parallel``).

ATen runs its parallel loops on one OpenMP team; with torch's wheels that is GNU libgomp
(``torch/lib/libgomp.so.1``), and ``at::parallel_for`` is ``GOMP_parallel`` underneath. After
each op the team's threads keep spinning on the cores for a while, so a kernel with a thread pool
of its own competes with them. This module hands the kernel to the **same** team instead:

* :func:`team` finds the runtime ATen is bound to: ``torch`` must be imported, its
  ``parallel_info()`` must name the OpenMP backend, and ``GOMP_parallel``,
  ``omp_get_thread_num`` and ``omp_get_num_threads`` are looked up the way the dynamic linker
  binds them for ``libtorch_cpu`` (the global scope first, then the library's own dependencies);
  all three must come from one loaded file named ``libgomp*`` (``dladdr``). Any other answer (no
  torch, LLVM's ``libomp`` or Intel's ``libiomp5``, which also export ``GOMP_*``, a TBB/native
  backend, no ``dladdr``) gives ``None`` and the caller falls back to its own pool.
  A forked child gets ``None`` too: GNU libgomp is not fork-safe (its pool still lists the
  parent's threads, which do not exist in the child, and the next parallel region waits for them).
* :func:`launch` calls ``GOMP_parallel(body, data, threads, 0)`` through ctypes (the GIL is
  released), where ``body`` is a tiny function compiled once here: each member reads
  ``omp_get_thread_num()`` / ``omp_get_num_threads()``, takes the pieces whose first element
  falls into its ``1/n`` share of all elements, and calls the kernel's ``run`` on them. Nothing is
  set: no ``omp_set_num_threads``, no environment; the thread count is passed per call.

Example:
    >>> import torch
    >>> from ftmlopt.kernels import omp_team
    >>> team = omp_team.team()  # torch's wheels: ATen's torch/lib/libgomp.so.1; else None
    >>> team is None or omp_team.is_gnu_libgomp(team.path)
    True
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from typing import Any, NamedTuple

import numpy as np

__all__ = ["Team", "body_address", "is_gnu_libgomp", "launch", "prepare", "team"]

#: slots of the int64 ``data`` block the body reads, in this order
SLOTS = ("kernel", "n_pieces", "ptrs", "counts", "coefs", "k", "coef_bytes", "thread_num", "num_threads", "trace",
         "gettid")


class Team(NamedTuple):
    """The OpenMP runtime ATen is bound to, as addresses: what :func:`launch` needs."""

    path: str
    parallel: Any  # ctypes function GOMP_parallel(fn, data, num_threads, flags)
    thread_num: int
    num_threads: int
    gettid: int  # libc's gettid (0 when absent): only used to trace


_LOCK = threading.Lock()
_CACHE: dict[int, Team | None] = {}  # pid -> the answer, once torch is loaded
_FORKED = [False]
_BODY: list[Any] = []  # [engine, address]


def _after_fork_in_child() -> None:
    _FORKED[0] = True
    _CACHE.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def is_gnu_libgomp(path: str) -> bool:
    """Whether a shared library path names GNU's OpenMP runtime (``libgomp.so.1``, ``libgomp-<hash>.so.1``).

    LLVM's ``libomp`` and Intel's ``libiomp5`` export ``GOMP_*`` entry points too, but run their
    own teams: they are not what this module looks for.

    Example:
        >>> from ftmlopt.kernels.omp_team import is_gnu_libgomp
        >>> [is_gnu_libgomp(p) for p in ("/x/torch/lib/libgomp.so.1", "/y/libgomp-a34b3233.so.1", "/z/libomp.so")]
        [True, True, False]
    """
    return os.path.basename(path).startswith("libgomp")


class _DlInfo(ctypes.Structure):
    _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p), ("sname", ctypes.c_char_p),
                ("saddr", ctypes.c_void_p)]


def _library_of(libc: Any, address: int) -> str | None:
    """The file of the loaded library that holds ``address`` (``dladdr``), or None."""
    info = _DlInfo()
    dladdr = libc.dladdr
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    dladdr.restype = ctypes.c_int
    if not dladdr(address, ctypes.byref(info)) or not info.fname:
        return None
    return os.fsdecode(info.fname)


def _find() -> Team | None:
    torch = sys.modules.get("torch")
    config = getattr(torch, "__config__", None)
    if config is None:
        return None
    try:
        if "ATen parallel backend: OpenMP" not in config.parallel_info():
            return None
    except Exception:  # a torch without parallel_info: not one we know
        return None
    try:  # ATen's library, already loaded (matched by its soname; never loaded here)
        scopes = [ctypes.CDLL(None), ctypes.CDLL("libtorch_cpu.so", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)]
        scopes[0].dladdr  # noqa: B018 - raises AttributeError where there is none
    except (OSError, AttributeError):
        return None
    addresses = {}
    for name in ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads"):
        for scope in scopes:  # the dynamic linker binds libtorch_cpu's references: global scope first
            fn = getattr(scope, name, None)
            if fn is not None:
                addresses[name] = ctypes.cast(fn, ctypes.c_void_p).value or 0
                break
        else:
            return None
    owners = {_library_of(scopes[0], a) for a in addresses.values()}
    if len(owners) != 1:
        return None
    path = owners.pop()
    if path is None or not is_gnu_libgomp(path):
        return None
    parallel = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint)(
        addresses["GOMP_parallel"])
    gettid = getattr(scopes[0], "gettid", None)
    gettid_address = (ctypes.cast(gettid, ctypes.c_void_p).value or 0) if gettid is not None else 0
    return Team(path, parallel, addresses["omp_get_thread_num"], addresses["omp_get_num_threads"], gettid_address)


def team() -> Team | None:
    """torch's OpenMP team when the kernels can run on it, else None (see the module docstring).

    Decided once per process after torch is imported (about a millisecond).
    """
    if _FORKED[0]:
        return None
    pid = os.getpid()
    found = _CACHE.get(pid, False)
    if found is not False:
        return found  # type: ignore[return-value]
    if "torch" not in sys.modules:
        return None  # not cached: torch may be imported later
    with _LOCK:
        if pid not in _CACHE:
            _CACHE.clear()  # another pid's answer (fork without the hook, e.g. from C) is not ours
            _CACHE[pid] = _find()
        return _CACHE[pid]


def _body_ir(llvm_ir: Any) -> str:
    """LLVM IR of ``body(data)``: one team member's share of a kernel's pieces (see :data:`SLOTS`)."""
    ir = llvm_ir
    i32, i64 = ir.IntType(32), ir.IntType(64)
    vp = i64.as_pointer()
    module = ir.Module(name="ftml_omp_body")
    body = ir.Function(module, ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer()]), "body")
    kernel_ty = ir.FunctionType(ir.VoidType(), [i64] * 5)  # run(n, ptrs, counts, coefs, k): all integer registers
    int_ty = ir.FunctionType(i32, [])
    blocks = {name: body.append_basic_block(name) for name in
              ("entry", "trace", "tid", "work", "sum", "split", "scan", "check", "go", "exit")}
    b = ir.IRBuilder(blocks["entry"])
    slots = b.bitcast(body.args[0], vp)
    kernel, n, ptrs, counts, coefs, k, coef_bytes, f_tid, f_nth, trace, f_gettid = (
        b.load(b.gep(slots, [i64(i)])) for i in range(len(SLOTS)))
    tid = b.sext(b.call(b.inttoptr(f_tid, int_ty.as_pointer()), []), i64)
    nth = b.sext(b.call(b.inttoptr(f_nth, int_ty.as_pointer()), []), i64)
    b.cbranch(b.icmp_unsigned("!=", trace, i64(0)), blocks["trace"], blocks["work"])

    b.position_at_end(blocks["trace"])  # trace[3 * tid + (0, 1, 2)] = tid, team size, native thread id
    row = b.gep(b.inttoptr(trace, vp), [b.mul(tid, i64(3))])
    b.store(tid, row)
    b.store(nth, b.gep(row, [i64(1)]))
    b.cbranch(b.icmp_unsigned("!=", f_gettid, i64(0)), blocks["tid"], blocks["work"])
    b.position_at_end(blocks["tid"])
    b.store(b.sext(b.call(b.inttoptr(f_gettid, int_ty.as_pointer()), []), i64), b.gep(row, [i64(2)]))
    b.branch(blocks["work"])

    b.position_at_end(blocks["work"])
    counts_p = b.inttoptr(counts, vp)
    b.cbranch(b.icmp_signed(">", n, i64(0)), blocks["sum"], blocks["exit"])

    b.position_at_end(blocks["sum"])  # total elements
    i = b.phi(i64)
    acc = b.phi(i64)
    i.add_incoming(i64(0), blocks["work"])
    acc.add_incoming(i64(0), blocks["work"])
    total = b.add(acc, b.load(b.gep(counts_p, [i])))
    i_next = b.add(i, i64(1))
    i.add_incoming(i_next, blocks["sum"])
    acc.add_incoming(total, blocks["sum"])
    b.cbranch(b.icmp_signed("<", i_next, n), blocks["sum"], blocks["split"])

    b.position_at_end(blocks["split"])  # this member's elements: [total*tid/nth, total*(tid+1)/nth)
    lo = b.sdiv(b.mul(total, tid), nth)
    hi = b.sdiv(b.mul(total, b.add(tid, i64(1))), nth)
    b.branch(blocks["scan"])

    b.position_at_end(blocks["scan"])  # its pieces: those whose first element falls in that range
    j, start, first, last = (b.phi(i64) for _ in range(4))
    for phi in (j, start, first, last):
        phi.add_incoming(i64(0), blocks["split"])
    first_next = b.add(first, b.zext(b.icmp_signed("<", start, lo), i64))
    last_next = b.add(last, b.zext(b.icmp_signed("<", start, hi), i64))
    start_next = b.add(start, b.load(b.gep(counts_p, [j])))
    j_next = b.add(j, i64(1))
    for phi, value in ((j, j_next), (start, start_next), (first, first_next), (last, last_next)):
        phi.add_incoming(value, blocks["scan"])
    b.cbranch(b.icmp_signed("<", j_next, n), blocks["scan"], blocks["check"])

    b.position_at_end(blocks["check"])
    b.cbranch(b.icmp_signed(">", last_next, first_next), blocks["go"], blocks["exit"])
    b.position_at_end(blocks["go"])
    b.call(b.inttoptr(kernel, kernel_ty.as_pointer()), [
        b.sub(last_next, first_next), b.add(ptrs, b.mul(first_next, i64(48))),
        b.add(counts, b.mul(first_next, i64(8))), b.add(coefs, b.mul(first_next, coef_bytes)), k])
    b.branch(blocks["exit"])
    b.position_at_end(blocks["exit"])
    b.ret_void()
    return str(module)


def _body() -> int:
    if not _BODY:
        import llvmlite.binding as llvm  # type: ignore[import-untyped]
        import llvmlite.ir as llvm_ir  # type: ignore[import-untyped]

        with _LOCK:
            if not _BODY:
                llvm.initialize_native_target()
                llvm.initialize_native_asmprinter()
                tm = llvm.Target.from_default_triple().create_target_machine(opt=2)
                mod = llvm.parse_assembly(_body_ir(llvm_ir))
                mod.triple = tm.triple
                mod.data_layout = str(tm.target_data)
                mod.verify()
                engine = llvm.create_mcjit_compiler(mod, tm)
                engine.finalize_object()
                _BODY.extend([engine, engine.get_function_address("body")])
    return int(_BODY[1])


def launch(team: Team, kernel: Any, ptrs: np.ndarray, counts: np.ndarray, coefs: np.ndarray, k: np.ndarray,
           threads: int, trace: np.ndarray | None = None) -> None:
    """Run ``kernel`` (a compiled ``run(n_pieces, ptrs, counts, coefs, k)``) over the pieces on ``team``.

    ``threads`` members are asked for (the team may be smaller, e.g. inside another parallel
    region: the body splits by the size it gets). ``trace``, when given, is an int64 array of at
    least ``3 * threads`` entries: member ``i`` writes ``i``, the team size and its native thread id
    (``threading.get_native_id`` numbering) into row ``i``.
    """
    if trace is not None and (trace.dtype != np.int64 or trace.size < 3 * threads or not trace.flags.c_contiguous):
        raise ValueError(f"trace must be a contiguous int64 array of >= {3 * threads} entries")
    data = prepare(team, kernel, ptrs, counts, coefs, k, trace)
    team.parallel(_body(), data.ctypes.data, threads, 0)


def prepare(team: Team, kernel: Any, ptrs: np.ndarray, counts: np.ndarray, coefs: np.ndarray, k: np.ndarray,
            trace: np.ndarray | None = None) -> np.ndarray:
    """The body's ``data`` block (:data:`SLOTS`) for these arrays: :func:`launch` without the call.

    A caller that steps the same arrays again and again (their contents change, not their
    addresses) keeps the block and calls ``team.parallel(body_address(), data.ctypes.data,
    threads, 0)``; the arrays must outlive it.
    """
    return np.array([
        ctypes.cast(kernel, ctypes.c_void_p).value, counts.size, ptrs.ctypes.data, counts.ctypes.data,
        coefs.ctypes.data, k.ctypes.data, 2 * coefs.itemsize, team.thread_num, team.num_threads,
        0 if trace is None else trace.ctypes.data, team.gettid,
    ], dtype=np.int64)


def body_address() -> int:
    """The address of the compiled team-member body :func:`launch` hands to ``GOMP_parallel``."""
    return _body()
