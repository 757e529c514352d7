"""The training harness: learning-rate selection, pruning, divergence, random-state isolation, summaries."""

from __future__ import annotations

import math

import pytest
import torch

from ftmlopt.experiments import harness as H


class FakeRun(H.Run):
    """Loss depends only on the rate and the epoch; ``lr >= 1`` diverges at epoch 2."""

    def __init__(self, make_opt, seed: int) -> None:
        super().__init__(seed)
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.opt = make_opt([self.w])
        self.lr = self.opt.defaults["lr"]
        self.epoch = 0

    def train_epoch(self) -> float:
        self.epoch += 1
        if self.lr >= 1 and self.epoch >= 2:
            return math.nan
        # best rate is 0.01; rate 0.1 starts best but ends worse
        target = {0.1: [0.5, 0.45, 0.44, 0.43], 0.01: [0.9, 0.5, 0.3, 0.1], 0.001: [1.0, 0.95, 0.9, 0.85]}
        return target.get(self.lr, [0.8] * 4)[self.epoch - 1]


def _spec(grid, prune_after=None, keep=2, control=False):
    return H.TaskSpec(
        name="fake", title="fake", paper="", optimizers=("Adam",), grids={"Adam": grid}, quick_grids={"Adam": grid},
        epochs=4, quick_epochs=4, seeds=1, load=lambda d, q: None,
        make_run=lambda data, variant, make_opt, seed, quick: FakeRun(make_opt, seed),
        prune_after=prune_after, keep=keep, control=control,
    )


def test_rate_chosen_by_final_training_loss() -> None:
    res = H.search_and_train(_spec((0.1, 0.01, 0.001)), None, "default", 4, [0, 1], quick=False, progress=False)
    assert res["Adam"]["lr"] == 0.01
    assert res["Adam"]["grid"]["0.1"]["losses"] == [0.5, 0.45, 0.44, 0.43]
    assert [r["seed"] for r in res["Adam"]["runs"]] == [0, 1]
    assert res["Adam"]["at_grid_edge"] is False


def test_pruning_drops_lagging_rates_early() -> None:
    # after 1 epoch 0.1 (0.5) and 0.01 (0.9) lead; 0.001 (1.0) is dropped
    res = H.search_and_train(_spec((0.1, 0.01, 0.001), prune_after=1, keep=2), None, "d", 4, [0], False, False)
    grid = res["Adam"]["grid"]
    assert grid["0.001"]["pruned_at"] == 1 and len(grid["0.001"]["losses"]) == 1
    assert grid["0.01"]["pruned_at"] is None and len(grid["0.01"]["losses"]) == 4
    assert res["Adam"]["lr"] == 0.01


def test_pruning_can_drop_the_eventual_winner() -> None:
    # keep=1 after 1 epoch keeps only 0.1, as the paper's early stopping would
    res = H.search_and_train(_spec((0.1, 0.01), prune_after=1, keep=1), None, "d", 4, [0], False, False)
    assert res["Adam"]["lr"] == 0.1 and res["Adam"]["at_grid_edge"] is True


def test_diverged_rate_is_never_chosen_and_nan_filled() -> None:
    res = H.search_and_train(_spec((1.0, 0.001)), None, "d", 4, [0], False, False)
    assert res["Adam"]["lr"] == 0.001
    bad = res["Adam"]["grid"]["1.0"]["losses"]
    assert bad[0] == 0.8 and all(math.isnan(x) for x in bad[1:])


def test_control_uses_forty_percent_of_ftml_rate() -> None:
    spec = _spec((0.01,), control=True)
    spec.optimizers = ("FTML",)
    spec.grids = spec.quick_grids = {"FTML": (0.01,)}
    res = H.search_and_train(spec, None, "d", 2, [0, 1], False, False)
    assert res[H.CONTROL]["lr"] == pytest.approx(0.004)
    assert len(res[H.CONTROL]["runs"]) == 2


def test_make_optimizer_settings() -> None:
    p = [torch.nn.Parameter(torch.zeros(2))]
    ctl = H.make_optimizer(H.CONTROL, p, 0.004)
    assert isinstance(ctl, torch.optim.Adam) and ctl.defaults["betas"] == (0.0, 0.999) and ctl.defaults["eps"] == 1e-8
    ftml = H.make_optimizer("FTML", p, 0.01)
    assert ftml.defaults["betas"] == (0.6, 0.999) and ftml.defaults["lr"] == 0.01
    nag = H.make_optimizer("NAG", p, 0.1)
    assert nag.defaults["momentum"] == 0.9 and nag.defaults["nesterov"] is True
    with pytest.raises(ValueError, match="'Lion'"):
        H.make_optimizer("Lion", p, 0.1)


class NoisyRun(H.Run):
    """Consumes the global torch random stream every epoch."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.w = torch.randn(3)

    def train_epoch(self) -> float:
        return float(torch.rand(1) + self.w.sum())


def test_interleaved_runs_give_the_curves_they_give_alone() -> None:
    alone = {seed: NoisyRun(seed) for seed in (0, 1)}
    curves = {seed: [run.step() for _ in range(3)] for seed, run in alone.items()}
    assert curves[0] != curves[1]
    a, b = NoisyRun(0), NoisyRun(1)
    inter_a, inter_b = [a.step()], [b.step(), b.step()]
    torch.rand(100)  # consumption outside the runs does not leak into them
    inter_a += [a.step(), a.step()]
    inter_b.append(b.step())
    assert inter_a == curves[0] and inter_b == curves[1]


def test_summarize_ranks_by_mean_and_scores_divergence_as_inf() -> None:
    result = {
        "A": {"lr": 0.1, "runs": [{"losses": [1.0, 0.5], "metrics": {"acc": 0.9}},
                                  {"losses": [1.0, 0.7], "metrics": {"acc": 0.7}}]},
        "B": {"lr": 0.2, "runs": [{"losses": [1.0, math.nan], "metrics": {}}]},
        "C": {"lr": 0.3, "runs": [{"losses": [1.0, 0.2], "metrics": {}}]},
    }
    rows = H.summarize(result)
    assert [r["optimizer"] for r in rows] == ["C", "A", "B"]
    assert rows[1]["score_mean"] == pytest.approx(0.6) and rows[1]["score_min"] == 0.5
    assert rows[1]["metrics"]["acc"] == pytest.approx(0.8)
    assert rows[2]["score_mean"] == math.inf
    assert H.summarize(result, "mean")[0]["score_mean"] == pytest.approx(0.6)  # C: mean of [1.0, 0.2]
    table = H.format_table(rows)
    assert table.splitlines()[2].split()[:2] == ["1", "C"]


def test_plot_writes_png(tmp_path) -> None:
    out = H.plot_curves({"p": {"FTML": [[1.0, 0.5], [1.1, 0.4]], "Adam": [[1.0, math.nan]]}}, tmp_path / "f.png", "t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_factory_for_every_task() -> None:
    """The demo's, DQN's and the transformer's optimizers all come from harness.make_optimizer."""
    import functools

    from ftmlopt.experiments.tasks import dqn, transformer

    p = [torch.nn.Parameter(torch.zeros(2))]
    for task in (dqn, transformer):
        assert isinstance(task.make_optimizer, functools.partial) and task.make_optimizer.func is H.make_optimizer
    nag = H.make_optimizer("SGD-Nesterov", p, 0.1)  # the demo's name for NAG
    assert type(nag) is torch.optim.SGD and nag.defaults["nesterov"] is True
    ftml = dqn.make_optimizer("FTML", p, 1e-3)
    assert ftml.defaults["eps"] == 1e-2 and ftml.defaults["foreach"] is True and ftml.defaults["fused"] is False
    assert H.make_optimizer("FTML", p, 1e-3).defaults["foreach"] is False
    adam = transformer.make_optimizer("Adam", p, 1e-3)
    assert type(adam) is torch.optim.AdamW and adam.defaults["betas"] == (0.9, 0.999)
    assert adam.defaults["weight_decay"] == 0.1
    with pytest.raises(ValueError, match=r"NAG: eps=0\.01"):
        dqn.make_optimizer("NAG", p, 0.1)
    with pytest.raises(ValueError, match=r"RMSprop: weight_decay=0\.1"):
        transformer.make_optimizer("RMSprop", p, 0.1)




def test_ftml_state_bits_context_builds_low_bit_ftml() -> None:
    """``--state-bits``: FTML built inside ``ftml_state_bits(b)`` has ``state_bits=b``; outside, the float default."""
    import torch

    from ftmlopt.experiments import harness

    params = [torch.nn.Parameter(torch.zeros(5000))]
    with harness.ftml_state_bits(4):
        inside = harness.make_optimizer("FTML", params, 0.01)
        adam = harness.make_optimizer("Adam", params, 0.01)
    outside = harness.make_optimizer("FTML", params, 0.01)
    assert inside.defaults["state_bits"] == 4 and outside.defaults["state_bits"] == 32
    assert "state_bits" not in adam.defaults
    with pytest.raises(ValueError, match="Invalid state_bits: 5"), harness.ftml_state_bits(5):
        pass
