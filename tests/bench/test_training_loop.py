"""The step timed inside a training loop (``ftmlopt bench --training-loop``) runs, on tiny models.

No timing assertions: the numbers are noise here; the structure, the bookkeeping and that the
process's thread settings and the kernels' runtime switch come back unchanged are checked.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from ftmlopt.bench import add_arguments, training_loop
from ftmlopt.kernels import cpu, omp_team


def test_measure_times_every_implementation_interleaved() -> None:
    threads = torch.get_num_threads()
    team = omp_team.team
    names = [*training_loop.IMPLEMENTATIONS, training_loop.POOL]
    res = training_loop.measure(rounds=3, warmup=1, width=16, depth=2, batch=4, implementations=names)
    assert omp_team.team is team  # the pool variant put torch's team back
    assert torch.get_num_threads() == threads == res["threads_before"] == res["threads_after"]
    assert res["parameters"] == 2 * (16 * 16 + 16) and res["rounds"] == 3
    assert res["kernel_threads"] == cpu.backend()
    assert set(res["rows"]) == set(names)
    for name, row in res["rows"].items():
        assert len(row["step_ms"]) == 3, name
        assert 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"]
        assert row["x_fused_adam"] > 0 and row["fwd_bwd_ms"] > 0
    assert res["rows"]["adam fused"]["x_fused_adam"] == 1.0
    lines = training_loop.table(res).splitlines()
    assert lines[0].startswith("step inside a training loop (2 x Linear(16, 16), batch 4; 544 parameters")
    assert [line.split(" | ")[0].lstrip("| ") for line in lines[4:]] == names


def test_adam_is_always_the_reference_and_bad_settings_are_refused() -> None:
    res = training_loop.measure(rounds=1, warmup=0, width=4, depth=1, batch=2, implementations=["ftml fused"])
    assert list(res["rows"]) == ["ftml fused", "adam fused"]
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        training_loop.measure(rounds=0)
    with pytest.raises(ValueError, match="width, depth and batch must be >= 1"):
        training_loop.measure(rounds=1, width=0)
    with pytest.raises(ValueError, match="unknown implementation 'sgd'"):
        training_loop.measure(rounds=1, width=4, depth=1, batch=2, implementations=["sgd"])


def test_the_bench_flag_decides_whether_it_runs() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).training_loop == 10  # on by default next to the isolated tables
    for argv in (["--training-loop", "0"], ["--no-extras"], ["--device", "cuda"]):
        assert training_loop.from_args(parser.parse_args(argv)) is None, argv
