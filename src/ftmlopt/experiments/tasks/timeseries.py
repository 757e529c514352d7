"""§4.6: online prediction of a synthetic 10-dimensional series, with and without distribution shift.

Data (:func:`ftmlopt.experiments.data.make_timeseries`): segments of 50 steps; in segment ``i`` the samples
are ``N([i]*10 + zeta_i, I) + N(0, I)``; the stationary control fixes every segment mean to ``[1]*10``.
Model: a 1-layer LSTM with 100 hidden units and a linear read-out predicting the next sample. Each
iteration takes the next 5 samples (truncated BPTT over 5 steps, hidden state carried and detached),
records the online squared loss ``f_t(theta_{t-1})`` (mean over the 5 x 10 entries) *before* updating,
then takes one optimizer step. So the mean shifts every 10 iterations; 200 iterations are one pass
over the paper's 1000-step series. Seed ``s`` fixes both the series and the initial weights.

The rate is chosen by the mean online loss over the pass (regret), on the paper's full grid.
"""

from __future__ import annotations

from typing import Any

from ftmlopt.experiments.data import make_timeseries
from ftmlopt.experiments.harness import PAPER_GRID, Run, TaskSpec

WINDOW = 5  # BPTT length = samples per iteration
HIDDEN = 100
DIM = 10
SERIES_LENGTH = WINDOW * 2000 + 1  # room for --epochs up to 2000 iterations; the first 1001 steps are the paper's


class TimeSeriesRun(Run):
    """One online pass; :meth:`train_epoch` is one iteration (5 samples)."""

    def __init__(self, variant: str, make_opt: Any, seed: int) -> None:
        import torch

        super().__init__(seed)
        self.lstm = torch.nn.LSTM(DIM, HIDDEN, batch_first=True)
        self.head = torch.nn.Linear(HIDDEN, DIM)
        self.opt = make_opt([*self.lstm.parameters(), *self.head.parameters()])
        series = make_timeseries(seed, changing=(variant == "changing"), length=SERIES_LENGTH)
        self.series = torch.from_numpy(series)
        self.state: tuple[Any, Any] | None = None
        self.t = 0

    def train_epoch(self) -> float:
        import torch

        lo = self.t * WINDOW
        x = self.series[lo : lo + WINDOW][None]
        y = self.series[lo + 1 : lo + WINDOW + 1][None]
        out, state = self.lstm(x, self.state)
        loss = torch.nn.functional.mse_loss(self.head(out), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.state = (state[0].detach(), state[1].detach())
        self.t += 1
        return loss.detach().item()


def _load(data: Any, quick: bool) -> None:
    return None  # generated per seed in the run


def _make_run(data: Any, variant: str, make_opt: Any, seed: int, quick: bool) -> Run:
    return TimeSeriesRun(variant, make_opt, seed)


SPEC = TaskSpec(
    name="timeseries",
    title="§4.6 synthetic series, 1-layer LSTM(100), online squared loss",
    paper=(
        "Changing distribution: Adam shows large spikes (loss up to ~10) and adapts slowly; "
        "FTML ≈ RMSprop ≈ 2-3. Stationary control: all three coincide (≈2)."
    ),
    optimizers=("FTML", "Adam", "RMSprop"),
    grids={name: PAPER_GRID for name in ("FTML", "Adam", "RMSprop")},
    quick_grids={name: (0.01, 0.001) for name in ("FTML", "Adam", "RMSprop")},
    epochs=200,
    quick_epochs=30,
    seeds=5,
    load=_load,
    make_run=_make_run,
    variants=("changing", "stationary"),
    selection="mean",
    x_label="iteration (5 samples each)",
    y_label="online squared loss",
    notes=("x-axis is iterations; --epochs counts iterations for this task (200 = one pass, as in the paper)",),
)
