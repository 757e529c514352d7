"""``ftmlopt demo``: should I use FTML? A tuned comparison in two regimes, in well under a minute, offline.

Five optimizers, each with a small learning-rate sweep on the same budget, every run of a seed starting
from the same initial weights and seeing the same data:

* **FTML**: ``ftmlopt.torch.FTML(params, lr, foreach=False, fused=False)``: the front end's defaults
  (betas (0.6, 0.999), eps 1e-8) on the single-tensor path (see ``harness.PATH_NOTE``).
* **Adam** and **RMSprop**: ``torch.optim`` defaults apart from the rate.
* **SGD-Nesterov**: ``torch.optim.SGD(lr, momentum=0.9, nesterov=True)``.
* **Adam(b1=0)**: ``torch.optim.Adam(betas=(0, 0.999))`` at 0.4 x FTML's chosen rate, not swept: the
  Theorem 1 control. FTML's step is this control's step times ``(1-b1)/(1-b1^t) / (1-b1)``, which is 1
  within 1% after ten steps, so the two should finish level; if they do, FTML's gain (or loss) against
  Adam is its smaller beta1, not the "moving leader".

Two regimes, side by side:

* **stationary**: a one-hidden-layer MLP (64-64-10, ReLU) on scikit-learn's bundled 8x8 digits (1,437
  training images, batch 32, ``EPOCHS`` epochs). Score: cross-entropy on the whole training set at the
  end (lower is better); held-out accuracy on the 360 other images is reported too.
* **shifting**: online prediction of a 10-dimensional series whose mean jumps every 10 iterations (the
  paper's §4.6 recipe: segments of 50 samples from ``N([i]*10 + zeta_i, I)`` plus ``N(0, I)`` noise),
  made small: an MLP (10-32-10) predicts each next sample from the current one, 5 samples per
  iteration, ``ITERATIONS`` iterations. Score: the mean online squared loss ``f_t(theta_{t-1})``
  measured before each update (regret; lower is better).

Each optimizer's rate is the one of its grid with the best mean score over the seeds. The verdict is
generated from the table (:func:`verdict`): per regime, the winner, and where FTML stands against it;
two optimizers count as tied when their seed ranges ``[min, max]`` overlap. Writes ``OUT/demo.png``
(both panels, mean over seeds with the min-max band) and ``OUT/demo.json`` (every score and curve).

Needs the ``demo`` extra (torch, scikit-learn, matplotlib, tqdm); says so and exits with status 2
when one is missing. ``--backend numpy`` runs the NumPy/MXNet-style demo instead (no torch).

Example (shell):
    $ ftmlopt demo --out runs/demo
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ftmlopt._json import write_json

#: the extras the demo needs (import name -> pip name)
REQUIRED = {"torch": "torch", "sklearn": "scikit-learn", "matplotlib": "matplotlib", "tqdm": "tqdm"}

CONTROL = "Adam(b1=0)"
SWEPT: tuple[str, ...] = ("FTML", "Adam", "RMSprop", "SGD-Nesterov")
NAMES: tuple[str, ...] = (*SWEPT, CONTROL)

#: each optimizer's rate grid per regime: five rates, a factor ~2 apart, the same number for everyone.
#: The windows differ by optimizer (FTML's sits ~2.5x above Adam's: by Theorem 1, FTML at lr steps like
#: Adam(b1=0) at 0.4 lr) and by regime (the short stationary budget favours larger rates).
GRIDS: dict[str, dict[str, tuple[float, ...]]] = {
    "stationary": {
        "FTML": (0.1, 0.05, 0.025, 0.01, 0.005),
        "Adam": (0.04, 0.02, 0.01, 0.005, 0.0025),
        "RMSprop": (0.04, 0.02, 0.01, 0.005, 0.0025),
        "SGD-Nesterov": (1.0, 0.5, 0.25, 0.1, 0.05),
    },
    "shifting": {
        "FTML": (0.025, 0.01, 0.005, 0.0025, 0.001),
        "Adam": (0.01, 0.005, 0.0025, 0.001, 0.0005),
        "RMSprop": (0.005, 0.0025, 0.001, 0.0005, 0.00025),
        "SGD-Nesterov": (0.5, 0.25, 0.1, 0.05, 0.025),
    },
}
EPOCHS = 8  # stationary budget: 8 x 45 = 360 steps
ITERATIONS = 200  # shifting budget: 200 steps (1,000 samples, 20 shifts)
SEEDS = 3
NUMPY_EPOCHS = 20
WINDOW = 5  # samples per iteration in the shifting task
SEGMENT = 50  # samples between shifts
REGIMES: dict[str, str] = {
    "stationary": "stationary: digits MLP, final training loss",
    "shifting": "shifting: series, mean jumps every 10 iterations, mean online loss",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``ftmlopt demo`` to ``parser``."""
    from ftmlopt.experiments import harness

    parser.add_argument(
        "--epochs", type=int, default=None,
        help=f"stationary task: epochs per run (default {EPOCHS}; numpy backend: {NUMPY_EPOCHS})",
    )
    parser.add_argument(
        "--iterations", type=int, default=ITERATIONS, help=f"shifting task: iterations per run (default {ITERATIONS})"
    )
    parser.add_argument("--seeds", type=int, default=SEEDS, help=f"seeds per rate (default {SEEDS}; 0..N-1)")
    parser.add_argument("--out", default="runs/demo", help="output folder for demo.png and demo.json")
    harness.add_run_arguments(
        parser, state_bits_help="torch backend: FTML's state, 32 (float, default), 8 or 4 (low-bit v: ftmlopt.lowbit)"
    )
    parser.add_argument("--seed", type=int, default=0, help="numpy backend only: seed of the initial weights")
    parser.add_argument(
        "--backend",
        choices=("torch", "numpy"),
        default="torch",
        help="torch: the comparison above (default); numpy: an MLP trained through the MXNet-style "
        "ftmlopt.mxnet.optimizer API, FTML against SGD (needs no torch)",
    )


def missing_extras() -> list[str]:
    """pip names of the demo's dependencies that cannot be imported."""
    return [pip for mod, pip in REQUIRED.items() if importlib.util.find_spec(mod) is None]


# ------------------------------------------------------------------------------------------------ tasks
def load_digits() -> dict[str, Any]:
    """The digits split as flat float tensors."""
    import torch

    from ftmlopt.experiments.data import load_digits_split

    xtr, ytr, xte, yte = load_digits_split(seed=0)
    t = torch.from_numpy
    return {"x": t(xtr.reshape(len(xtr), -1)), "y": t(ytr), "x_test": t(xte.reshape(len(xte), -1)), "y_test": t(yte)}


def stationary_run(name: str, lr: float, seed: int, epochs: int, digits: Mapping[str, Any]) -> dict[str, Any]:
    """Train the digits MLP; ``curve[e]`` is the full training-set loss after epoch ``e``."""
    import torch
    import torch.nn.functional as F

    from ftmlopt.experiments.harness import make_optimizer

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = make_optimizer(name, model.parameters(), lr)
    gen = torch.Generator().manual_seed(seed + 1)
    x, y = digits["x"], digits["y"]
    curve: list[float] = []
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 32):
            idx = perm[i : i + 32]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            value = float(F.cross_entropy(model(x), y))
        curve.append(value if math.isfinite(value) else math.nan)
        if not math.isfinite(value):
            curve += [math.nan] * (epochs - len(curve))
            break
    with torch.no_grad():
        acc = float((model(digits["x_test"]).argmax(1) == digits["y_test"]).float().mean())
    return {"seed": seed, "curve": curve, "score": curve[-1], "test_acc": acc}


def shifting_series(seed: int, length: int) -> Any:
    """The §4.6 series (``length`` x 10, float32): segment ``i`` has mean ``[i]*10 + zeta_i``, plus unit noise twice."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n_seg = -(-length // SEGMENT)
    means = np.arange(1, n_seg + 1, dtype=np.float64)[:, None] + rng.standard_normal((n_seg, 10))
    x = np.repeat(means, SEGMENT, axis=0)[:length] + rng.standard_normal((length, 10))
    x += rng.standard_normal((length, 10))
    return x.astype(np.float32)


def shifting_run(name: str, lr: float, seed: int, iterations: int) -> dict[str, Any]:
    """Online next-sample prediction; ``curve[t]`` is the loss on iteration ``t``'s samples before its update."""
    import torch
    import torch.nn.functional as F

    from ftmlopt.experiments.harness import make_optimizer

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    opt = make_optimizer(name, model.parameters(), lr)
    series = torch.from_numpy(shifting_series(seed, iterations * WINDOW + 1))
    curve: list[float] = []
    for t in range(iterations):
        x = series[t * WINDOW : (t + 1) * WINDOW]
        y = series[t * WINDOW + 1 : (t + 1) * WINDOW + 1]
        loss = F.mse_loss(model(x), y)
        value = loss.item()
        if not math.isfinite(value):
            curve += [math.nan] * (iterations - t)
            break
        curve.append(value)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    score = statistics.fmean(curve) if all(math.isfinite(v) for v in curve) else math.nan
    return {"seed": seed, "curve": curve, "score": score}


# ------------------------------------------------------------------------------------------------ sweep
def _mean(scores: Sequence[float]) -> float:
    return statistics.fmean(scores) if scores and all(math.isfinite(s) for s in scores) else math.inf


def sweep(
    regime: str,
    *,
    epochs: int = EPOCHS,
    iterations: int = ITERATIONS,
    seeds: int = SEEDS,
    grids: Mapping[str, Sequence[float]] | None = None,
    digits: Mapping[str, Any] | None = None,
    bar: Any = None,
) -> dict[str, Any]:
    """Every rate of every grid on every seed, then the control at 0.4 x FTML's chosen rate.

    Returns ``{name: {"lr", "at_grid_edge", "grid": {repr(lr): mean score}, "runs": [run per seed]}}``.
    """
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; expected one of {list(REGIMES)}")
    if regime == "stationary" and digits is None:
        digits = load_digits()
    grids = grids if grids is not None else GRIDS[regime]

    def one(name: str, lr: float, seed: int) -> dict[str, Any]:
        if bar is not None:
            bar.set_postfix_str(f"{regime} {name} lr={lr:g}")
        res = (
            stationary_run(name, lr, seed, epochs, digits)  # type: ignore[arg-type]
            if regime == "stationary" else shifting_run(name, lr, seed, iterations)
        )
        if bar is not None:
            bar.update(1)
        return res

    out: dict[str, Any] = {}
    for name in SWEPT:
        by_rate = {lr: [one(name, lr, s) for s in range(seeds)] for lr in grids[name]}
        best = min(by_rate, key=lambda lr: _mean([r["score"] for r in by_rate[lr]]))
        out[name] = {
            "lr": best,
            "at_grid_edge": len(by_rate) > 1 and best in (min(by_rate), max(by_rate)),
            "grid": {repr(lr): _mean([r["score"] for r in runs]) for lr, runs in by_rate.items()},
            "runs": by_rate[best],
        }
    lr = 0.4 * out["FTML"]["lr"]
    out[CONTROL] = {"lr": lr, "at_grid_edge": False, "grid": {}, "runs": [one(CONTROL, lr, s) for s in range(seeds)]}
    return out


def summarize(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per optimizer, best (lowest mean score) first: ``optimizer, lr, mean, min, max, at_grid_edge``.

    Example:
        >>> from ftmlopt.experiments.demo import summarize
        >>> rows = summarize({"A": {"lr": 0.1, "runs": [{"score": 2.0}, {"score": 1.0}]},
        ...                   "B": {"lr": 0.2, "runs": [{"score": 0.5}, {"score": 0.7}]}})
        >>> [(r["optimizer"], r["mean"], r["min"], r["max"]) for r in rows]
        [('B', 0.6, 0.5, 0.7), ('A', 1.5, 1.0, 2.0)]
    """
    rows = []
    for name, rec in result.items():
        scores = [r["score"] if math.isfinite(r["score"]) else math.inf for r in rec["runs"]]
        row = {
            "optimizer": name, "lr": rec["lr"], "at_grid_edge": bool(rec.get("at_grid_edge", False)),
            "mean": _mean(scores), "min": min(scores), "max": max(scores), "seeds": len(scores),
        }
        accs = [r["test_acc"] for r in rec["runs"] if "test_acc" in r]
        if accs:
            row["test_acc"] = statistics.fmean(accs)
        rows.append(row)
    rows.sort(key=lambda r: (r["mean"], r["optimizer"]))
    return rows


def tied(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    """Two rows are tied when their seed ranges ``[min, max]`` overlap.

    Example:
        >>> from ftmlopt.experiments.demo import tied
        >>> a = {"min": 1.0, "max": 2.0}
        >>> tied(a, {"min": 1.9, "max": 3.0}), tied(a, {"min": 2.1, "max": 3.0})
        (True, False)
    """
    return a["min"] <= b["max"] and b["min"] <= a["max"]


def _pct(worse: float, better: float) -> str:
    if not math.isfinite(worse):
        return "diverged"
    return f"{100.0 * (worse - better) / abs(better):.0f}% higher"


def _versus(ftml: Mapping[str, Any], other: Mapping[str, Any]) -> str:
    """``FTML vs other``, e.g. ``"17% lower than Adam's, outside the seed spread"``."""
    name = other["optimizer"]
    if tied(ftml, other):
        return f"level with {name} ({other['mean']:.3g}) within the seed spread"
    if not math.isfinite(other["mean"]):
        return f"ahead of {name}, which diverged"
    if not math.isfinite(ftml["mean"]):
        return f"behind {name}: FTML diverged"
    rel = 100.0 * (ftml["mean"] - other["mean"]) / abs(other["mean"])
    side = "lower" if rel < 0 else "higher"
    return f"{abs(rel):.0f}% {side} than {name}'s {other['mean']:.3g}, outside the seed spread"


def _sentence(regime: str, rows: Sequence[Mapping[str, Any]]) -> str:
    what = {"stationary": "Stationary (digits MLP, final training loss)",
            "shifting": "Shifting distribution (mean online loss)"}[regime]
    best = rows[0]
    by_name = {r["optimizer"]: r for r in rows}
    ftml = by_name["FTML"]
    adam = f"; FTML is {_versus(ftml, by_name['Adam'])}" if "Adam" in by_name and best["optimizer"] != "Adam" else ""
    if best["optimizer"] == "FTML":
        runner = rows[1]
        gap = "tied with it" if tied(best, runner) else f"{_pct(runner['mean'], best['mean'])}, outside the seed spread"
        adam = "" if runner["optimizer"] == "Adam" else adam
        return f"{what}: FTML wins ({best['mean']:.3g}); the next best, {runner['optimizer']}, is {gap}{adam}."
    if tied(ftml, best):
        stand = f"FTML ({ftml['mean']:.3g}) is tied with it"
    else:
        stand = f"FTML ({ftml['mean']:.3g}) is {_pct(ftml['mean'], best['mean'])}, outside the seed spread"
    if best["optimizer"] == "Adam":
        return f"{what}: Adam wins ({best['mean']:.3g}); {stand}."
    return f"{what}: {best['optimizer']} wins ({best['mean']:.3g}); {stand}{adam}."


def verdict(stationary: Sequence[Mapping[str, Any]], shifting: Sequence[Mapping[str, Any]]) -> str:
    """Two sentences, one per regime, generated from :func:`summarize` rows (best first).

    Each names the winner and its score, says where FTML stands against it (winning, and by how much over
    the next best; tied, i.e. seed ranges overlap, :func:`tied`; or behind by a percentage), and, when
    Adam is not the winner, how FTML compares with Adam.

    Example:
        >>> from ftmlopt.experiments.demo import verdict
        >>> st = [{"optimizer": "Adam", "mean": 0.10, "min": 0.09, "max": 0.11},
        ...       {"optimizer": "FTML", "mean": 0.105, "min": 0.10, "max": 0.12}]
        >>> sh = [{"optimizer": "FTML", "mean": 2.0, "min": 1.9, "max": 2.1},
        ...       {"optimizer": "Adam", "mean": 3.0, "min": 2.8, "max": 3.2}]
        >>> print(verdict(st, sh))  # doctest: +ELLIPSIS
        Stationary (digits MLP, final training loss): Adam wins (0.1); FTML (0.105) is tied with it.
        Shifting distribution (mean online loss): FTML wins (2); the next best, Adam, is 50% higher, ...
    """
    return f"{_sentence('stationary', stationary)}\n{_sentence('shifting', shifting)}"


def format_table(rows: Sequence[Mapping[str, Any]], regime: str) -> str:
    """Plain-text table of :func:`summarize` rows for one regime."""
    acc = any("test_acc" in r for r in rows)
    head = f"{'optimizer':<13} {'lr':>8}   {'mean':>9} {'[min, max] over seeds':>24}"
    head += f"  {'held-out acc':>12}" if acc else ""
    lines = [REGIMES[regime], head, "-" * len(head)]
    for r in rows:
        line = (f"{r['optimizer']:<13} {r['lr']:>8.3g}{'*' if r['at_grid_edge'] else ' '}  {r['mean']:>9.4g}"
                f"   [{r['min']:>9.4g}, {r['max']:>9.4g}]")
        line += f"  {r['test_acc']:>12.3f}" if acc else ""
        lines.append(line)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``ftmlopt demo``."""
    if getattr(args, "backend", "torch") == "numpy":
        return run_numpy(args)
    missing = missing_extras()
    if missing:
        print(
            f"ftmlopt demo needs {', '.join(missing)}, which could not be imported.\n"
            "Install the demo extra: pip install 'ftmlopt[demo]'   (from a checkout: pip install -e '.[demo]')",
            file=sys.stderr,
        )
        return 2
    if args.epochs is None:
        args.epochs = EPOCHS
    for flag, value in (("--epochs", args.epochs), ("--iterations", args.iterations), ("--seeds", args.seeds)):
        if value < 1:
            print(f"ftmlopt demo: {flag} must be >= 1, got {value}", file=sys.stderr)
            return 2
    import torch
    from tqdm.auto import tqdm

    from ftmlopt.experiments import harness

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, args.threads))
    try:
        t0 = time.perf_counter()
        print(
            f"Should I use FTML? Each optimizer's rate swept over {len(GRIDS['stationary']['FTML'])} values x "
            f"{args.seeds} seeds, "
            f"same budget and initial weights; {CONTROL} at 0.4 x FTML's rate (Theorem 1 control)."
        )
        total = sum(sum(len(g) for g in grids.values()) + 1 for grids in GRIDS.values()) * args.seeds
        results: dict[str, Any] = {}
        state_bits = getattr(args, "state_bits", 32)
        with tqdm(total=total, desc="demo", disable=args.no_progress, file=sys.stderr, dynamic_ncols=True) as bar, \
                harness.ftml_state_bits(state_bits):
            for regime in REGIMES:
                results[regime] = sweep(
                    regime, epochs=args.epochs, iterations=args.iterations, seeds=args.seeds, bar=bar
                )
        env = harness.environment()  # recorded while the run's thread setting is in force
    finally:
        torch.set_num_threads(threads)
    elapsed = time.perf_counter() - t0
    rows = {regime: summarize(res) for regime, res in results.items()}
    for regime in REGIMES:
        print()
        print(format_table(rows[regime], regime))
    if any(r["at_grid_edge"] for rr in rows.values() for r in rr):
        print("* chosen rate at the edge of its grid")
    text = verdict(rows["stationary"], rows["shifting"])
    print(f"\nVerdict (computed from the table; tied = seed ranges overlap):\n{text}")
    out = Path(args.out)
    write_json(
        {
            "command": "ftmlopt demo" + (
                "" if (args.epochs, args.iterations, args.seeds) == (EPOCHS, ITERATIONS, SEEDS)
                else f" --epochs {args.epochs} --iterations {args.iterations} --seeds {args.seeds}"
            ) + ("" if state_bits == 32 else f" --state-bits {state_bits}"),
            "config": {"epochs": args.epochs, "iterations": args.iterations, "seeds": args.seeds,
                       "ftml_state_bits": state_bits,
                       "grids": {r: {n: list(g) for n, g in gr.items()} for r, gr in GRIDS.items()},
                       "regimes": REGIMES},
            "environment": env,
            "seconds": round(elapsed, 1),
            "summary": rows,
            "verdict": text,
            "results": results,
        },
        out / "demo.json",
    )
    panels = {
        REGIMES[regime]: {name: [r["curve"] for r in rec["runs"]] for name, rec in res.items()}
        for regime, res in results.items()
    }
    png = harness.plot_curves(
        panels, out / "demo.png", "ftmlopt demo: tuned rates, mean over seeds (band: min-max)",
        x_label="epoch (stationary) / iteration (shifting)", y_label="loss",
    )
    print(f"\n({elapsed:.1f} s) plot: {png}\ncurves: {out / 'demo.json'}")
    return 0


def run_numpy(args: argparse.Namespace) -> int:
    """``ftmlopt demo --backend numpy``: the MXNet-style API on NumPy, FTML against plain SGD."""
    needed = (("sklearn", "scikit-learn"), ("tqdm", "tqdm"))
    missing = [pip for mod, pip in needed if importlib.util.find_spec(mod) is None]
    if missing:
        print(f"ftmlopt demo --backend numpy needs {', '.join(missing)}: pip install 'ftmlopt[demo]'", file=sys.stderr)
        return 2
    from ftmlopt.experiments import numpy_demo

    epochs = args.epochs if args.epochs is not None else NUMPY_EPOCHS
    t0 = time.perf_counter()
    print(f"One-hidden-layer MLP on scikit-learn digits through ftmlopt.optimizer.get_updater, {epochs} epochs")
    results = numpy_demo.run(epochs=epochs, seed=args.seed, progress=not args.no_progress)
    print()
    print(numpy_demo.format_table(results))
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0
