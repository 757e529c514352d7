"""Worker jobs for the distributed tests (run by ``torch.multiprocessing.spawn``, gloo on 127.0.0.1).

Each job joins a process group, runs several checks, and writes what it observed to
``<outdir>/rank<r>.pt`` (``torch.save`` of plain tensors). The comparisons happen in the pytest
process, against :func:`reference_run`, a single-process run on the same global batch.

How the runs are made comparable bit for bit: the global batch of 8 rows is split in two halves;
each rank computes the mean loss of its half, and the data-parallel wrappers average the two
gradients (``(g0 + g1) / 2``, a sum of two terms and a division by two: exact and
order-independent). The single-process reference accumulates the same two half-batch gradients
and halves them, so every run sees the same gradient bits, and FTML (element-wise) then gives
the same bits whatever the sharding.
"""

from __future__ import annotations

import contextlib
import os
import socket
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ftmlopt.torch import FTML

#: FTML configurations every wrapper is checked with (the keys name them in the results).
#: The default (compact) form on every implementation, and MXNet's three-state form (``compact=False``,
#: state ``d, v, z``) on the for-loop and foreach paths.
CONFIGS: dict[str, dict[str, Any]] = {
    "loop": {"foreach": False, "fused": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
    "loop_mxnet_wd_clip_max": {
        "foreach": False, "compact": False, "weight_decay": 0.05, "clip_gradient": 0.3, "maximize": True,
    },
    "fused_decoupled": {"fused": True, "weight_decay": 0.1, "decoupled_weight_decay": True},
    "foreach_mxnet": {"foreach": True, "compact": False, "weight_decay": 0.01},
}
LR = 0.02
STEPS = 4
#: torch.distributed.checkpoint round trip: save after DCP_K1 steps (2 ranks), load into 1 rank,
#: run to DCP_K2 and save, load into 2 ranks again and run to DCP_TOTAL.
DCP_K1, DCP_K2, DCP_TOTAL = 1, 3, 5
DCP_CONFIG = "fused_decoupled"
#: low-bit state under DDP (on :func:`build_big_model`, whose first weight is large enough to be quantized)
LOWBIT_CONFIG: dict[str, Any] = {"state_bits": 4, "weight_decay": 0.01}


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_model() -> nn.Module:
    """A small MLP; its last layer has a single output row, so FSDP2 gives rank 1 empty shards."""
    torch.manual_seed(1234)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 1))


def build_big_model() -> nn.Module:
    """An MLP whose first weight (4500 elements) gets low-bit state; the rest keep float state."""
    torch.manual_seed(99)
    return nn.Sequential(nn.Linear(5, 900), nn.Tanh(), nn.Linear(900, 1))


#: low-bit state under FSDP2 (:func:`build_lowbit_model`): hyper-parameters; DCP saves after LOWBIT_DCP_K steps
LOWBIT_FSDP_CONFIG: dict[str, Any] = {"weight_decay": 0.01}
LOWBIT_DCP_K, LOWBIT_DCP_TOTAL = 2, 4


def build_lowbit_model() -> nn.Module:
    """An MLP whose params all get low-bit state, with odd and unequal shards under FSDP2 on 2 ranks.

    ``0.weight`` (4201 x 5): 10505 and 10500 elements per rank; ``0.bias``: 2101 and 2100;
    ``2.weight`` (1 x 4201): all 4201 on rank 0, an empty shard on rank 1. None is a multiple of
    the block (128).
    """
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(5, 4201), nn.Tanh(), nn.Linear(4201, 1, bias=False))


def lowbit_reference_run(steps: int) -> dict[str, list[torch.Tensor]]:
    """Single-process FTML(state_bits=4) on the global batches of :func:`build_big_model`."""
    model = build_big_model()
    opt = FTML(model.parameters(), lr=LR, **LOWBIT_CONFIG)
    local_steps(model, opt, 0, steps)
    return snapshot(model, opt)


def shard_rows(rows: int, rank: int, world: int = 2) -> slice:
    """The rows of dim 0 that FSDP2 gives ``rank``: ``ceil(rows / world)`` each, the last ranks shorter or empty."""
    size = -(-rows // world)
    return slice(min(rank * size, rows), min((rank + 1) * size, rows))


def lowbit_per_shard_reference(bits: int, steps: int, fused: bool) -> list[dict[str, list[torch.Tensor]]]:
    """Rank by rank, what FSDP2 with ``FTML(state_bits=bits)`` must hold: each rank's shard of each param
    stepped as a tensor of its own by the reference, :func:`ftmlopt.lowbit.compact_step` (blocks and
    rounding bits over the shard's flattened elements, the seed the param's index), on the full
    gradient of the global batch. ``fused``: as the fused CPU kernel is tested to equal it (NumPy,
    float32 constants); else as the for-loop runs it (torch tensors, Python-float constants)."""
    from ftmlopt import lowbit, rule

    model = build_lowbit_model()
    params = list(model.parameters())
    state: dict[tuple[int, int], tuple[Any, Any]] = {}
    for i, p in enumerate(params):
        for rank in (0, 1):
            n = p[shard_rows(p.shape[0], rank)].numel()
            state[i, rank] = lowbit.zeros_state(n, bits, ops=lowbit.ops_for(p.detach().numpy() if fused else p))
    for t in range(1, steps + 1):
        model.zero_grad(set_to_none=True)
        for half in (0, 1):
            half_loss(model, t - 1, half).backward()
        c = rule.constants(LR, t, rule.DEFAULT_BETA1, rule.DEFAULT_BETA2, rule.DEFAULT_EPS,
                           weight_decay=LOWBIT_FSDP_CONFIG["weight_decay"])
        if fused:
            c = c.cast(np.float32)
        with torch.no_grad():
            for i, p in enumerate(params):
                g = p.grad / 2
                for rank in (0, 1):
                    rows = shard_rows(p.shape[0], rank)
                    if p[rows].numel() == 0:
                        continue
                    codes, scales = state[i, rank]
                    w_t, g_t = (p[rows].numpy().copy(), g[rows].numpy()) if fused else (p[rows], g[rows])
                    w, codes, scales = lowbit.compact_step(w_t, g_t, codes, scales, c, bits=bits, seed=i, step=t)
                    p[rows] = torch.as_tensor(w)
                    state[i, rank] = codes, scales
    out = []
    for rank in (0, 1):
        ranked: dict[str, list[torch.Tensor]] = {"params": [], "state": []}
        for i, p in enumerate(params):
            ranked["params"].append(p.detach()[shard_rows(p.shape[0], rank)].clone())
            ranked["state"] += [torch.tensor(float(steps)), *(torch.as_tensor(x) for x in state[i, rank])]
        out.append(ranked)
    return out


def lowbit_single_process_run(bits: int, steps: int) -> tuple[nn.Module, FTML]:
    """One process, ``FTML(state_bits=bits)`` on :func:`build_lowbit_model`: blocks over each whole param."""
    model = build_lowbit_model()
    opt = FTML(model.parameters(), lr=LR, state_bits=bits, **LOWBIT_FSDP_CONFIG)
    local_steps(model, opt, 0, steps)
    return model, opt


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of step ``step`` (0-based): 8 rows, deterministic."""
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 5, generator=gen), torch.randn(8, 1, generator=gen)


def half_loss(model: nn.Module, step: int, half: int) -> torch.Tensor:
    """Mean squared error on half ``half`` (0 or 1) of the global batch of ``step``."""
    x, y = global_batch(step)
    rows = slice(4 * half, 4 * half + 4)
    return ((model(x[rows]) - y[rows]) ** 2).mean()


def make_opt(params: Any, name: str) -> FTML:
    return FTML(params, lr=LR, **CONFIGS[name])


def local_steps(model: nn.Module, opt: torch.optim.Optimizer, first: int, last: int) -> None:
    """Single process: steps ``first..last-1`` with the two half-batch gradients averaged."""
    for step in range(first, last):
        opt.zero_grad(set_to_none=True)
        for half in (0, 1):
            half_loss(model, step, half).backward()
        for p in model.parameters():
            p.grad.div_(2)
        opt.step()


def reference_run(name: str, steps: int) -> dict[str, list[torch.Tensor]]:
    """Single-process FTML on the global batches: final params and state (in parameter order)."""
    model = build_model()
    opt = make_opt(model.parameters(), name)
    local_steps(model, opt, 0, steps)
    return snapshot(model, opt)


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    t = t.detach()
    return (t.full_tensor() if isinstance(t, DTensor) else t).clone()


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, list[torch.Tensor]]:
    """Full (unsharded) params and FTML state, in parameter order (collective under FSDP2)."""
    params = list(model.parameters())
    state = []
    for p in params:
        st = opt.state[p]
        state.extend(_full(st[k]) for k in ("step", "d", "v", "z", "codes", "scales") if k in st)
    return {"params": [_full(p) for p in params], "state": state}


def data_parallel_steps(model: nn.Module, opt: Any, rank: int, first: int, last: int) -> None:
    """Each rank backpropagates its half of the global batch; the wrapper averages the gradients."""
    for step in range(first, last):
        opt.zero_grad(set_to_none=True)
        half_loss(model, step, rank).backward()
        opt.step()


@contextlib.contextmanager
def _recorded(out: dict[str, Any], key: str) -> Iterator[None]:
    """Record an exception raised by one check as ``out[key] = {"error": traceback}`` and go on.

    The checks fail symmetrically (in the optimizer step, on both ranks), so the next check
    still finds both ranks ready for its collectives.
    """
    try:
        yield
    except Exception:
        out[key] = {"error": traceback.format_exc()}


def _init(rank: int, world: int, port: int) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # stay on the loopback interface
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def _fsdp_model(build: Any = build_model) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = build()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _dcp_save(model: nn.Module, opt: torch.optim.Optimizer, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))


def _dcp_load(model: nn.Module, opt: torch.optim.Optimizer, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    sd = {"model": model_sd, "optim": optim_sd}
    dcp.load(sd, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def dcp_single_process(load_from: Path, save_to: Path) -> dict[str, Any]:
    """The 1-rank leg (no process group): load the 2-rank checkpoint, run to DCP_K2, save, run on."""
    model = build_model()
    opt = make_opt(model.parameters(), DCP_CONFIG)
    _dcp_load(model, opt, load_from)
    loaded = snapshot(model, opt)
    local_steps(model, opt, DCP_K1, DCP_K2)
    _dcp_save(model, opt, save_to)
    local_steps(model, opt, DCP_K2, DCP_TOTAL)
    return {"loaded": loaded, "final": snapshot(model, opt)}


# --------------------------------------------------------------------------- jobs
def job_wrappers(rank: int, world: int, port: int, outdir: str) -> None:
    """DDP, FSDP2 and ZeRO for every config, then the first leg of the DCP round trip."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    _init(rank, world, port)
    out: dict[str, Any] = {}
    try:
        for name in CONFIGS:
            with _recorded(out, f"ddp/{name}"):
                # DDP: every rank holds the whole model and steps it with the averaged gradient.
                ddp = DDP(build_model())
                opt = make_opt(ddp.parameters(), name)
                data_parallel_steps(ddp, opt, rank, 0, STEPS)
                out[f"ddp/{name}"] = snapshot(ddp.module, opt)

            with _recorded(out, f"zero/{name}"):
                # ZeroRedundancyOptimizer: each rank steps its partition with FTML, then broadcasts.
                ddp = DDP(build_model())
                zero = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=FTML, lr=LR, **CONFIGS[name])
                data_parallel_steps(ddp, zero, rank, 0, STEPS)
                zero.consolidate_state_dict(to=0)
                out[f"zero/{name}"] = {"params": [p.detach().clone() for p in ddp.parameters()]}
                if rank == 0:
                    out[f"zero/{name}"]["state_dict"] = zero.state_dict()

            with _recorded(out, f"fsdp/{name}"):
                # FSDP2: DTensor parameters sharded on dim 0; FTML steps the local shards.
                model = _fsdp_model()
                opt = make_opt(model.parameters(), name)
                data_parallel_steps(model, opt, rank, 0, STEPS)
                out[f"fsdp/{name}"] = snapshot(model, opt)
                out[f"fsdp/{name}"]["local_numel"] = [p.to_local().numel() for p in model.parameters()]

        with _recorded(out, "ddp/lowbit"):
            # low-bit state: the rounding bits come from (seed, step, index), so replicas stay identical
            # whatever each process's global generator holds
            ddp = DDP(build_big_model())
            opt = FTML(ddp.parameters(), lr=LR, **LOWBIT_CONFIG)
            torch.manual_seed(1000 + rank)
            data_parallel_steps(ddp, opt, rank, 0, STEPS)
            out["ddp/lowbit"] = snapshot(ddp.module, opt)

        with _recorded(out, "dcp/uninterrupted"):
            # DCP, leg 1: FSDP2 on 2 ranks, save after DCP_K1 steps, and keep going (the run that never stops).
            model = _fsdp_model()
            opt = make_opt(model.parameters(), DCP_CONFIG)
            data_parallel_steps(model, opt, rank, 0, DCP_K1)
            _dcp_save(model, opt, Path(outdir) / "dcp_k1")
            data_parallel_steps(model, opt, rank, DCP_K1, DCP_TOTAL)
            out["dcp/uninterrupted"] = snapshot(model, opt)
    finally:
        torch.save(out, Path(outdir) / f"rank{rank}.pt")
        dist.barrier()  # both ranks are done with gloo before it is torn down
        dist.destroy_process_group()


def job_dcp_reshard_back(rank: int, world: int, port: int, outdir: str) -> None:
    """DCP, leg 3: load the 1-rank checkpoint into FSDP2 on 2 ranks and run to DCP_TOTAL."""
    _init(rank, world, port)
    out: dict[str, Any] = {}
    try:
        with _recorded(out, "dcp/back"):
            model = _fsdp_model()
            opt = make_opt(model.parameters(), DCP_CONFIG)
            _dcp_load(model, opt, Path(outdir) / "dcp_k2")
            out["dcp/back"] = {"loaded_k2": snapshot(model, opt)}
            data_parallel_steps(model, opt, rank, DCP_K2, DCP_TOTAL)
            out["dcp/back"]["resumed"] = snapshot(model, opt)
    finally:
        torch.save(out, Path(outdir) / f"rank{rank}_back.pt")
        dist.barrier()  # both ranks are done with gloo before it is torn down
        dist.destroy_process_group()


def _local_lowbit(model: nn.Module, opt: FTML, bits: int) -> dict[str, list[torch.Tensor]]:
    """Each param's local shard, and its state (step, codes, scales) as this rank's kernels see it."""
    from ftmlopt.torch import _lowbit

    params, state = [], []
    for p in model.parameters():
        local = p.detach().to_local()
        params.append(local.clone())
        st = opt.state[p]
        codes, scales = _lowbit.local_state(st, local.numel(), bits)
        state += [st["step"].clone(), codes.clone(), scales.clone()]
    return {"params": params, "state": state}


def _lowbit_fsdp_run(bits: int, rank: int, first: int, last: int, path: Path | None = None,
                     fused: bool = True) -> Any:
    model = _fsdp_model(build_lowbit_model)
    impl = {"fused": True} if fused else {"fused": False, "foreach": False}
    opt = FTML(model.parameters(), lr=LR, state_bits=bits, **impl, **LOWBIT_FSDP_CONFIG)
    if path is not None:
        _dcp_load(model, opt, path)
    data_parallel_steps(model, opt, rank, first, last)
    return model, opt


def job_lowbit_fsdp(rank: int, world: int, port: int, outdir: str) -> None:
    """FSDP2 with low-bit state (8 and 4 bits), and a DCP save / load round trip of it on 2 ranks."""
    from ftmlopt.torch import _lowbit

    _init(rank, world, port)
    out: dict[str, Any] = {}
    try:
        for bits in (8, 4):
            for path in ("loop", "fused"):
                key = f"fsdp/lowbit{bits}/{path}"
                with _recorded(out, key):
                    model, opt = _lowbit_fsdp_run(bits, rank, 0, STEPS, fused=path == "fused")
                    out[key] = _local_lowbit(model, opt, bits)
                    out[key]["state_types"] = [type(opt.state[p][k]).__name__
                                               for p in model.parameters() for k in ("codes", "scales")]
                    out[key]["state_bytes"] = [_lowbit.state_bytes(opt.state[p]) for p in model.parameters()]

        with _recorded(out, "tp/lowbit"):
            # a DTensor sharded otherwise than FSDP2's dim 0 (tensor-parallel Shard(1)) is refused, nothing changed
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.tensor import Shard, distribute_tensor

            mesh = init_device_mesh("cpu", (world,))
            plain = nn.Parameter(torch.ones(5000))
            cols = nn.Parameter(distribute_tensor(torch.ones(64, 100), mesh, [Shard(1)]))
            opt = FTML([plain, cols], lr=LR, state_bits=8)
            plain.grad, cols.grad = torch.ones(5000), distribute_tensor(torch.ones(64, 100), mesh, [Shard(1)])
            try:
                opt.step()
                out["tp/lowbit"] = {"refused": ""}
            except NotImplementedError as err:
                out["tp/lowbit"] = {"refused": str(err)}
            out["tp/lowbit"].update(n_state=len(opt.state), plain=plain.detach().clone(),
                                    cols=cols.detach().to_local().clone())

        with _recorded(out, "reshard/lowbit"):
            # a one-process low-bit state dict (1-D codes over each whole param) loaded into FSDP2: refused
            single = lowbit_single_process_run(4, 1)[1].state_dict()
            model, opt = _lowbit_fsdp_run(4, rank, 0, 1)
            before = _local_lowbit(model, opt, 4)
            try:
                opt.load_state_dict(single)
                out["reshard/lowbit"] = {"refused": ""}
            except ValueError as err:
                out["reshard/lowbit"] = {"refused": str(err)}
            out["reshard/lowbit"].update(before=before, after=_local_lowbit(model, opt, 4))

        with _recorded(out, "convert/lowbit"):
            # an FSDP2 8-bit state dict into an FSDP2 4-bit optimizer: converting sharded state is refused
            saved = _lowbit_fsdp_run(8, rank, 0, 1)[1].state_dict()
            model, opt = _lowbit_fsdp_run(4, rank, 0, 1)
            before = _local_lowbit(model, opt, 4)
            try:
                opt.load_state_dict(saved)
                out["convert/lowbit"] = {"refused": ""}
            except NotImplementedError as err:
                out["convert/lowbit"] = {"refused": str(err)}
            out["convert/lowbit"].update(before=before, after=_local_lowbit(model, opt, 4))

        for bits in (4, 8):
            key = f"dcp/lowbit{bits}"
            with _recorded(out, key):
                path = Path(outdir) / f"dcp_lowbit{bits}"
                model, opt = _lowbit_fsdp_run(bits, rank, 0, LOWBIT_DCP_K)
                _dcp_save(model, opt, path)
                data_parallel_steps(model, opt, rank, LOWBIT_DCP_K, LOWBIT_DCP_TOTAL)
                out[key] = {"uninterrupted": _local_lowbit(model, opt, bits)}
                model, opt = _lowbit_fsdp_run(bits, rank, LOWBIT_DCP_K, LOWBIT_DCP_TOTAL, path)
                out[key]["resumed"] = _local_lowbit(model, opt, bits)
    finally:
        torch.save(out, Path(outdir) / f"rank{rank}_lowbit.pt")
        dist.barrier()  # both ranks are done with gloo before it is torn down
        dist.destroy_process_group()


def launch(job: Any, world: int, outdir: Path) -> None:
    """Run ``job(rank, world, port, outdir)`` in ``world`` fresh processes and wait for them."""
    import torch.multiprocessing as mp

    mp.spawn(job, args=(world, free_port(), str(outdir)), nprocs=world, join=True)
