r"""Low-bit FTML state in the torch front end: ``FTML(..., state_bits=8 | 4)``.

The quantizer and the quantized step are :mod:`ftmlopt.lowbit` (written once, next to the rule);
this module is the torch side of it: which params are quantized, their state, their step, and
their checkpoints.

* **Which params.** In a group with ``state_bits`` 8 or 4, a param of at least
  :data:`ftmlopt.lowbit.MIN_ELEMENTS` real elements (a complex param counts its real view) keeps
  ``codes`` (uint8; 4-bit: two codes per byte), ``scales`` (float32, one per block of 128 elements
  of the flattened param) and ``seed`` (an int: the param's index in its optimizer, so replicas
  agree and a resumed run is bit-identical) instead of ``v``. Smaller params keep float ``v``.
* **The step.** Every path (for-loop, foreach, fused) steps a quantized param with
  :func:`ftmlopt.lowbit.compact_step` on torch tensors: decode ``v``, the rule's compact step in the
  compute dtype, requantize with the step's counter-based random bits. On the fused path (``fused``
  True, or the default dispatch) the fused low-bit kernel replaces it where one is available
  (:func:`fused_available`: the LLVM CPU kernel, the Triton CUDA kernel).
* **FSDP2.** A DTensor param sharded on dim 0 over a 1-D mesh (``fully_shard``) is stepped on
  each rank's local shard, as a tensor of its own: blocks of 128 over the shard's flattened
  elements, rounding bits from the local flat index. Its ``codes`` and ``scales`` are DTensors of
  shape ``(ranks, L)`` sharded on dim 0 (:func:`state_shapes`): one row per rank, padded to the
  longest rank's length, so that ``torch.distributed.checkpoint`` saves every rank's row. Such a
  checkpoint loads into the same number of ranks only. Other DTensor layouts: NotImplementedError.
* **Checkpoints.** ``torch.optim.Optimizer.load_state_dict`` casts every tensor of a param's state to
  a floating param's dtype (codes and scales included); :func:`restore_saved` puts the saved tensors
  back, so a ``state_dict`` round-trips bit for bit. A checkpoint of another ``state_bits`` is
  converted (:func:`convert_entry`: float ``v`` <-> codes and scales, round-to-nearest).

Example:
    >>> import torch
    >>> from ftmlopt.torch import FTML
    >>> w, b = torch.nn.Parameter(torch.ones(64, 100)), torch.nn.Parameter(torch.ones(100))
    >>> opt = FTML([w, b], lr=0.1, state_bits=4)
    >>> w.grad, b.grad = torch.ones_like(w), torch.ones_like(b)
    >>> opt.step()
    >>> sorted(opt.state[w]), sorted(opt.state[b])  # 6400 elements: low-bit; 100: float v
    (['codes', 'scales', 'seed', 'step'], ['step', 'v'])
    >>> state_bytes(opt.state[w]) / w.numel()  # 3200 bytes of codes + 50 float32 scales
    0.53125
    >>> round(float(w.detach()[0, 0]), 6)  # the first step moves by lr, as with float state
    0.9
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ftmlopt import lowbit, rule

__all__ = [
    "LOWBIT_KEYS",
    "bits_for",
    "check_options",
    "check_param",
    "check_saved_entry",
    "convert_entry",
    "fused_available",
    "init_state",
    "is_dtensor",
    "local_state",
    "real_numel",
    "restore_saved",
    "state_bytes",
    "state_shapes",
    "step_quantized",
]

#: the state keys of a quantized param besides ``step`` (and ``master`` under multi_precision)
LOWBIT_KEYS = ("codes", "scales", "seed")


def check_options(group: Mapping[str, Any]) -> None:
    """``state_bits`` (32, 8 or 4) and the options it cannot be combined with, before anything changes."""
    if "state_bits" not in group:
        return
    bits = lowbit.check_state_bits(group["state_bits"])
    if bits == 32:
        return
    if group.get("compact") is False:
        raise ValueError(
            f"Invalid state_bits: {bits} with compact=False (the MXNet three-state form keeps d, v and z in "
            "floating point; low-bit state needs the compact form, compact=True)"
        )
    for flag in ("capturable", "differentiable"):
        if group.get(flag):
            raise ValueError(f"Invalid state_bits: {bits} with {flag}=True (low-bit state supports neither "
                             "capturable nor differentiable steps; use state_bits=32)")


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (without importing torch.distributed)."""
    if "torch.distributed.tensor" not in sys.modules:  # no DTensor can exist
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


def check_param(p: Tensor, group: Mapping[str, Any]) -> None:
    """Low-bit state of a DTensor param needs FSDP2's layout: a 1-D mesh, ``Shard(0)`` (NotImplementedError)."""
    if bits_for(p, group) < 32 and is_dtensor(p):
        _shard_layout(p)


def _shard_layout(p: Any) -> tuple[int, int]:
    """``(ranks, most real elements a rank holds)`` of a DTensor param sharded FSDP2's way.

    FSDP2 (``fully_shard``) splits dim 0 as ``torch.chunk`` does: ``ceil(rows / ranks)`` rows per
    rank, the last ranks shorter or empty; rank 0 holds the most.
    """
    from torch.distributed.tensor import Shard

    mesh, placements = p.device_mesh, tuple(p.placements)
    if mesh.ndim != 1 or placements != (Shard(0),) or p.dim() == 0:
        raise NotImplementedError(
            f"FTML(state_bits<32) supports DTensor params sharded on dim 0 over a 1-D mesh (FSDP2's fully_shard), "
            f"got placements {placements} on a {mesh.ndim}-D mesh; use state_bits=32 for these params (a param "
            "group of their own)"
        )
    ranks, rows = mesh.size(), p.shape[0]
    per_row = real_numel(p) // rows if rows else 0
    return ranks, min(-(-rows // ranks), rows) * per_row


def state_shapes(p: Tensor, bits: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of ``p``'s ``codes`` and ``scales`` with ``bits``-bit state.

    A plain param: 1-D, ``n_code_bytes(numel)`` and ``n_blocks(numel)``. A DTensor param (FSDP2):
    2-D DTensors ``(ranks, L)`` sharded on dim 0, one row per rank holding the codes (scales) of its
    local shard's flattened elements, padded to the longest rank's length ``L``; DCP then saves
    every rank's row (a plain tensor would count as replicated: only one copy would be saved).
    """
    if is_dtensor(p):
        ranks, most = _shard_layout(p)
        return (ranks, lowbit.n_code_bytes(most, bits)), (ranks, lowbit.n_blocks(most))
    n = real_numel(p)
    return (lowbit.n_code_bytes(n, bits),), (lowbit.n_blocks(n),)


def local_state(state: Mapping[str, Any], numel: int, bits: int) -> tuple[Tensor, Tensor]:
    """1-D views of the codes and scales of ``numel`` local real elements (a rank's row, unpadded, if sharded)."""
    codes, scales = state["codes"], state["scales"]
    if is_dtensor(codes):
        return (codes.to_local()[0, : lowbit.n_code_bytes(numel, bits)],
                scales.to_local()[0, : lowbit.n_blocks(numel)])
    return codes, scales


def real_numel(p: Tensor) -> int:
    """Elements of ``p``'s real view (a complex element is two)."""
    return p.numel() * (2 if p.is_complex() else 1)


def bits_for(p: Tensor, group: Mapping[str, Any]) -> int:
    """The state bits ``p`` gets in ``group``: the group's ``state_bits`` if ``p`` is large enough, else 32."""
    bits = int(group.get("state_bits", 32))
    return bits if lowbit.is_quantized(real_numel(p), bits) else 32


def init_state(state: dict[str, Any], p: Tensor, bits: int, seed: int) -> None:
    """Codes and scales that decode to ``v = 0`` (the float state's start), and the param's seed.

    A DTensor param (FSDP2) gets DTensor codes and scales of :func:`state_shapes`, on its mesh.
    """
    codes_shape, scales_shape = state_shapes(p, bits)
    codes = torch.zeros(codes_shape[-1], dtype=torch.uint8, device=p.device)
    scales = torch.zeros(scales_shape[-1], dtype=torch.float32, device=p.device)
    if is_dtensor(p):
        from torch.distributed.tensor import DTensor, Shard

        codes, scales = (
            DTensor.from_local(t.unsqueeze(0), p.device_mesh, [Shard(0)], run_check=False,  # type: ignore[attr-defined]
                               shape=torch.Size(shape), stride=(shape[1], 1))
            for t, shape in ((codes, codes_shape), (scales, scales_shape))
        )
    state["codes"], state["scales"] = codes, scales
    state["seed"] = int(seed) & 0xFFFFFFFF


def _real(x: Tensor) -> Tensor:
    return torch.view_as_real(x) if x.is_complex() else x


def fused_available(params: list[Tensor]) -> bool:
    """Whether the fused low-bit kernel (:mod:`ftmlopt.torch._fused_lowbit`) can step these params.

    CPU: the LLVM kernel (:mod:`ftmlopt.kernels.cpu_lowbit`, needs llvmlite). CUDA: the Triton
    kernel (:mod:`ftmlopt.kernels.triton_lowbit`, needs Triton). Otherwise the reference steps them.
    """
    kinds = {p.device.type for p in params}
    if kinds == {"cpu"}:
        from ftmlopt.kernels import cpu_lowbit

        return bool(cpu_lowbit.AVAILABLE)
    if kinds == {"cuda"}:
        from ftmlopt.kernels import triton_lowbit

        return bool(triton_lowbit.AVAILABLE)
    return False


@torch.compiler.disable  # type: ignore[misc, unused-ignore]
def step_quantized(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    group: Mapping[str, Any],
    *,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    fused: bool | None = None,
    foreach: bool | None = None,
) -> None:
    """One step of the quantized params of one group, in place (``params`` may be float32 masters).

    The group's ``fused`` True, or both ``fused`` and ``foreach`` None (the default, as for float
    state), with the fused low-bit kernel available for these params (:func:`fused_available`): one
    kernel call through
    :func:`ftmlopt.torch._fused_lowbit.fused_ftml_lowbit`. Otherwise, per param: ``step += 1``, then
    :func:`ftmlopt.lowbit.compact_step` with the group's hyper-parameters and Python-float constants
    (as the for-loop's), in the compute dtype (float32 for float16/bfloat16), on the real view.
    ``grad_scale`` / ``found_inf`` (GradScaler on the fused path): a step with ``found_inf`` set
    changes nothing; otherwise the gradient is divided by ``grad_scale`` and written back unscaled,
    as the fused kernels do.

    Under ``torch.compile`` this function runs eagerly (``torch.compiler.disable``): traced, its
    step count's ``.item()`` and in-place state updates were silently lost (the compiled step left the
    params and the state as they were), so the low-bit part of a compiled step is a graph break.
    """
    if not params:
        return
    bits = int(group["state_bits"])
    beta1, beta2 = group["betas"]
    lr = group["lr"]
    lr = float(lr) if isinstance(lr, Tensor) else lr
    reals, real_grads = [_real(_local(p)) for p in params], [_real(_local(g)) for g in grads]
    if any(w.numel() == 0 for w in reals):  # an empty shard (FSDP2): only its step is counted
        if found_inf is None or not bool(found_inf):
            for w, state in zip(reals, states):
                if w.numel() == 0:
                    state["step"] += 1
        keep = [i for i, w in enumerate(reals) if w.numel() > 0]
        reals, real_grads = [reals[i] for i in keep], [real_grads[i] for i in keep]
        states = [states[i] for i in keep]
        if not reals:
            return
    local = [local_state(s, w.numel(), bits) for w, s in zip(reals, states)]
    if (fused or (fused is None and foreach is None)) and fused_available(reals):
        from ftmlopt.torch._fused_lowbit import fused_ftml_lowbit

        fused_ftml_lowbit(
            reals, real_grads, [q for q, _ in local], [s for _, s in local],
            [int(s["seed"]) for s in states], [s["step"] for s in states], grad_scale=grad_scale,
            found_inf=found_inf, lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], clip_gradient=group["clip_gradient"],
            decoupled_weight_decay=group["decoupled_weight_decay"], maximize=group["maximize"], bits=bits,
        )
        return
    if found_inf is not None and bool(found_inf):
        return
    hyper = dict(weight_decay=group["weight_decay"], decoupled=group["decoupled_weight_decay"],
                 clip=group["clip_gradient"], maximize=group["maximize"])
    cache: dict[int, rule.Constants] = {}
    for w, g, state, (codes_t, scales_t) in zip(reals, real_grads, states, local):
        if grad_scale is not None:
            g.div_(grad_scale.to(g.device))
        state["step"] += 1
        t = int(state["step"].item())
        c = cache.get(t) or cache.setdefault(t, rule.constants(lr, t, beta1, beta2, group["eps"], **hyper))
        compute = torch.float64 if w.dtype == torch.float64 else torch.float32
        new_w, codes, scales = lowbit.compact_step(
            w.to(compute), g.to(compute), codes_t, scales_t, c, bits=bits, seed=state["seed"], step=t
        )
        w.copy_(new_w)
        codes_t.copy_(codes)
        scales_t.copy_(scales)


# ----------------------------------------------------------------------------------------------- checkpoints
def _saved_bits(entry: Mapping[str, Any], n: int, saved_group: Mapping[str, Any]) -> int:
    """The bits of a saved low-bit entry: the saved group's ``state_bits``, else read from the codes' length."""
    bits = saved_group.get("state_bits")
    if bits in (8, 4):
        return int(bits)
    codes = entry["codes"]
    return 8 if codes.numel() == n and n > 1 else 4


def check_saved_entry(entry: Mapping[str, Any], p: Tensor, saved_group: Mapping[str, Any], where: str) -> bool:
    """Whether a saved state entry is a low-bit one; if so, that it is well formed for ``p`` (ValueError)."""
    if "codes" not in entry:
        return False
    extra = set(entry) - {"step", "master", *LOWBIT_KEYS}
    missing = {"step", *LOWBIT_KEYS} - set(entry)
    if extra or missing:
        raise ValueError(f"low-bit state of {where} has keys {sorted(entry)}, expected "
                         f"{sorted(['step', *LOWBIT_KEYS])} (+ 'master')")
    n = real_numel(p)
    bits = _saved_bits(entry, n, saved_group)
    codes, scales, seed = entry["codes"], entry["scales"], entry["seed"]
    codes_shape, scales_shape = state_shapes(p, bits)
    sharded = is_dtensor(p)
    # a sharded param's codes are one row per rank: another number of ranks (or a plain tensor) is another layout
    layout = (" (a DTensor, one row per rank: a low-bit checkpoint loads into the same number of ranks only)"
              if sharded else "")
    _check_saved_tensor("codes", codes, torch.uint8, codes_shape, sharded, where,
                        f"{layout} ({bits}-bit codes of {n} elements)")
    _check_saved_tensor("scales", scales, torch.float32, scales_shape, sharded, where, layout)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"state 'seed' of {where} must be an int in [0, 2**32), got {seed!r}")
    return True


def _check_saved_tensor(name: str, value: Any, dtype: torch.dtype, shape: tuple[int, ...], sharded: bool,
                        where: str, detail: str) -> None:
    """A saved state tensor ``name`` has ``dtype`` and ``shape`` and is a DTensor iff ``sharded`` (ValueError)."""
    if not (isinstance(value, Tensor) and value.dtype == dtype and tuple(value.shape) == shape
            and is_dtensor(value) == sharded):
        desc = f"{type(value).__name__} {value.dtype} {tuple(value.shape)}" if isinstance(value, Tensor) else \
            type(value).__name__
        raise ValueError(f"state '{name}' of {where} must be a {str(dtype).removeprefix('torch.')} tensor of shape "
                         f"{shape}{detail}, got {desc}")


def convert_entry(
    entry: dict[str, Any],
    p: Tensor,
    saved_group: Mapping[str, Any],
    live_group: Mapping[str, Any],
    seed: int,
    state_dtype: torch.dtype,
) -> tuple[dict[str, Any], str | None]:
    """A saved entry in the layout ``live_group`` gives ``p``; and a note when it had to be converted.

    float ``v`` -> codes and scales: quantized to the nearest code (deterministic), seed ``seed``.
    codes and scales -> float ``v`` (``state_dtype``): decoded. Between 8 and 4 bits: decoded, then
    quantized. Both directions keep ``step`` (and ``master``).
    """
    want = bits_for(p, live_group)
    n = real_numel(p)
    if "codes" in entry:
        have = _saved_bits(entry, n, saved_group)
        if have == want:
            return entry, None
    elif want == 32 or "v" not in entry:
        return entry, None
    else:
        have = 32
    if is_dtensor(p):
        raise NotImplementedError(
            f"FTML.load_state_dict: converting the state of a DTensor (sharded) param from "
            f"{'float' if have == 32 else f'{have}-bit'} to {'float' if want == 32 else f'{want}-bit'} state is "
            "not supported; load it into an FTML with the checkpoint's state_bits"
        )
    if "codes" in entry:
        v = lowbit.decode(entry["codes"].to(p.device), entry["scales"].to(p.device), n, have)
    else:
        v = _real(entry["v"]).to(device=p.device, dtype=torch.float32).reshape(-1)
    rest = {k: x for k, x in entry.items() if k not in ("v", *LOWBIT_KEYS)}
    if want == 32:
        real_shape = _real(p).shape
        v_real = v.reshape(real_shape)
        if p.is_complex():
            v_full = torch.view_as_complex(v_real.to(state_dtype.to_real()).contiguous())
        else:
            v_full = v_real.to(state_dtype)
        return {**rest, "v": v_full}, f"{have}-bit -> float state"
    codes, scales = lowbit.quantize(v, want, rounding="nearest")
    note = f"{'float' if have == 32 else f'{have}-bit'} state -> {want}-bit"
    return {**rest, "codes": codes, "scales": scales, "seed": int(seed) & 0xFFFFFFFF}, note


def restore_saved(state: dict[str, Any], saved: Mapping[str, Any], device: torch.device) -> None:
    """Put a low-bit entry's codes and scales back as they were saved (the base loader casts them)."""
    for key in ("codes", "scales"):
        if key in saved and key in state:
            state[key] = saved[key].to(device=device, copy=True)


def state_bytes(state: Mapping[str, Any]) -> int:
    """Bytes of a param's optimizer state tensors (``step`` and ``master`` excluded); this rank's, if sharded."""
    return sum(_local(x).numel() * x.element_size() for k, x in state.items()
               if isinstance(x, Tensor) and k not in ("step", "master"))
