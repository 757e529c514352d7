"""The shared training harness of ``ftmlopt reproduce``: optimizers, learning-rate search, seeds, JSON, plots.

Protocol, as in the paper (Zheng & Kwok 2017, §4): every optimizer gets its own learning rate, picked
from a grid by the training loss it reaches (lowest final training loss; for the online time-series
task the mean online loss over the pass). Rates that clearly lag are dropped early: with
``prune_after = P`` every grid rate is trained for ``P`` epochs, only the ``keep`` best continue to
the end, and the best of those at the last epoch wins. The chosen rate is then re-run with more
seeds; every seed starts all optimizers from the same initial weights and the same batch order.

Two further curves are added when the task lists FTML:

* **Theorem 1 control** ``Adam(b1=0)``: Adam with ``betas=(0, 0.999)`` at ``(1 - 0.6) * lr_FTML``, which
  is bias-corrected RMSprop. By Theorem 1, FTML's update is
  ``w -= lr * (1-b1)/(1-b1^t) * g / (sqrt(v/(1-b2^t)) + eps)``, and ``(1-b1)/(1-b1^t) -> 1-b1`` within
  1% after about ten steps, so the two curves should lie on top of each other after the first steps.

A task is an object following :class:`TaskSpec` with a ``load`` function and a ``make_run`` function
returning a :class:`Run` (``step()`` trains one epoch and returns its mean training loss).

Example (a toy task, one optimizer, two rates, no files written):
    >>> import torch
    >>> from ftmlopt.experiments.harness import Run, TaskSpec, search_and_train
    >>> class Quad(Run):
    ...     def __init__(self, make_opt, seed):
    ...         super().__init__(seed)
    ...         self.w = torch.nn.Parameter(torch.ones(3))
    ...         self.opt = make_opt([self.w])
    ...     def train_epoch(self):
    ...         self.opt.zero_grad(); loss = (self.w ** 2).sum(); loss.backward(); self.opt.step()
    ...         return loss.item()
    >>> spec = TaskSpec(name="quad", title="toy", paper="", optimizers=("Adam",),
    ...                 grids={"Adam": (0.1, 0.01)}, quick_grids={"Adam": (0.1,)}, epochs=5, quick_epochs=2,
    ...                 seeds=1, load=lambda data, quick: None,
    ...                 make_run=lambda data, variant, make_opt, seed, quick: Quad(make_opt, seed), control=False)
    >>> res = search_and_train(spec, None, "default", epochs=5, seeds=[0], quick=False, progress=False)
    >>> res["Adam"]["lr"]
    0.1
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: the paper's learning-rate grid (§4: "{0.5, 0.25, 0.1, ..., 0.00005, 0.000025, 0.00001}")
PAPER_GRID: tuple[float, ...] = (
    0.5, 0.25, 0.1, 0.05, 0.025, 0.01, 0.005, 0.0025, 0.001, 0.0005, 0.00025, 0.0001, 5e-5, 2.5e-5, 1e-5,
)

#: FTML's hyper-parameters in every experiment of the paper
FTML_BETAS = (0.6, 0.999)
FTML_EPS = 1e-8

#: why the experiments pin FTML's implementation path (recorded in docs/results.md)
PATH_NOTE = (
    "FTML is built with fused=False everywhere. The paper's tasks (mnist, charlm, babi, timeseries) and the "
    "demo use foreach=False, the readable single-tensor path that the fast paths are tested against, so every "
    "stored curve is reproducible bit for bit; the transformer and DQN tasks use foreach=True, the multi-tensor "
    "path, whose arithmetic the tests check step by step against the rule. With the CPU default (fused kernel) on "
    "this busy 2-core machine, the first torch operation after each FTML step took ~20 ms (kernel threads "
    "competing with torch's), which made a DQN run 8x slower; results do not depend on the path, only the wall "
    "time does."
)

#: name of the Theorem 1 control curve
CONTROL = "Adam(b1=0)"

#: how the optimizers are built (all other settings are torch.optim's defaults)
OPTIMIZER_NOTES: dict[str, str] = {
    "FTML": "ftmlopt.torch.FTML(lr, betas=(0.6, 0.999), eps=1e-8, foreach=False, fused=False)",
    "Adam": "torch.optim.Adam(lr), betas=(0.9, 0.999), eps=1e-8",
    "RMSprop": "torch.optim.RMSprop(lr), alpha=0.99, eps=1e-8 (no bias correction)",
    "NAG": "torch.optim.SGD(lr, momentum=0.9, nesterov=True)",
    "Adadelta": "torch.optim.Adadelta(lr=1.0), rho=0.9, eps=1e-6 (no grid: Adadelta needs no rate)",
    CONTROL: "torch.optim.Adam(0.4 * lr_FTML, betas=(0.0, 0.999), eps=1e-8): Theorem 1 control",
}

#: other names :func:`make_optimizer` accepts (the demo calls NAG by its full name)
ALIASES: dict[str, str] = {"SGD-Nesterov": "NAG"}

#: every name :func:`make_optimizer` builds
OPTIMIZERS: tuple[str, ...] = ("FTML", "Adam", "AdamW", "RMSprop", "NAG", "Adadelta", CONTROL, *ALIASES)


#: FTML's ``state_bits`` while experiments build optimizers (``--state-bits``; see :func:`ftml_state_bits`)
FTML_STATE_BITS: contextvars.ContextVar[int] = contextvars.ContextVar("ftml_state_bits", default=32)


@contextlib.contextmanager
def ftml_state_bits(bits: int) -> Iterator[None]:
    """Build FTML with ``state_bits=bits`` (32, 8, 4) inside this block, in every task and the demo."""
    from ftmlopt import lowbit

    token = FTML_STATE_BITS.set(lowbit.check_state_bits(bits))
    try:
        yield
    finally:
        FTML_STATE_BITS.reset(token)


def make_optimizer(
    name: str,
    params: Iterable[Any],
    lr: float,
    *,
    eps: float | None = None,
    weight_decay: float = 0.0,
    ftml_foreach: bool = False,
) -> Any:
    """Build optimizer ``name`` over ``params`` at rate ``lr``: the one factory of every experiment.

    With the defaults it builds the paper's settings (:data:`OPTIMIZER_NOTES`): FTML with betas
    (0.6, 0.999), eps 1e-8, single-tensor path; torch's Adam, RMSprop, SGD with Nesterov momentum 0.9
    (``NAG``, also ``SGD-Nesterov``), Adadelta; and the Theorem 1 control :data:`CONTROL`, Adam with
    betas (0, 0.999). A task changes only what it must:

    * ``eps``: the epsilon of FTML, Adam, AdamW, RMSprop and the control (None: 1e-8 for FTML and the
      control, torch's default for the others); the DQN task uses 1e-2, the paper's DQN setting.
    * ``weight_decay``: decoupled weight decay ``w -= lr * wd * w``: FTML with
      ``decoupled_weight_decay=True``, Adam becomes ``AdamW(betas=(0.9, 0.999))``, and the control
      ``AdamW`` with ``wd / (1 - 0.6)``, so that at 0.4x FTML's rate its per-step decay ``lr * wd``
      equals FTML's. ``AdamW`` (betas (0.9, 0.95)) takes it as is. Parameter groups may override it.
    * ``ftml_foreach``: FTML's multi-tensor path instead of the single-tensor one (see :data:`PATH_NOTE`).

    Raises ValueError for an unknown name, or for ``eps``/``weight_decay`` given to an optimizer
    that does not take them here (NAG, Adadelta; weight decay for RMSprop).

    Example:
        >>> import torch
        >>> from ftmlopt.experiments.harness import make_optimizer
        >>> w = [torch.nn.Parameter(torch.zeros(2))]
        >>> opt = make_optimizer("NAG", w, 0.1)
        >>> type(opt).__name__, opt.defaults["nesterov"]
        ('SGD', True)
        >>> opt = make_optimizer("Adam", w, 1e-3, weight_decay=0.1)
        >>> type(opt).__name__, opt.defaults["betas"], opt.defaults["weight_decay"]
        ('AdamW', (0.9, 0.999), 0.1)
    """
    import torch

    base = ALIASES.get(name, name)
    if base not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {sorted(OPTIMIZERS)}")
    if base in ("NAG", "Adadelta") and (eps is not None or weight_decay):
        raise ValueError(f"{name}: eps={eps!r} and weight_decay={weight_decay!r} are not supported here")
    if base == "RMSprop" and weight_decay:
        raise ValueError(f"{name}: weight_decay={weight_decay!r} is not supported here (no decoupled decay)")
    eps_kw: dict[str, Any] = {} if eps is None else {"eps": eps}
    if base == "FTML":
        from ftmlopt.torch import FTML

        decay: dict[str, Any] = {"weight_decay": weight_decay, "decoupled_weight_decay": True} if weight_decay else {}
        return FTML(params, lr=lr, betas=FTML_BETAS, eps=FTML_EPS if eps is None else eps, foreach=ftml_foreach,
                    fused=False, state_bits=FTML_STATE_BITS.get(), **decay)
    if base == "Adam":
        if weight_decay:
            return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay, **eps_kw)
        return torch.optim.Adam(params, lr=lr, **eps_kw)
    if base == "AdamW":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay, **eps_kw)
    if base == "RMSprop":
        return torch.optim.RMSprop(params, lr=lr, **eps_kw)
    if base == "NAG":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
    if base == "Adadelta":
        return torch.optim.Adadelta(params, lr=lr)
    # the Theorem 1 control
    betas = (0.0, FTML_BETAS[1])
    ctrl_eps = FTML_EPS if eps is None else eps
    if weight_decay:
        scaled = weight_decay / (1 - FTML_BETAS[0])  # the same per-step decay lr * wd at 0.4x FTML's rate
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=ctrl_eps, weight_decay=scaled)
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=ctrl_eps)


class Run:
    """One training run. Subclasses implement :meth:`train_epoch` (and optionally :meth:`evaluate`).

    ``super().__init__(seed)`` seeds torch's global generator with ``seed``, so the model a subclass
    builds next is the same for every optimizer. Training (dropout masks, shuffling) then draws from
    the run's own stream, seeded from ``seed`` alone: :meth:`step` swaps it in and out, so runs may be
    interleaved (as the grid search does) and still give exactly the curve they give alone.
    """

    #: offset between the seed of the initial weights and the seed of the training stream
    STREAM_OFFSET = 1_000_003

    def __init__(self, seed: int) -> None:
        import torch

        torch.manual_seed(seed)
        self._rng = torch.Generator().manual_seed(seed + self.STREAM_OFFSET).get_state()

    def train_epoch(self) -> float:
        """Train one unit (an epoch, or one iteration for online tasks); return its mean training loss."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics after training (empty by default)."""
        return {}

    def curves(self) -> dict[str, list[float]]:
        """Further per-unit curves recorded during training (e.g. validation loss); empty by default."""
        return {}

    def step(self) -> float:
        """:meth:`train_epoch` under this run's own random state."""
        import torch

        outer = torch.get_rng_state()
        torch.set_rng_state(self._rng)
        try:
            return self.train_epoch()
        finally:
            self._rng = torch.get_rng_state()
            torch.set_rng_state(outer)


class ClassifierRun(Run):
    """Mini-batch training of a classifier on in-memory tensors, reshuffled every epoch.

    ``model`` is a zero-argument factory (called after seeding, so every optimizer starts from the
    same weights). ``data`` holds ``x_train``, ``y_train``, ``x_test``, ``y_test``; inputs may be one
    tensor or a tuple of tensors (a model with several inputs). An epoch's loss is the mean
    mini-batch cross-entropy (model in training mode), :meth:`evaluate` gives held-out accuracy and loss.
    """

    def __init__(self, model: Any, make_opt: Any, data: dict[str, Any], batch: int, seed: int) -> None:
        super().__init__(seed)  # seeds torch: the model below is initialised identically for every optimizer
        self.model = model()
        self.opt = make_opt(self.model.parameters())
        self.data = data
        self.batch = batch

    def train_epoch(self) -> float:
        import torch
        import torch.nn.functional as F

        self.model.train()
        x, y = self.data["x_train"], self.data["y_train"]
        n = len(x[0]) if isinstance(x, tuple) else len(x)
        perm = torch.randperm(n)
        total, count = 0.0, 0
        for i in range(0, n, self.batch):
            idx = perm[i : i + self.batch]
            loss = F.cross_entropy(self.model(*_index(x, idx)), y[idx])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total += loss.detach().item() * len(idx)
            count += len(idx)
        return total / count

    def evaluate(self) -> dict[str, float]:
        import torch
        import torch.nn.functional as F

        self.model.eval()
        with torch.no_grad():
            logits = self.model(*_index(self.data["x_test"], slice(None)))
            y = self.data["y_test"]
            return {
                "test_acc": float((logits.argmax(1) == y).float().mean()),
                "test_loss": float(F.cross_entropy(logits, y)),
            }


def _index(x: Any, idx: Any) -> tuple[Any, ...]:
    """Inputs may be one tensor or a tuple of tensors (several model inputs)."""
    return tuple(t[idx] for t in x) if isinstance(x, tuple) else (x[idx],)


MakeRun = Callable[[Any, str, Callable[[Iterable[Any]], Any], int, bool], Run]


@dataclass
class TaskSpec:
    """What ``ftmlopt reproduce`` needs to know about one task (see the task modules)."""

    name: str
    title: str
    paper: str  # the paper's section and claim, quoted in the report
    optimizers: tuple[str, ...]
    grids: Mapping[str, tuple[float, ...]]  # CPU-scale grid per optimizer (documented subset of PAPER_GRID)
    quick_grids: Mapping[str, tuple[float, ...]]
    epochs: int
    quick_epochs: int
    seeds: int
    load: Callable[[Path | None, bool], Any]  # (data folder or None, quick) -> data
    make_run: MakeRun  # (data, variant, optimizer factory, seed, quick) -> Run
    variants: tuple[str, ...] = ("default",)
    prune_after: int | None = None  # epochs before lagging rates are dropped (None: no pruning)
    keep: int = 2
    selection: str = "final"  # "final": last-epoch loss; "mean": mean over all units (online loss)
    x_label: str = "epoch"
    y_label: str = "training loss"
    control: bool = True
    notes: tuple[str, ...] = field(default_factory=tuple)
    #: ``(name, params, lr) -> optimizer``; None: :func:`make_optimizer` (the paper's settings)
    optimizer_factory: Callable[[str, Any, float], Any] | None = None
    #: descriptions of the optimizers when ``optimizer_factory`` is set (default: :data:`OPTIMIZER_NOTES`)
    optimizer_notes: Mapping[str, str] | None = None
    #: names of :meth:`Run.curves` entries drawn as extra figure panels, e.g. ``("validation loss",)``
    extra_panels: tuple[str, ...] = ()
    #: the run needs the training length: ``reproduce`` stores it as ``data["units"]`` (data is a dict)
    with_horizon: bool = False


def _score(losses: Sequence[float], selection: str) -> float:
    if not losses or any(not math.isfinite(x) for x in losses):
        return math.inf
    return statistics.fmean(losses) if selection == "mean" else losses[-1]


def _bar(total: int, desc: str, progress: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not progress, dynamic_ncols=True, file=sys.stderr)


def _advance(run: Run, losses: list[float], n: int, desc: str, progress: bool) -> None:
    """Train ``run`` ``n`` more units, appending to ``losses``; stop early (NaN-filled) if the loss diverges."""
    with _bar(n, desc, progress) as bar:
        for _ in range(n):
            if losses and not math.isfinite(losses[-1]):
                losses.append(math.nan)
            else:
                loss = run.step()
                losses.append(loss if math.isfinite(loss) else math.nan)
            bar.update(1)
            if losses and math.isfinite(losses[-1]):
                bar.set_postfix(loss=f"{losses[-1]:.4g}")


def _run_record(seed: int, losses: list[float], run: Run | None) -> dict[str, Any]:
    metrics = run.evaluate() if run is not None and math.isfinite(losses[-1]) else {}
    rec: dict[str, Any] = {"seed": seed, "losses": losses, "metrics": metrics}
    extra = run.curves() if run is not None else {}
    if extra:
        rec["curves"] = extra
    return rec


def _factory(build: Callable[[str, Any, float], Any], name: str, lr: float) -> Callable[[Any], Any]:
    """``params -> build(name, params, lr)``: the optimizer factory handed to a task's ``make_run``."""
    return lambda params: build(name, params, lr)


def search_and_train(
    spec: TaskSpec,
    data: Any,
    variant: str,
    epochs: int,
    seeds: Sequence[int],
    quick: bool,
    progress: bool = True,
    grids: Mapping[str, tuple[float, ...]] | None = None,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Grid-search each optimizer's rate on ``seeds[0]``, then train the chosen rate on every seed.

    Returns ``{optimizer: {"lr", "grid": {lr: {"losses", "pruned_at"}}, "runs": [{"seed", "losses", "metrics"}]}}``.
    The Theorem 1 control runs right after FTML. ``checkpoint``, if given, is called with the results so far
    after each optimizer (so that a long run that is stopped early still leaves what it finished).
    """
    grids = grids if grids is not None else (spec.quick_grids if quick else spec.grids)
    prune = None if quick else spec.prune_after
    build: Callable[[str, Any, float], Any] = spec.optimizer_factory or make_optimizer
    out: dict[str, Any] = {}
    for name in spec.optimizers:
        grid = tuple(grids[name])

        cand: dict[float, tuple[Run, list[float]]] = {}
        first = epochs if prune is None or len(grid) <= spec.keep else min(prune, epochs)
        for lr in grid:
            run = spec.make_run(data, variant, _factory(build, name, lr), seeds[0], quick)
            losses: list[float] = []
            _advance(run, losses, first, f"{spec.name}/{variant} {name} lr={lr:g} seed={seeds[0]}", progress)
            cand[lr] = (run, losses)
        pruned_at: dict[float, int | None] = {lr: None for lr in grid}
        if first < epochs:
            ranked = sorted(grid, key=lambda r: _score(cand[r][1], spec.selection))
            for lr in ranked[spec.keep :]:
                pruned_at[lr] = first
            for lr in ranked[: spec.keep]:
                run, losses = cand[lr]
                _advance(run, losses, epochs - first, f"{spec.name}/{variant} {name} lr={lr:g} (cont.)", progress)
        alive = [lr for lr in grid if pruned_at[lr] is None]
        best = min(alive, key=lambda r: _score(cand[r][1], spec.selection))
        runs = [_run_record(seeds[0], cand[best][1], cand[best][0])]
        out[name] = {
            "lr": best,
            "at_grid_edge": len(grid) > 1 and best in (min(grid), max(grid)),
            "grid": {repr(lr): {"losses": cand[lr][1], "pruned_at": pruned_at[lr]} for lr in grid},
            "runs": runs,
        }
        for seed in seeds[1:]:
            if checkpoint is not None:
                checkpoint(out)  # what is finished so far, seed by seed
            run = spec.make_run(data, variant, _factory(build, name, best), seed, quick)
            losses = []
            _advance(run, losses, epochs, f"{spec.name}/{variant} {name} lr={best:g} seed={seed}", progress)
            runs.append(_run_record(seed, losses, run))
        if name == "FTML" and spec.control:
            lr = (1.0 - FTML_BETAS[0]) * best
            ctrl = []
            for seed in seeds:
                run = spec.make_run(data, variant, _factory(build, CONTROL, lr), seed, quick)
                losses = []
                _advance(run, losses, epochs, f"{spec.name}/{variant} {CONTROL} lr={lr:g} seed={seed}", progress)
                ctrl.append(_run_record(seed, losses, run))
            out[CONTROL] = {"lr": lr, "at_grid_edge": False, "grid": {}, "runs": ctrl}
        if checkpoint is not None:
            checkpoint(out)
    return out


def summarize(result: Mapping[str, Any], selection: str = "final") -> list[dict[str, Any]]:
    """One row per optimizer: chosen rate, mean/min/max over seeds of the selection score, held-out metrics.

    Rows are sorted by mean score (the observed ranking); a diverged seed scores ``inf``.

    Example:
        >>> from ftmlopt.experiments.harness import summarize
        >>> rows = summarize({"A": {"lr": 0.1, "runs": [{"losses": [2.0, 1.0], "metrics": {}}]},
        ...                   "B": {"lr": 0.2, "runs": [{"losses": [2.0, 0.5], "metrics": {}}]}})
        >>> [(r["optimizer"], r["score_mean"]) for r in rows]
        [('B', 0.5), ('A', 1.0)]
    """
    rows = []
    for name, rec in result.items():
        scores = [_score(r["losses"], selection) for r in rec["runs"]]
        metric_names = sorted({k for r in rec["runs"] for k in r["metrics"]})
        metrics = {
            k: statistics.fmean(r["metrics"][k] for r in rec["runs"] if k in r["metrics"]) for k in metric_names
        }
        rows.append({
            "optimizer": name,
            "lr": rec["lr"],
            "at_grid_edge": bool(rec.get("at_grid_edge", False)),
            "score_mean": statistics.fmean(scores),
            "score_min": min(scores),
            "score_max": max(scores),
            "seeds": len(scores),
            "metrics": metrics,
        })
    rows.sort(key=lambda r: (r["score_mean"], r["optimizer"]))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def format_table(rows: Sequence[Mapping[str, Any]], selection: str = "final") -> str:
    """Plain-text table of :func:`summarize` rows."""
    what = "mean online loss" if selection == "mean" else "final train loss"
    metric_names = sorted({k for r in rows for k in r["metrics"]})
    head = f"{'rank':>4}  {'optimizer':<11} {'lr':>9}  {what + ' (mean over seeds)':>32}  {'[min, max]':>21}"
    head += "".join(f"  {k:>12}" for k in metric_names)
    lines = [head, "-" * len(head)]
    for r in rows:
        line = (
            f"{r['rank']:>4}  {r['optimizer']:<11} {r['lr']:>8.3g}{'*' if r['at_grid_edge'] else ' '}"
            f"  {r['score_mean']:>32.4g}"
            f"  [{r['score_min']:>9.3g}, {r['score_max']:>9.3g}]"
        )
        line += "".join(f"  {r['metrics'].get(k, math.nan):>12.4f}" for k in metric_names)
        lines.append(line)
    if any(r["at_grid_edge"] for r in rows):
        lines.append("* chosen rate at the edge of its grid")
    return "\n".join(lines)


def _band(curves: Sequence[Sequence[float]]) -> tuple[list[float], list[float], list[float]]:
    mean, lo, hi = [], [], []
    for col in zip(*curves):
        vals = [v for v in col if math.isfinite(v)]
        if len(vals) < len(col) or not vals:
            mean.append(math.nan)
            lo.append(math.nan)
            hi.append(math.nan)
        else:
            mean.append(statistics.fmean(vals))
            lo.append(min(vals))
            hi.append(max(vals))
    return mean, lo, hi


#: one colour per optimizer across every figure
COLORS = {
    "FTML": "tab:red", "Adam": "tab:blue", "RMSprop": "tab:green", "NAG": "tab:purple",
    "Adadelta": "tab:brown", CONTROL: "black", "SGD-Nesterov": "tab:purple", "AdamW": "tab:orange",
}


def plot_curves(
    panels: Mapping[str, Mapping[str, Sequence[Sequence[float]]]],
    path: Path,
    title: str,
    x_label: str = "epoch",
    y_label: str = "training loss",
) -> Path:
    """Save one log-scale panel per key of ``panels`` (``{panel: {optimizer: [curve per seed]}}``) as a PNG.

    Each optimizer is drawn as its mean over seeds with the min-max band shaded. Uses the Agg backend.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(6.2 * n, 4.4), squeeze=False)
    for ax, (panel, curves) in zip(axes[0], panels.items()):
        for name, seeds in curves.items():
            mean, lo, hi = _band(seeds)
            xs = list(range(1, len(mean) + 1))
            color = COLORS.get(name)
            style = "--" if name == CONTROL else "-"
            label = f"{name} ({len(seeds)} seeds)" if len(seeds) > 1 else name
            ax.plot(xs, mean, style, color=color, label=label, linewidth=1.4)
            if len(seeds) > 1:
                ax.fill_between(xs, lo, hi, color=color, alpha=0.18, linewidth=0)
        ax.set_yscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.set_title(panel if n > 1 else title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if n > 1:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def environment() -> dict[str, str]:
    """Versions and machine, recorded in every JSON result."""
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": str(torch.get_num_threads()),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
