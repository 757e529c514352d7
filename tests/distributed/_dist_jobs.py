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


def lowbit_reference_run(steps: int) -> dict[str, list[torch.Tensor]]:
    """Single-process FTML(state_bits=4) on the global batches of :func:`build_big_model`."""
    model = build_big_model()
    opt = FTML(model.parameters(), lr=LR, **LOWBIT_CONFIG)
    local_steps(model, opt, 0, steps)
    return snapshot(model, opt)


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


def _fsdp_model() -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = build_model()
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


def launch(job: Any, world: int, outdir: Path) -> None:
    """Run ``job(rank, world, port, outdir)`` in ``world`` fresh processes and wait for them."""
    import torch.multiprocessing as mp

    mp.spawn(job, args=(world, free_port(), str(outdir)), nprocs=world, join=True)
