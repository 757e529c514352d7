"""ftmlopt.torch.FTML under torch.distributed: DDP, FSDP2, ZeRO, and DCP resharding (CPU, gloo, 2 ranks).

Two spawned jobs (module-scoped, to pay the process start-up once): ``job_wrappers`` runs DDP,
ZeroRedundancyOptimizer and FSDP2 for every config of ``CONFIGS`` plus the first leg of the
checkpoint round trip; ``job_dcp_reshard_back`` runs the last leg. The expected values come from
a single-process run in this process on the same global batches (see ``_dist_jobs``), and every
comparison is bit for bit (``torch.equal``): FTML is element-wise and the gradients are the same
bits in every layout, so nothing may differ.

Low-bit state (``job_lowbit_fsdp``) is quantized per local shard under FSDP2: bit for bit against
the reference stepping each rank's shard alone, within a stated tolerance against one process
(``LOWBIT_VS_ONE_PROCESS``), and bit for bit across a DCP save and load on the same two ranks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import _dist_jobs as J
import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _assert_same(actual: list[torch.Tensor], expected: list[torch.Tensor], what: str) -> None:
    assert len(actual) == len(expected), f"{what}: {len(actual)} tensors, expected {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape, f"{what}[{i}]: {a.dtype} {a.shape} vs {e.dtype} {e.shape}"
        assert torch.equal(a, e), f"{what}[{i}] differs: max abs diff {(a - e).abs().max().item():.3e}"


def _result(results: dict[str, Any], key: str) -> Any:
    """``results[key]``, failing with the worker's traceback when that check raised there."""
    value = results[key]
    if "error" in value:
        pytest.fail(f"{key} raised in the worker:\n{value['error']}")
    return value


@pytest.fixture(scope="module")
def outdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def wrappers(outdir: Path) -> list[dict[str, Any]]:
    """Results of ``job_wrappers`` from rank 0 and rank 1."""
    J.launch(J.job_wrappers, 2, outdir)
    return [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def references() -> dict[str, dict[str, list[torch.Tensor]]]:
    return {name: J.reference_run(name, J.STEPS) for name in J.CONFIGS}


@pytest.mark.parametrize("name", list(J.CONFIGS))
def test_ddp_equals_single_process(wrappers: list[dict[str, Any]], references: dict[str, Any], name: str) -> None:
    ref = references[name]
    for rank in (0, 1):
        got = _result(wrappers[rank], f"ddp/{name}")
        _assert_same(got["params"], ref["params"], f"DDP rank {rank} params")
        _assert_same(got["state"], ref["state"], f"DDP rank {rank} state")
    # And the parameters moved: the check above is not comparing two untouched models.
    assert not torch.equal(ref["params"][0], J.build_model()[0].weight.detach())


def test_ddp_low_bit_replicas_equal_single_process(wrappers: list[dict[str, Any]]) -> None:
    """FTML(state_bits=4) under DDP: both replicas' params, codes and scales equal the single-process run's."""
    ref = J.lowbit_reference_run(J.STEPS)
    assert len(ref["state"]) == 3 + 2 + 2 + 2  # (step, codes, scales) for the 4500-element weight; (step, v) x 3
    for rank in (0, 1):
        got = _result(wrappers[rank], "ddp/lowbit")
        _assert_same(got["params"], ref["params"], f"DDP low-bit rank {rank} params")
        _assert_same(got["state"], ref["state"], f"DDP low-bit rank {rank} state")
    assert ref["state"][1].dtype == torch.uint8


@pytest.mark.parametrize("name", list(J.CONFIGS))
def test_fsdp2_equals_unsharded(wrappers: list[dict[str, Any]], references: dict[str, Any], name: str) -> None:
    ref = references[name]
    for rank in (0, 1):
        got = _result(wrappers[rank], f"fsdp/{name}")
        _assert_same(got["params"], ref["params"], f"FSDP2 rank {rank} params")
        _assert_same(got["state"], ref["state"], f"FSDP2 rank {rank} state")
    # The parameters really were sharded (rank 1 holds empty shards of the 1-row last layer).
    full = [p.numel() for p in J.build_model().parameters()]
    local0, local1 = (_result(wrappers[r], f"fsdp/{name}")["local_numel"] for r in (0, 1))
    assert [a + b for a, b in zip(local0, local1)] == full
    assert local0[0] < full[0] and local1[0] > 0 and local1[-1] == 0


@pytest.mark.parametrize("name", list(J.CONFIGS))
def test_zero_redundancy_equals_single_process(
    wrappers: list[dict[str, Any]], references: dict[str, Any], name: str
) -> None:
    ref = references[name]
    zero = [_result(wrappers[r], f"zero/{name}") for r in (0, 1)]
    for rank in (0, 1):
        _assert_same(zero[rank]["params"], ref["params"], f"ZeRO rank {rank} params")

    # The consolidated state dict is an ordinary FTML state dict: load it into a plain FTML
    # (one process) and take one more step; that equals STEPS + 1 uninterrupted steps.
    model = J.build_model()
    with torch.no_grad():
        for p, saved in zip(model.parameters(), zero[0]["params"]):
            p.copy_(saved)
    opt = J.make_opt(model.parameters(), name)
    opt.load_state_dict(zero[0]["state_dict"])
    _assert_same(J.snapshot(model, opt)["state"], ref["state"], "ZeRO consolidated state")
    J.local_steps(model, opt, J.STEPS, J.STEPS + 1)
    more = J.reference_run(name, J.STEPS + 1)
    _assert_same(J.snapshot(model, opt)["params"], more["params"], "ZeRO state dict, resumed")
    _assert_same(J.snapshot(model, opt)["state"], more["state"], "ZeRO state dict, resumed state")


def test_dcp_two_ranks_to_one_and_back(wrappers: list[dict[str, Any]], outdir: Path) -> None:
    """Save on 2 ranks (FSDP2) after k=1, load into 1 process, save at 3, load into 2 ranks, run to 5."""
    total = J.reference_run(J.DCP_CONFIG, J.DCP_TOTAL)
    at_k1 = J.reference_run(J.DCP_CONFIG, J.DCP_K1)
    for rank in (0, 1):
        _assert_same(_result(wrappers[rank], "dcp/uninterrupted")["params"], total["params"], "uninterrupted FSDP2 run")

    one = J.dcp_single_process(outdir / "dcp_k1", outdir / "dcp_k2")
    _assert_same(one["loaded"]["params"], at_k1["params"], "1-rank load, params")
    _assert_same(one["loaded"]["state"], at_k1["state"], "1-rank load, state")
    _assert_same(one["final"]["params"], total["params"], "1-rank continuation")
    _assert_same(one["final"]["state"], total["state"], "1-rank continuation, state")

    J.launch(J.job_dcp_reshard_back, 2, outdir)
    at_k2 = J.reference_run(J.DCP_CONFIG, J.DCP_K2)
    for rank in (0, 1):
        back = _result(torch.load(outdir / f"rank{rank}_back.pt", weights_only=False), "dcp/back")
        _assert_same(back["loaded_k2"]["params"], at_k2["params"], f"2-rank reload rank {rank}, params")
        _assert_same(back["loaded_k2"]["state"], at_k2["state"], f"2-rank reload rank {rank}, state")
        _assert_same(back["resumed"]["params"], total["params"], f"2-rank resumed rank {rank}")
        _assert_same(back["resumed"]["state"], total["state"], f"2-rank resumed rank {rank}, state")


# ----------------------------------------------------------------------------- low-bit state under FSDP2 and DCP
@pytest.fixture(scope="module")
def lowbit_fsdp(outdir: Path) -> list[dict[str, Any]]:
    """Results of ``job_lowbit_fsdp`` from rank 0 and rank 1."""
    J.launch(J.job_lowbit_fsdp, 2, outdir)
    return [torch.load(outdir / f"rank{r}_lowbit.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.parametrize("path", ["loop", "fused"])
@pytest.mark.parametrize("bits", [8, 4])
def test_fsdp2_low_bit_steps_each_shard_as_its_own_tensor(
    lowbit_fsdp: list[dict[str, Any]], bits: int, path: str
) -> None:
    """Each rank's params, step, codes and scales equal the reference stepping that rank's shard alone.

    The shards are odd and unequal (10505 / 10500 elements), rank 1 holds an empty one, and the codes
    and scales are DTensors (one padded row per rank) so that DCP saves every rank's.
    """
    from ftmlopt import lowbit

    ref = J.lowbit_per_shard_reference(bits, J.STEPS, fused=path == "fused")
    for rank in (0, 1):
        got = _result(lowbit_fsdp[rank], f"fsdp/lowbit{bits}/{path}")
        assert got["state_types"] == ["DTensor"] * 6
        # this rank's bytes: its row of codes and of float32 scales, padded to rank 0's shard
        longest = [10505, 2101, 4201]
        assert got["state_bytes"] == [lowbit.n_code_bytes(n, bits) + 4 * lowbit.n_blocks(n) for n in longest]
        _assert_same(got["params"], ref[rank]["params"], f"FSDP2 {bits}-bit {path} rank {rank} params")
        _assert_same(got["state"], ref[rank]["state"], f"FSDP2 {bits}-bit {path} rank {rank} state")
    assert [p.numel() for p in ref[1]["params"]] == [10500, 2100, 0]
    assert not torch.equal(ref[0]["params"][0], J.build_lowbit_model()[0].weight.detach()[:2101])


def test_low_bit_refuses_other_dtensor_layouts_before_anything_changes(lowbit_fsdp: list[dict[str, Any]]) -> None:
    """A DTensor sharded on dim 1 (tensor parallel) with state_bits=8: NotImplementedError, nothing stepped."""
    for rank in (0, 1):
        got = _result(lowbit_fsdp[rank], "tp/lowbit")
        assert "sharded on dim 0 over a 1-D mesh" in got["refused"] and "Shard(dim=1)" in got["refused"]
        assert got["n_state"] == 0
        assert torch.equal(got["plain"], torch.ones(5000)) and torch.equal(got["cols"], torch.ones(64, 50))


def test_low_bit_state_dict_of_one_process_is_refused_under_fsdp2(lowbit_fsdp: list[dict[str, Any]]) -> None:
    """Low-bit state does not reshard: a one-process state dict into FSDP2 is a ValueError, nothing changed."""
    for rank in (0, 1):
        got = _result(lowbit_fsdp[rank], "reshard/lowbit")
        assert "must be a uint8 tensor of shape (2, 5253)" in got["refused"]
        assert "same number of ranks" in got["refused"]
        _assert_same(got["after"]["params"], got["before"]["params"], f"rank {rank} params after the refusal")
        _assert_same(got["after"]["state"], got["before"]["state"], f"rank {rank} state after the refusal")


def test_low_bit_width_conversion_of_sharded_state_is_refused(lowbit_fsdp: list[dict[str, Any]]) -> None:
    """An 8-bit FSDP2 state dict loaded into a 4-bit FSDP2 FTML: NotImplementedError, nothing changed."""
    for rank in (0, 1):
        got = _result(lowbit_fsdp[rank], "convert/lowbit")
        assert "DTensor (sharded) param from 8-bit to 4-bit state is not supported" in got["refused"]
        _assert_same(got["after"]["params"], got["before"]["params"], f"rank {rank} params after the refusal")
        _assert_same(got["after"]["state"], got["before"]["state"], f"rank {rank} state after the refusal")


def _u_gap(bits: int, u_a: torch.Tensor, u_b: torch.Tensor, top_a: torch.Tensor, top_b: torch.Tensor) -> float:
    """max |u_a - u_b| over max(u_a, u_b, the smaller block's smallest code): in code steps' units of u."""
    from ftmlopt import lowbit

    smallest = lowbit.code_values(bits)[0]
    floor = torch.minimum(top_a, top_b) * smallest
    return float(((u_a - u_b).abs() / torch.maximum(torch.maximum(u_a, u_b), floor).clamp_min(1e-30)).max())


#: FSDP2 against one process, low-bit state (blocks per shard vs per whole param; the rounding bits of
#: each over its own flat index): weights within this many (steps * lr), ``u = sqrt(v)`` within this
#: relative gap (per element, relative to the larger u or the block's smallest code) after J.STEPS steps.
LOWBIT_VS_ONE_PROCESS = {8: {"w": 0.05, "u": 0.2}, 4: {"w": 0.25, "u": 0.8}}


@pytest.mark.parametrize("bits", [8, 4])
def test_fsdp2_low_bit_is_within_tolerance_of_one_process(lowbit_fsdp: list[dict[str, Any]], bits: int) -> None:
    from ftmlopt import lowbit

    model, opt = J.lowbit_single_process_run(bits, J.STEPS)
    w_err = u_err = 0.0
    for rank in (0, 1):
        got = _result(lowbit_fsdp[rank], f"fsdp/lowbit{bits}/fused")
        for i, p in enumerate(model.parameters()):
            rows = J.shard_rows(p.shape[0], rank)
            w_one, w_shard = p.detach()[rows], got["params"][i]
            n = w_shard.numel()
            if n == 0:
                continue
            st = opt.state[p]
            start = rows.start * (p.numel() // p.shape[0])
            blocks_one = (torch.arange(start, start + n) // lowbit.BLOCK)
            blocks_shard = torch.arange(n) // lowbit.BLOCK
            u_one = lowbit.decode(st["codes"], st["scales"], p.numel(), bits)[start:start + n].sqrt()
            codes, scales = got["state"][3 * i + 1], got["state"][3 * i + 2]
            u_shard = lowbit.decode(codes, scales, n, bits).sqrt()
            top = lowbit.top(bits)
            u_err = max(u_err, _u_gap(bits, u_shard, u_one, scales[blocks_shard] * top,
                                      st["scales"][blocks_one] * top))
            w_err = max(w_err, float((w_one - w_shard).abs().max()) / (J.STEPS * J.LR))
    print(f"\n{bits}-bit FSDP2 vs one process after {J.STEPS} steps: weights {w_err:.4f} x steps*lr, u {u_err:.4f}")
    assert 0 < w_err <= LOWBIT_VS_ONE_PROCESS[bits]["w"]
    assert u_err <= LOWBIT_VS_ONE_PROCESS[bits]["u"]


@pytest.mark.parametrize("bits", [4, 8])
def test_dcp_low_bit_round_trip_on_two_ranks(lowbit_fsdp: list[dict[str, Any]], bits: int) -> None:
    """Save after LOWBIT_DCP_K steps (FSDP2, 2 ranks), load into a fresh model and optimizer: bit-identical."""
    for rank in (0, 1):
        got = _result(lowbit_fsdp[rank], f"dcp/lowbit{bits}")
        _assert_same(got["resumed"]["params"], got["uninterrupted"]["params"], f"DCP {bits}-bit rank {rank} params")
        _assert_same(got["resumed"]["state"], got["uninterrupted"]["state"], f"DCP {bits}-bit rank {rank} state")
        assert float(got["resumed"]["state"][0]) == J.LOWBIT_DCP_TOTAL


def test_dcp_low_bit_checkpoint_does_not_reshard(lowbit_fsdp: list[dict[str, Any]], outdir: Path) -> None:
    """A 2-rank low-bit checkpoint loaded into one process is refused (its codes are one row per rank)."""
    _result(lowbit_fsdp[0], "dcp/lowbit4")
    model = J.build_lowbit_model()
    opt = J.FTML(model.parameters(), lr=J.LR, state_bits=4, **J.LOWBIT_FSDP_CONFIG)
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    with pytest.raises(CheckpointException, match=r"Size mismatch .*\[2, 5253\].*weight\.codes"):
        J._dcp_load(model, opt, outdir / "dcp_lowbit4")
