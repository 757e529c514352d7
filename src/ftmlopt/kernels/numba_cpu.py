r"""CPU FTML kernels compiled by Numba: one parallel pass, no temporaries, no fastmath.

Two kernels live here, each the single CPU definition of its arithmetic:

* :func:`operator_kernel` -- MXNet 1.9.1's ``ftml_update`` operator. It performs the same
  float operations in the same order as :func:`ftmlopt.mxnet.operator._numpy_kernel`, so its
  results are bit-identical to the NumPy path (and to MXNet). Numba is called without
  ``fastmath``, so LLVM may neither reassociate nor contract ``a*b + c`` into an FMA.
  :func:`ftmlopt.ftml_update` dispatches to it for C-contiguous float32/float64 arrays unless
  the environment variable ``FTMLOPT_DISABLE_NUMBA`` is set.
* :func:`multi_tensor_step` -- the torch-semantics step (``maximize``, ``grad_scale``, coupled
  or decoupled weight decay, clipping; the three-state or the compact form) over *many*
  tensors at once: it receives a table of raw addresses, so ``ftmlopt.torch.FTML(fused=True)``
  pays one Python call per (dtype) group, not one per tensor. The step counters (0-dim
  tensors) are incremented inside the kernel too.

Per element (``t`` is the tensor's step after the increment)::

    g  <- sign * g / grad_scale            (sign = -1 under maximize)
    w  <- (1 - lr*wd) w,  z <- (1 - lr*wd) z          if decoupled weight decay
    g  <- g + wd * w                                   otherwise
    g  <- clamp(g, -clip, clip)                        (NaN passes through)
    v  <- b2 v + (1 - b2) g^2
    three-state:  d_t = (1 - b1^t)/lr * (sqrt(v/(1 - b2^t)) + eps)
                  z  <- b1 z + (1 - b1) g - (d_t - b1 d) w ;  d <- d_t ;  w <- -z/d_t
    compact:      w  <- w - lr (1 - b1)/(1 - b1^t) * g / (sqrt(v/(1 - b2^t)) + eps)

Importing this module never fails: without Numba, :data:`AVAILABLE` is False and calling
a kernel raises :class:`ImportError`.

Example:
    >>> import numpy as np
    >>> from ftmlopt.mxnet.operator import prepare_scalars
    >>> from ftmlopt.kernels import numba_cpu
    >>> w = np.array([1.0, -2.0], dtype=np.float32)
    >>> g = np.array([0.5, 0.0], dtype=np.float32)
    >>> d, v, z = (np.zeros_like(w) for _ in range(3))
    >>> s = prepare_scalars(np.float32, 0.1, 1, 0.6, 0.999, 1e-8, 0.0, 1.0, -1.0)
    >>> new = numba_cpu.operator_kernel(w, g, d, v, z, None, s) if numba_cpu.AVAILABLE else np.float32([0.9, -2])
    >>> [round(float(x), 6) for x in new]  # each weight moves by about lr on the first step
    [0.9, -2.0]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ftmlopt.mxnet.operator import Scalars

__all__ = [
    "AVAILABLE", "HYPER_FIELDS", "LARGE_TENSOR", "PARALLEL_MIN", "floor_step", "multi_tensor_step", "operator_kernel",
]  # fmt: skip

try:
    import numba
    from numba import prange, types
    from numba.extending import intrinsic
except ImportError:  # the NumPy path of ftml_update takes over
    AVAILABLE = False
else:
    AVAILABLE = True

#: below this many elements a call runs on the calling thread only: waking worker threads costs
#: more than the work (and on a loaded machine a parallel region waits for every thread)
PARALLEL_MIN = 1 << 16

#: tensors of at least this many elements are split across threads (and vectorized) one by one;
#: smaller ones are spread over the threads a whole tensor at a time
LARGE_TENSOR = 1 << 15

#: order of the float64 ``hyper`` vector taken by :func:`multi_tensor_step`
HYPER_FIELDS = ("lr", "beta1", "beta2", "eps", "weight_decay", "clip", "grad_scale", "sign")


def _missing(*_args: Any, **_kwargs: Any) -> Any:
    raise ImportError("numba is not installed: pip install 'ftmlopt[numba]'")


def _threads_for(n_elements: int) -> int:
    """Threads to use for ``n_elements`` of work (1 when small); Numba's current setting otherwise."""
    return 1 if n_elements < PARALLEL_MIN else numba.get_num_threads()


def _call(kernel: Any, n_elements: int, *args: Any) -> None:
    """Run a parallel kernel, on one thread when the work is small (the setting is restored)."""
    threads = numba.get_num_threads()
    wanted = _threads_for(n_elements)
    if wanted == threads:
        kernel(*args)
        return
    numba.set_num_threads(wanted)
    try:
        kernel(*args)
    finally:
        numba.set_num_threads(threads)


if AVAILABLE:

    @intrinsic
    def _pointer(typingctx: Any, address: Any, like: Any) -> Any:
        """Reinterpret an integer address as a pointer to ``like``'s element type."""
        ptr_type = types.CPointer(like.dtype)
        sig = ptr_type(address, like)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.inttoptr(args[0], context.get_value_type(ptr_type))

        return sig, codegen

    @numba.njit(parallel=True, cache=True)
    def _operator_loop(w, g, d, v, z, out, wd, rescale, clip, use_clip, b1, omb1, b2, omb2, eps, d_scale, bias2):  # type: ignore[no-untyped-def]
        # Every line mirrors one ufunc call of _numpy_kernel, in the same order.
        for i in prange(w.size):
            wi = w[i]
            gp = g[i] * rescale
            gp = gp + wi * wd
            if use_clip:
                if gp > clip:
                    gp = clip
                elif gp < -clip:
                    gp = -clip
            vi = v[i] * b2
            vi = vi + (gp * gp) * omb2
            v[i] = vi
            dt = np.sqrt(vi / bias2)
            dt = dt + eps
            dt = dt * d_scale
            zi = z[i] * b1
            zi = zi + gp * omb1
            zi = zi - (dt - d[i] * b1) * wi
            z[i] = zi
            d[i] = dt
            out[i] = -zi / dt

    @numba.njit(parallel=True, cache=True)
    def _floor_tensor(w, g, d, v, z):  # type: ignore[no-untyped-def]
        # The traffic floor: read w, g, d, v, z; write w, d, v, z (a rotation: values stay bounded).
        for j in prange(w.size):
            old_d = d[j]
            w[j] = g[j]
            d[j] = v[j]
            v[j] = z[j]
            z[j] = old_d

    @numba.njit(cache=True)
    def _floor_loop(table, sizes, like):  # type: ignore[no-untyped-def]
        for i in range(sizes.size):
            n = sizes[i]
            w = numba.carray(_pointer(table[0, i], like), n)
            g = numba.carray(_pointer(table[1, i], like), n)
            d = numba.carray(_pointer(table[2, i], like), n)
            v = numba.carray(_pointer(table[3, i], like), n)
            z = numba.carray(_pointer(table[4, i], like), n)
            _floor_tensor(w, g, d, v, z)

    @numba.njit(cache=True)
    def _prepare(table, sizes, like, step_like, hyper, compact):  # type: ignore[no-untyped-def]
        """Increment every step; per-tensor constants and the shared scalars in the compute dtype."""
        n = sizes.size
        lr, b1, b2 = hyper[0], hyper[1], hyper[2]
        per = np.empty((n, 2), like.dtype)  # (d_t scale or compact step size, 1 - b2^t) per tensor
        for i in range(n):
            step = numba.carray(_pointer(table[5, i], step_like), 1)
            t = step[0] + 1
            step[0] = t
            c1 = 1.0 - b1 ** np.float64(t)
            per[i, 0] = lr * (1.0 - b1) / c1 if compact else c1 / lr
            per[i, 1] = 1.0 - b2 ** np.float64(t)
        k = np.empty(10, like.dtype)  # a store into a typed array rounds to the compute dtype
        k[0] = b1
        k[1] = 1.0 - b1
        k[2] = b2
        k[3] = 1.0 - b2
        k[4:9] = hyper[3:8]  # eps, weight decay, clip (inf: none), grad scale (1: none), sign
        k[9] = 1.0 - lr * hyper[4]  # decoupled decay factor
        return per, k

    @numba.njit(inline="always")  # inlined into the loops (a call would stop vectorization)
    def _element(g, w, d, v, z, coef, bias2, k, compact, coupled_wd, decoupled_wd, scaled):  # type: ignore[no-untyped-def]
        """The rule for one element: returns the new (w, d, v, z) and the unscaled gradient."""
        if scaled:  # a division per element costs real time here: only when there is a grad scale
            g = g / k[7]
        unscaled = g
        g = g * k[8]
        if decoupled_wd:
            w = w * k[9]
            z = z * k[9]
        if coupled_wd:
            g = g + k[5] * w
        g = k[6] if g > k[6] else g
        g = -k[6] if g < -k[6] else g
        v = k[2] * v + k[3] * (g * g)
        root = np.sqrt(v / bias2) + k[4]
        if compact:
            return w - coef * g / root, d, v, z, unscaled
        d_t = coef * root
        z = k[0] * z + k[1] * g - (d_t - k[0] * d) * w
        return -z / d_t, d_t, v, z, unscaled

    @numba.njit(parallel=True, cache=True)
    def _large_tensor(w, g, d, v, z, coef, bias2, k, compact, coupled_wd, decoupled_wd, write_grad):  # type: ignore[no-untyped-def]
        # One tensor, its elements split across threads. The arrays are arguments of the
        # parallel loop, so Numba marks them noalias and LLVM vectorizes the loop.
        for j in prange(w.size):
            dj = v[j] if compact else d[j]
            zj = v[j] if compact else z[j]
            nw, nd, nv, nz, ng = _element(g[j], w[j], dj, v[j], zj, coef, bias2, k, compact, coupled_wd, decoupled_wd,
                                          write_grad)  # fmt: skip
            w[j] = nw
            v[j] = nv
            if not compact:
                d[j] = nd
                z[j] = nz
            if write_grad:
                g[j] = ng

    @numba.njit(cache=True)
    def _large_tensors(table, sizes, like, per, k, which, compact, coupled_wd, decoupled_wd, write_grad):  # type: ignore[no-untyped-def]
        for i in which:
            n = sizes[i]
            w = numba.carray(_pointer(table[0, i], like), n)
            g = numba.carray(_pointer(table[1, i], like), n)
            v = numba.carray(_pointer(table[3, i], like), n)
            d = v if compact else numba.carray(_pointer(table[2, i], like), n)
            z = v if compact else numba.carray(_pointer(table[4, i], like), n)
            _large_tensor(w, g, d, v, z, per[i, 0], per[i, 1], k, compact, coupled_wd, decoupled_wd, write_grad)

    @numba.njit(parallel=True, cache=True)
    def _small_tensors(table, sizes, like, per, k, which, compact, coupled_wd, decoupled_wd, write_grad):  # type: ignore[no-untyped-def]
        # Many small tensors: one per work item (element loops too short to be worth splitting).
        for c in prange(which.size):
            i = which[c]
            n = sizes[i]
            w = numba.carray(_pointer(table[0, i], like), n)
            g = numba.carray(_pointer(table[1, i], like), n)
            v = numba.carray(_pointer(table[3, i], like), n)
            d = v if compact else numba.carray(_pointer(table[2, i], like), n)
            z = v if compact else numba.carray(_pointer(table[4, i], like), n)
            for j in range(n):
                nw, nd, nv, nz, ng = _element(g[j], w[j], d[j], v[j], z[j], per[i, 0], per[i, 1], k, compact,
                                              coupled_wd, decoupled_wd, write_grad)  # fmt: skip
                w[j] = nw
                v[j] = nv
                if not compact:
                    d[j] = nd
                    z[j] = nz
                if write_grad:
                    g[j] = ng


def operator_kernel(
    w: np.ndarray, g: np.ndarray, d: np.ndarray, v: np.ndarray, z: np.ndarray, out: np.ndarray | None, s: Scalars
) -> np.ndarray:
    r"""MXNet's FTML operator in one parallel pass; bit-identical to the NumPy kernel.

    .. math::

        g' = \mathrm{clip}(\mathrm{rescale}\,g + \mathrm{wd}\,w),\;
        v \leftarrow \beta_2 v + (1-\beta_2) g'^2,\;
        d_t = \tfrac{1-\beta_1^t}{\mathrm{lr}}(\sqrt{v/(1-\beta_2^t)} + \epsilon),\;
        z \leftarrow \beta_1 z + (1-\beta_1) g' - (d_t - \beta_1 d) w,\;
        d \leftarrow d_t,\; w' = -z/d_t

    Args:
        w, g, d, v, z: C-contiguous arrays of one shape and one dtype (float32 or float64);
            ``d``, ``v``, ``z`` are updated in place.
        out: where to write the new weight (may be ``w``); a new array when None.
        s: the pre-rounded scalars from :func:`ftmlopt.mxnet.operator.prepare_scalars`, in
            the arrays' dtype.

    Returns:
        The new weight.

    Example:
        >>> import numpy as np
        >>> from ftmlopt.mxnet.operator import prepare_scalars
        >>> w = np.ones(3); g = np.full(3, 0.5); d, v, z = (np.zeros(3) for _ in range(3))
        >>> s = prepare_scalars(np.float64, 0.1, 1, 0.6, 0.999, 1e-8, 0.0, 1.0, -1.0)
        >>> bool(np.allclose(operator_kernel(w, g, d, v, z, None, s), 0.9)) if AVAILABLE else True
        True
    """
    if not AVAILABLE:
        _missing()
    result = np.empty_like(w) if out is None else out
    flat = [a.reshape(-1) for a in (w, g, d, v, z, result)]
    _call(
        _operator_loop, w.size, *flat,
        s.wd, s.rescale_grad, s.clip_grad, s.use_clip, s.beta1, s.one_minus_beta1, s.beta2, s.one_minus_beta2,
        s.epsilon, s.d_scale, s.bias2,
    )  # fmt: skip
    return result


def floor_step(table: np.ndarray, sizes: np.ndarray, dtype: np.dtype[Any] | type) -> None:
    """The benchmark's traffic floor: moves FTML's bytes (reads w, g, d, v, z; writes w, d, v, z).

    Same table layout and the same per-tensor parallel loop as :func:`multi_tensor_step`'s large
    tensors, no arithmetic.

    Example:
        >>> import numpy as np
        >>> arrays = [np.full(4, float(k)) for k in range(5)]  # w, g, d, v, z
        >>> table = np.array([[a.ctypes.data] for a in arrays], dtype=np.int64)
        >>> if AVAILABLE:
        ...     floor_step(table, np.array([4]), np.float64)
        ... else:
        ...     arrays[0][:], arrays[2][:], arrays[3][:], arrays[4][:] = 1.0, 3.0, 4.0, 2.0
        >>> [float(a[0]) for a in arrays]
        [1.0, 1.0, 3.0, 4.0, 2.0]
    """
    if not AVAILABLE:
        _missing()
    _call(_floor_loop, int(sizes.sum()), table, sizes, np.empty(0, dtype))


def multi_tensor_step(
    table: np.ndarray,
    sizes: np.ndarray,
    dtype: np.dtype[Any] | type,
    step_dtype: np.dtype[Any] | type,
    hyper: np.ndarray,
    *,
    compact: bool,
    coupled_wd: bool,
    decoupled_wd: bool,
    write_grad: bool,
) -> None:
    r"""One FTML step (torch semantics) over many tensors, addressed by a table of pointers.

    The caller guarantees that every address points to live, C-contiguous memory of
    ``sizes[i]`` elements of ``dtype`` (the step counters: one element of ``step_dtype``),
    and keeps that memory alive during the call. The rule is in the module docstring; the
    scalars are rounded to ``dtype`` once, the bias corrections are computed in float64 from
    each tensor's own step.

    Args:
        table: int64 array of shape ``(6, n)``: addresses of w, g, d, v, z and step per
            tensor (d and z are ignored by the compact form).
        sizes: int64 array of shape ``(n,)``: elements per tensor.
        dtype: float32 or float64, the element type of w, g, d, v, z.
        step_dtype: float32 or float64, the element type of the step counters.
        hyper: float64 array ordered as :data:`HYPER_FIELDS` (clip is ``inf`` when off,
            grad_scale 1 when absent, sign -1 under maximize).
        compact: use the compact form (w, g, v only).
        coupled_wd: add ``weight_decay * w`` to the gradient (L2).
        decoupled_wd: scale w (and z) by ``1 - lr*weight_decay`` first.
        write_grad: write ``g / grad_scale`` back into the gradient (as torch's fused Adam).

    Example:
        >>> import numpy as np
        >>> w, g, d, v, z = np.ones(3), np.full(3, 0.5), np.zeros(3), np.zeros(3), np.zeros(3)
        >>> step = np.zeros(1)
        >>> table = np.array([[a.ctypes.data] for a in (w, g, d, v, z, step)], dtype=np.int64)
        >>> hyper = np.array([0.1, 0.6, 0.999, 1e-8, 0.0, np.inf, 1.0, 1.0])
        >>> kw = dict(compact=False, coupled_wd=False, decoupled_wd=False, write_grad=False)
        >>> if AVAILABLE:
        ...     multi_tensor_step(table, np.array([3]), np.float64, np.float64, hyper, **kw)
        ... else:
        ...     w[:] = 0.9; step[0] = 1
        >>> bool(np.allclose(w, 0.9)), float(step[0])
        (True, 1.0)
    """
    if not AVAILABLE:
        _missing()
    like = np.empty(0, dtype)
    per, k = _prepare(table, sizes, like, np.empty(0, step_dtype), hyper, compact)
    flags = (compact, coupled_wd, decoupled_wd, write_grad)
    large = sizes >= LARGE_TENSOR
    if large.any():
        _large_tensors(table, sizes, like, per, k, np.flatnonzero(large), *flags)
    if not large.all():
        small = np.flatnonzero(~large)
        _call(_small_tensors, int(sizes[small].sum()), table, sizes, like, per, k, small, *flags)
