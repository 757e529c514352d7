r"""Low-bit state for the compact FTML form: the quantizer and the quantized step, written once.

The compact form (:func:`ftmlopt.rule.compact_step`) keeps one state tensor, ``v``. Here ``v`` is
stored in 8 or 4 bits per element plus one float32 scale per block of :data:`BLOCK` elements:
about 1.03 or 0.53 bytes per parameter. Every path (the torch for-loop, foreach and fused kernels,
optax) is tested against the functions of this module, which run unchanged on NumPy arrays, torch
tensors and ``jax.numpy`` arrays (a small :class:`Ops` adapter per array library supplies the
bit casts, the 32-bit integer arithmetic and the block maximum).

**What is stored.** The root mean square :math:`u = \sqrt{v}` (half of ``v``'s log-range), per
block :math:`b` of 128 consecutive elements of the flattened (row-major) tensor, the last block
possibly partial:

.. math::

    s_b = \frac{\max_{i \in b} u_i}{x_{\mathrm{top}}}, \qquad
    u_i \approx x(q_i)\, s_b, \qquad v_i = u_i^2

with codes :math:`q` of an unsigned mini-float *without zero* (E4M4 for 8 bits, E3M1 for 4 bits;
``E`` exponent and ``M`` mantissa bits):

.. math::

    x(q) = 2^{\lfloor q / 2^M \rfloor - (2^E - 1)} \Big(1 + \frac{q \bmod 2^M}{2^M}\Big),
    \qquad q = 0, \dots, 2^{E+M} - 1

so the smallest code is :math:`2^{-15}` (E4M4) or :math:`2^{-7}` (E3M1) of the block's top
:math:`x_{\mathrm{top}} = 2 - 2^{-M}`. There is no code for 0: a small ``v`` next to a large one
is over-estimated (its step shrinks: the safe side) instead of becoming 0 (its step would become
``lr * g / eps``). A block that is all zero has scale 0 and decodes to exactly 0.

**Encoding** ``x = u * rho`` with ``rho = 1 / s`` (float32, ``rho`` once per block, ``rho = 1``
where ``s`` is not positive) works on the float32 bit pattern: with ``bits`` its int32
view, ``q = (bits + (r - ((127 - (2^E - 1)) << 23))) >> (23 - M)`` (int32, wrapping), clamped
to the code range. For every ``u >= 0`` (the only values a step produces) this is
``((bits + r) >> (23 - M)) - ((127 - (2^E - 1)) << M)``; subtracting the exponent bias before
the shift lets a kernel narrow the codes with saturating packs, with no clamp of its own.
``r`` is ``2^(22-M)`` for round-to-nearest, or a random integer in ``[0, 2^(23-M))`` for
stochastic rounding (adding uniform low bits, then truncating, is unbiased rounding on this grid).
Stochastic rounding is the default: with round-to-nearest, ``v``'s decay of 0.1 % per step
(``beta2 = 0.999``) is smaller than the gap between codes and ``v`` can stop decaying.

**Random bits** are counter-based (no global generator, so replicas agree and a resumed run is
bit-identical). With :func:`mix32` (a 32-bit avalanche mix)::

    key = mix32((seed * 0x9E3779B1 + step) mod 2**32)             # per tensor and step, on the host
    r_i = ((i * 0x9E3779B1 + key) mod 2**32) >> (32 - (23 - M))   # per element, flat index i

Per element, adding ``key`` is one-to-one in ``key``, so over steps (a well-mixed key) ``r_i`` is
uniform: each element's rounding is unbiased. The ``r_i`` of one step are not independent of each
other: they are a golden-ratio (Weyl) sequence, spread evenly over ``[0, 2**(23-M))`` (neighbours
differ by about 0.62 of the range, modulo 1), so a block's roundings up and down also balance
within the step. Consecutive elements' ``i * 0x9E3779B1 + key`` differ by the constant, so a
kernel adds it per element instead of multiplying: the per-element ``mix32`` (two multiplies and
three shift-xors) was the fused kernels' largest integer cost.

``seed`` is stored with the state (the param's index in its optimizer), ``step`` is the param's
1-based step count.

**The step** (:func:`compact_step`): decode ``v_old`` (float32); compute ``w_t, v_t`` with
:func:`ftmlopt.rule.compact_step` in the caller's compute dtype (so one step equals float32 state's
step from the same ``v_old``); then ``u = sqrt(float32(v_t))``, the new block scales, and the new
codes. In float32 the rule's own denominator starts from the same root (``sqrt(v) * bias2_rsqrt +
eps``), so a kernel takes one square root per element for both. Operation order, for kernels that
want to be bit-identical: decode ``u = x(q) * s``, ``v = u * u``; encode with ``u`` the correctly
rounded float32 square root of ``float32(v)``,
``s = max(u) / x_top`` and ``rho = 1 / s`` as correctly rounded float32 divisions (once per block),
``rho = 1`` where ``s`` is not positive (so an all-zero block gets code 0), and ``x = u * rho`` (one
float32 multiply per element: a division per element was the kernels' costliest step). ``v_t`` itself
is the rule's ``v * beta2 + (g' * g') * (1 - beta2)``: a kernel that contracts it into a fused
multiply-add (Triton and XLA do by default) may differ in ``v_t``'s last bit, which moves a code by
at most one, rarely.

**Storage.** 8-bit codes: a uint8 array of ``numel`` elements. 4-bit codes: two per byte,
element ``2k`` in the low nibble and ``2k+1`` in the high nibble, ``ceil(numel / 2)`` bytes.
Scales: float32, ``ceil(numel / BLOCK)``. Tensors of fewer than :data:`MIN_ELEMENTS` elements keep
float32 state (:func:`is_quantized`).

Example (NumPy; the same call runs on torch tensors and ``jax.numpy`` arrays):
    >>> import numpy as np
    >>> from ftmlopt import lowbit, rule
    >>> w = np.linspace(-1.0, 1.0, 300, dtype=np.float32)
    >>> codes, scales = lowbit.zeros_state(w.size, bits=8)
    >>> codes.dtype, codes.shape, scales.shape
    (dtype('uint8'), (300,), (3,))
    >>> c = rule.constants(0.01, 1, 0.6, 0.999, 1e-8).cast(np.float32)
    >>> new_w, codes, scales = lowbit.compact_step(w, 0.5 * w, codes, scales, c, bits=8, seed=0, step=1)
    >>> ref_w, ref_v = rule.compact_step(w, 0.5 * w, np.zeros_like(w), c, sqrt=np.sqrt, clip=np.clip)
    >>> bool(np.array_equal(new_w, ref_w))   # the weight update is the rule's
    True
    >>> v = lowbit.decode(codes, scales, w.size, bits=8)
    >>> u, ref_u = np.sqrt(v), np.sqrt(ref_v)
    >>> bool(np.all(np.abs(u - ref_u) <= ref_u / 16))   # u = sqrt(v) within one code step (E4M4: 1/16)
    True
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ftmlopt import rule

__all__ = [
    "BLOCK",
    "MIN_ELEMENTS",
    "STATE_BITS",
    "Ops",
    "check_rounding",
    "check_state_bits",
    "code_values",
    "compact_step",
    "decode",
    "encode",
    "format_of",
    "is_quantized",
    "mix32",
    "mix32_int",
    "n_blocks",
    "n_code_bytes",
    "ops_for",
    "pack4",
    "random_bits",
    "state_bytes",
    "step_key",
    "top",
    "traced_step_key",
    "unpack4",
    "zeros_state",
]

Array = Any

#: elements per block (one float32 scale each); the last block of a tensor may be partial
BLOCK = 128
#: tensors with fewer elements keep float32 state (biases, norms)
MIN_ELEMENTS = 4096
#: the accepted values of ``state_bits``
STATE_BITS = (32, 8, 4)

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B1
_MUL1 = 0x85EBCA6B
_MUL2 = 0xC2B2AE35


# ============================================================================ the format
def check_state_bits(value: Any, what: str = "state_bits") -> int:
    """``state_bits``: exactly one of 32 (float state), 8 or 4; returned as an int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int (32, 8 or 4), got {value!r} of type {type(value).__name__}")
    if int(value) not in STATE_BITS:
        raise ValueError(f"Invalid {what}: {value}")
    return int(value)


def check_rounding(value: Any) -> str:
    """``rounding``: ``"stochastic"`` (the default) or ``"nearest"``."""
    if value not in ("stochastic", "nearest"):
        raise ValueError(f"Invalid rounding: {value!r} (use 'stochastic' or 'nearest')")
    return str(value)


def format_of(bits: int) -> tuple[int, int]:
    """``(E, M)``, the exponent and mantissa bits of the code: 8 -> E4M4, 4 -> E3M1."""
    if bits == 8:
        return 4, 4
    if bits == 4:
        return 3, 1
    raise ValueError(f"Invalid state_bits: {bits} (quantized state has 8 or 4 bits)")


def top(bits: int) -> float:
    """The value of the top code, ``2 - 2**-M`` (E4M4: 1.9375, E3M1: 1.5)."""
    _, m = format_of(bits)
    return 2.0 - 2.0**-m


def code_values(bits: int) -> list[float]:
    """``x(q)`` for every code ``q``, in code order (strictly increasing, no zero), as Python floats."""
    e, m = format_of(bits)
    return [2.0 ** ((q >> m) - (2**e - 1)) * (1.0 + (q & (2**m - 1)) / 2**m) for q in range(2 ** (e + m))]


def is_quantized(numel: int, bits: int) -> bool:
    """Whether a tensor of ``numel`` elements gets quantized state under ``state_bits = bits``."""
    return bits < 32 and numel >= MIN_ELEMENTS


def n_blocks(numel: int) -> int:
    """``ceil(numel / BLOCK)``: the number of scales."""
    return -(-numel // BLOCK)


def n_code_bytes(numel: int, bits: int) -> int:
    """Bytes of codes: ``numel`` (8-bit) or ``ceil(numel / 2)`` (4-bit)."""
    format_of(bits)
    return numel if bits == 8 else -(-numel // 2)


def state_bytes(numel: int, bits: int) -> int:
    """Bytes of state for a tensor of ``numel`` elements: codes plus float32 scales (float32 ``v`` when 32)."""
    if bits == 32:
        return 4 * numel
    return n_code_bytes(numel, bits) + 4 * n_blocks(numel)


# ============================================================================ random bits
def mix32_int(h: int) -> int:
    """:func:`mix32` on one Python int (the host side: the per-step key)."""
    h &= _MASK32
    h ^= h >> 16
    h = (h * _MUL1) & _MASK32
    h ^= h >> 13
    h = (h * _MUL2) & _MASK32
    h ^= h >> 16
    return h


def step_key(seed: int, step: int) -> int:
    """The per-tensor, per-step key ``mix32((seed * 0x9E3779B1 + step) mod 2**32)``."""
    return mix32_int((int(seed) * _GOLDEN + int(step)) & _MASK32)


def mix32(h: Array, ops: Ops) -> Array:
    """The 32-bit avalanche mix on an array of unsigned 32-bit values (held as ``ops.uint`` integers).

    ``h ^= h >> 16; h *= 0x85EBCA6B; h ^= h >> 13; h *= 0xC2B2AE35; h ^= h >> 16`` (products mod 2**32).
    """
    # shift counts of the values' own type: NumPy 1.x refuses uint64 scalar >> Python int (int64)
    s16, s13 = ops.uint_scalar(16), ops.uint_scalar(13)
    h = h ^ (h >> s16)
    h = ops.mul32(h, _MUL1)
    h = h ^ (h >> s13)
    h = ops.mul32(h, _MUL2)
    return h ^ (h >> s16)


def traced_step_key(seed: int, step: Array, ops: Ops) -> Array:
    """:func:`step_key` for a step count that is an array (a traced count under ``jax.jit``), as a ``uint`` scalar."""
    return mix32(ops.add32(ops.uint_scalar((int(seed) * _GOLDEN) & _MASK32), ops.to_uint(step)), ops)


def random_bits(n: int, key: int | Array, bits: int, ops: Ops) -> Array:
    """``r_i = ((i * 0x9E3779B1 + key) mod 2**32) >> (32 - (23 - M))`` for ``i = 0 .. n-1``, int32 < ``2**(23-M)``.

    ``key`` is :func:`step_key` (an int) or :func:`traced_step_key` (a ``uint`` scalar array).
    """
    _, m = format_of(bits)
    k = ops.uint_scalar(key) if isinstance(key, int) else key
    h = ops.add32(ops.mul32(ops.index(n), _GOLDEN), k)
    return ops.to_int32(h >> (32 - (23 - m)))


# ============================================================================ array adapters
@dataclass(frozen=True)
class Ops:
    """What the quantizer needs from an array library beyond ``+ - * / >> & ^ |`` and indexing.

    One instance per library (:func:`ops_for` picks it from an array). ``uint`` integers hold
    unsigned 32-bit values: NumPy uint64 (products masked to 32 bits), torch int64 (products split
    so that they never overflow, then masked), JAX uint32 (wrapping natively).
    """

    name: str
    #: float32 copy/cast of an array
    float32: Callable[[Array], Array]
    #: cast to the dtype of ``like``
    cast_like: Callable[[Array, Array], Array]
    #: the flattened (row-major, contiguous) array
    flat: Callable[[Array], Array]
    reshape: Callable[[Array, tuple[int, ...]], Array]
    #: append zeros to length ``n``
    pad: Callable[[Array, int], Array]
    #: maximum over the last axis of a 2-D array
    row_max: Callable[[Array], Array]
    #: the int32 bit pattern of a float32 array, and back
    bits_of: Callable[[Array], Array]
    float_of: Callable[[Array], Array]
    #: ``0 .. n-1`` as ``uint`` integers, a Python int as a ``uint`` scalar, ``a * c mod 2**32``
    index: Callable[[int], Array]
    uint_scalar: Callable[[int], Array]
    #: an integer array (a traced step count) as ``uint`` integers, and ``a + b mod 2**32`` of two of them
    to_uint: Callable[[Array], Array]
    add32: Callable[[Array, Array], Array]
    mul32: Callable[[Array, int], Array]
    to_int32: Callable[[Array], Array]
    to_uint8: Callable[[Array], Array]
    clamp: Callable[[Array, int, int], Array]
    where: Callable[[Array, Array, Array], Array]
    sqrt: Callable[[Array], Array]
    clip: Callable[[Array, Array, Array], Array]
    #: the correctly rounded float32 quotient ``a / b`` (``b`` broadcast to ``a``)
    div: Callable[[Array, Array], Array]
    #: the correctly rounded float32 square root (of a float32 array)
    sqrt_rn: Callable[[Array], Array]
    #: interleaves two 1-D arrays of equal length into ``[a0, b0, a1, b1, ...]``
    interleave: Callable[[Array, Array], Array]
    zeros_uint8: Callable[[int], Array]
    zeros_float32: Callable[[int], Array]
    #: a Python int as an int32 scalar, a Python float as a float32 scalar
    int32_scalar: Callable[[int], Array]
    float32_scalar: Callable[[float], Array]


def _array_module_ops(xp: Any) -> dict[str, Any]:
    """The :class:`Ops` entries that NumPy and ``jax.numpy`` spell alike, for the array module ``xp``."""
    return dict(
        float32=lambda x: xp.asarray(x, dtype=xp.float32),
        reshape=lambda x, shape: xp.reshape(x, shape),
        to_int32=lambda h: h.astype(xp.int32),
        to_uint8=lambda q: q.astype(xp.uint8),
        clamp=lambda q, lo, hi: xp.clip(q, lo, hi),
        where=xp.where,
        sqrt=xp.sqrt,
        clip=xp.clip,
        sqrt_rn=xp.sqrt,
        interleave=lambda a, b: xp.stack([a, b], axis=-1).reshape(-1),
        zeros_uint8=lambda n: xp.zeros(n, dtype=xp.uint8),
        zeros_float32=lambda n: xp.zeros(n, dtype=xp.float32),
        int32_scalar=lambda k: xp.int32(k),
        float32_scalar=lambda x: xp.float32(x),
    )


def _numpy_ops() -> Ops:
    import numpy as np

    mask = np.uint64(_MASK32)
    return Ops(
        name="numpy",
        **_array_module_ops(np),
        cast_like=lambda x, like: np.asarray(x).astype(np.asarray(like).dtype, copy=False),
        flat=lambda x: np.ascontiguousarray(x).reshape(-1),
        pad=lambda x, n: np.concatenate([x, np.zeros(n - x.shape[0], dtype=x.dtype)]) if n > x.shape[0] else x,
        row_max=lambda x: x.max(axis=1) if x.shape[0] else np.zeros(0, dtype=x.dtype),
        bits_of=lambda x: np.ascontiguousarray(x, dtype=np.float32).view(np.int32),
        float_of=lambda b: np.ascontiguousarray(b, dtype=np.int32).view(np.float32),
        index=lambda n: np.arange(n, dtype=np.uint64),
        uint_scalar=lambda k: np.uint64(k & _MASK32),
        to_uint=lambda x: np.asarray(x).astype(np.uint64) & mask,
        add32=lambda a, b: (a + b) & mask,
        mul32=lambda h, c: (h * np.uint64(c)) & mask,
        div=lambda a, b: a / b,
    )


def _torch_mul32(h: Any, c: int) -> Any:
    # h < 2**32 held in int64: h * c could pass 2**63, so multiply by c's two 16-bit halves
    lo = (h * (c & 0xFFFF)) & _MASK32
    hi = ((h * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _torch_sqrt_rn(x: Any) -> Any:
    # torch's float32 sqrt on CPU (its vectorized path) is off by one ulp for ~1 in 5 inputs, and one
    # ulp of u can change a code. A float64 square root within one float64 ulp, rounded to float32, is
    # the correctly rounded float32 root: sqrt(x) lies at least 2**-51 (relative) away from every
    # float32 rounding midpoint (x has 24 significant bits, a midpoint squared has 49 or 50).
    import torch

    return x.to(torch.float64).sqrt().to(torch.float32)


def _torch_ops(device: Any = None) -> Ops:
    import torch

    return Ops(
        name="torch",
        float32=lambda x: x.to(torch.float32),
        cast_like=lambda x, like: x.to(like.dtype),
        flat=lambda x: x.reshape(-1).contiguous(),
        reshape=lambda x, shape: x.reshape(shape),
        pad=lambda x, n: torch.nn.functional.pad(x, (0, n - x.shape[0])) if n > x.shape[0] else x,
        row_max=lambda x: x.amax(dim=1) if x.shape[0] else x.new_zeros(0),
        bits_of=lambda x: x.to(torch.float32).contiguous().view(torch.int32),
        float_of=lambda b: b.to(torch.int32).contiguous().view(torch.float32),
        index=lambda n: torch.arange(n, dtype=torch.int64, device=device),
        uint_scalar=lambda k: k & _MASK32,
        to_uint=lambda x: torch.as_tensor(x, device=device).to(torch.int64) & _MASK32,
        add32=lambda a, b: (a + b) & _MASK32,
        mul32=_torch_mul32,
        to_int32=lambda h: h.to(torch.int32),
        to_uint8=lambda q: q.to(torch.uint8),
        clamp=lambda q, lo, hi: q.clamp(lo, hi),
        where=torch.where,
        sqrt=torch.sqrt,
        clip=torch.clamp,
        sqrt_rn=_torch_sqrt_rn,
        div=lambda a, b: a / b,
        interleave=lambda a, b: torch.stack([a, b], dim=-1).reshape(-1),
        zeros_uint8=lambda n: torch.zeros(n, dtype=torch.uint8, device=device),
        zeros_float32=lambda n: torch.zeros(n, dtype=torch.float32, device=device),
        int32_scalar=lambda k: k,
        float32_scalar=lambda x: x,  # a Python scalar takes the tensor's dtype (float32 here)
    )


def _jax_div(a: Any, b: Any) -> Any:
    # XLA (CPU) rewrites a division by a broadcast value into a multiplication by its reciprocal,
    # which is not the correctly rounded quotient. A divisor as large as ``a`` (``a * 0 + b``: XLA
    # does not fold ``a * 0`` for floats) is divided element by element.
    return a / (a * 0 + b)


def _jax_ops() -> Ops:
    import jax
    import jax.numpy as jnp

    return Ops(
        name="jax",
        **_array_module_ops(jnp),
        cast_like=lambda x, like: x.astype(like.dtype),
        flat=lambda x: jnp.reshape(x, (-1,)),
        pad=lambda x, n: jnp.pad(x, (0, n - x.shape[0])) if n > x.shape[0] else x,
        row_max=lambda x: jnp.max(x, axis=1) if x.shape[0] else jnp.zeros(0, dtype=x.dtype),
        bits_of=lambda x: jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32),
        float_of=lambda b: jax.lax.bitcast_convert_type(b.astype(jnp.int32), jnp.float32),
        index=lambda n: jnp.arange(n, dtype=jnp.uint32),
        uint_scalar=lambda k: jnp.uint32(k & _MASK32),
        to_uint=lambda x: jnp.asarray(x).astype(jnp.uint32),
        add32=lambda a, b: a + b,
        mul32=lambda h, c: h * jnp.uint32(c),
        div=_jax_div,
    )


_OPS_CACHE: dict[Any, Ops] = {}


def ops_for(x: Any) -> Ops:
    """The :class:`Ops` of the library ``x`` belongs to (NumPy arrays and Python numbers: NumPy)."""
    module = type(x).__module__.split(".", 1)[0]
    if module == "torch":
        key: Any = ("torch", x.device)
        if key not in _OPS_CACHE:
            _OPS_CACHE[key] = _torch_ops(x.device)
        return _OPS_CACHE[key]
    if module in ("jax", "jaxlib"):
        key = "jax"
        if key not in _OPS_CACHE:
            _OPS_CACHE[key] = _jax_ops()
        return _OPS_CACHE[key]
    if "numpy" not in _OPS_CACHE:
        _OPS_CACHE["numpy"] = _numpy_ops()
    return _OPS_CACHE["numpy"]


# ============================================================================ codes
def pack4(q: Array, ops: Ops) -> Array:
    """Two 4-bit codes per byte (element ``2k`` low nibble, ``2k+1`` high); ``q`` is int32 in ``[0, 16)``."""
    n = q.shape[0]
    q = ops.pad(q, n + (n & 1))
    return ops.to_uint8(q[0::2] | (q[1::2] << 4))


def unpack4(packed: Array, numel: int, ops: Ops) -> Array:
    """The int32 codes of ``numel`` elements from :func:`pack4`'s bytes."""
    p = ops.to_int32(packed)
    return ops.interleave(p & 15, p >> 4)[:numel]


def encode(u: Array, bits: int, *, r: Array | int, ops: Ops) -> tuple[Array, Array]:
    """Codes and scales of a flat float32 ``u`` (>= 0): ``(codes as stored, float32 scales)``.

    ``r`` is the rounding addend: :func:`random_bits` for stochastic rounding, ``2**(22-M)``
    for round-to-nearest.
    """
    e, m = format_of(bits)
    numel = u.shape[0]
    nb = n_blocks(numel)
    u2 = ops.reshape(ops.pad(u, nb * BLOCK), (nb, BLOCK))
    scales = ops.div(ops.row_max(u2), ops.float32_scalar(top(bits)))
    safe = ops.where(scales > 0, scales, ops.float32_scalar(1.0))
    rho = ops.div(ops.zeros_float32(nb) + 1, safe)  # 1 / s once per block (1 / inf = 0), then a multiply
    x = ops.flat(u2 * rho[:, None])[:numel]
    q = (ops.bits_of(x) + (r - ops.int32_scalar((127 - (2**e - 1)) << 23))) >> (23 - m)  # int32, wrapping
    q = ops.clamp(q, 0, 2 ** (e + m) - 1)
    return (ops.to_uint8(q) if bits == 8 else pack4(q, ops)), scales


def decode(codes: Array, scales: Array, numel: int, bits: int, *, ops: Ops | None = None) -> Array:
    """The flat float32 ``v`` of ``numel`` elements: ``u = x(q) * scale``, ``v = u * u``."""
    ops = ops or ops_for(codes)
    e, m = format_of(bits)
    q = ops.to_int32(codes) if bits == 8 else unpack4(codes, numel, ops)
    x = ops.float_of((q + ops.int32_scalar((127 - (2**e - 1)) << m)) << (23 - m))
    nb = n_blocks(numel)
    x2 = ops.reshape(ops.pad(x, nb * BLOCK), (nb, BLOCK))
    u = ops.flat(x2 * scales[:, None])[:numel]
    return u * u


def quantize(
    v: Array, bits: int, *, seed: int = 0, step: int | Array = 0, rounding: str = "stochastic",
    ops: Ops | None = None,
) -> tuple[Array, Array]:
    """``(codes, scales)`` of a float ``v`` (any shape, >= 0) with the random bits of ``(seed, step)``.

    ``step`` is a Python int, or an integer array (a step count under ``jax.jit``).
    """
    ops = ops or ops_for(v)
    _, m = format_of(bits)
    v32 = ops.float32(ops.flat(v))
    # -0.0 (a converted state may hold it; a step never makes it) as +0.0: its root's sign bit would
    # make the encoding's int32 view negative
    u = ops.sqrt_rn(ops.where(v32 == 0, ops.float32_scalar(0.0), v32))
    numel = u.shape[0]
    if check_rounding(rounding) == "nearest":
        r: Array | int = ops.int32_scalar(1 << (22 - m))
    else:
        key = step_key(seed, int(step)) if isinstance(step, numbers.Integral) else traced_step_key(seed, step, ops)
        r = random_bits(numel, key, bits, ops)
    return encode(u, bits, r=r, ops=ops)


def zeros_state(numel: int, bits: int, *, ops: Ops | None = None) -> tuple[Array, Array]:
    """Codes and scales that decode to ``v = 0`` (all scales 0): the state before the first step."""
    ops = ops or ops_for(None)
    return ops.zeros_uint8(n_code_bytes(numel, bits)), ops.zeros_float32(n_blocks(numel))


# ============================================================================ the step
def compact_step(
    w: Array,
    g: Array,
    codes: Array,
    scales: Array,
    c: rule.Constants,
    *,
    bits: int,
    seed: int,
    step: int | Array,
    rounding: Literal["stochastic", "nearest"] = "stochastic",
    ops: Ops | None = None,
) -> tuple[Array, Array, Array]:
    """One compact FTML step with quantized ``v``; returns ``(w_t, codes_t, scales_t)``.

    ``w`` and ``g`` are in the compute dtype (:func:`ftmlopt.rule.compute_dtype`), any shape
    (flattened row-major); ``c`` are the step's constants cast to that dtype, ``step`` the 1-based
    step count that ``c`` was made for (a Python int, or an integer array under ``jax.jit``). The
    weights are exactly :func:`ftmlopt.rule.compact_step`'s from the decoded ``v``; the new ``v`` is
    requantized with new block scales.
    """
    ops = ops or ops_for(w)
    numel = math.prod(w.shape)
    v_old = ops.cast_like(ops.reshape(decode(codes, scales, numel, bits, ops=ops), tuple(w.shape)), w)
    w_new, v = rule.compact_step(w, g, v_old, c, sqrt=ops.sqrt, clip=ops.clip)
    new_codes, new_scales = quantize(v, bits, seed=seed, step=step, rounding=rounding, ops=ops)
    return w_new, new_codes, new_scales
