"""``ftmlopt demo``: FTML against Adam, RMSprop and SGD with Nesterov momentum on scikit-learn's digits.

A small CNN (conv3x3(16) + ReLU, conv3x3(32) + ReLU, max-pool 2x2, dense(64) + ReLU, dense(10)) is
trained on the 1,437 training images of scikit-learn's bundled 8x8 digits (360 held out, fixed split),
batch 32, once per optimizer, every run starting from the *same* initial weights and seeing the same
batches. The rates are each optimizer's usual default, not tuned: FTML 0.0025 (so that
``0.0025 * (1 - 0.6) = 0.001``, Adam's default; see Theorem 1 in ``docs/results.md``), Adam 0.001,
RMSprop 0.001, SGD-Nesterov 0.05 with momentum 0.9. Prints a table of final training loss and
held-out accuracy and writes ``OUT/demo.png`` (training loss per epoch, log scale) and ``OUT/demo.json``.

Needs the ``demo`` extra (torch, scikit-learn, matplotlib, tqdm); says so and exits with status 2
when one is missing. Runs in well under a minute on one CPU core.

Example (shell):
    $ ftmlopt demo --epochs 5 --out runs/demo
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

#: the extras the demo needs (import name -> pip name)
REQUIRED = {"torch": "torch", "sklearn": "scikit-learn", "matplotlib": "matplotlib", "tqdm": "tqdm"}

#: optimizer name -> learning rate used by the demo
RATES = {"FTML": 2.5e-3, "Adam": 1e-3, "RMSprop": 1e-3, "SGD-Nesterov": 0.05}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``ftmlopt demo`` to ``parser``."""
    parser.add_argument("--epochs", type=int, default=20, help="training epochs per optimizer (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and batch order")
    parser.add_argument("--out", default="runs/demo", help="output folder for demo.png and demo.json")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument(
        "--backend",
        choices=("torch", "numpy"),
        default="torch",
        help="torch: the CNN with ftmlopt.torch.FTML and torch.optim baselines (default); numpy: an MLP "
        "trained through the MXNet-style ftmlopt.mxnet.optimizer API, FTML against SGD (needs no torch)",
    )


def missing_extras() -> list[str]:
    """pip names of the demo's dependencies that cannot be imported."""
    return [pip for mod, pip in REQUIRED.items() if importlib.util.find_spec(mod) is None]


def build_model() -> Any:
    """The demo's CNN for 1x8x8 inputs."""
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def make_demo_optimizer(name: str, params: Any, lr: float) -> Any:
    """Build one of the demo's optimizers (FTML from :mod:`ftmlopt.torch`, the rest from torch.optim)."""
    from ftmlopt.experiments.harness import make_optimizer

    return make_optimizer("NAG" if name == "SGD-Nesterov" else name, params, lr)


def train(
    epochs: int = 30, seed: int = 0, progress: bool = True, names: tuple[str, ...] = tuple(RATES)
) -> dict[str, dict[str, Any]]:
    """Train the demo CNN once per optimizer in ``names``; return ``{name: {"lr", "losses", "test_acc"}}``.

    ``losses[e]`` is the mean training loss over epoch ``e`` (the model in training mode, batches as seen).

    Example:
        >>> from ftmlopt.experiments.demo import train
        >>> res = train(epochs=1, progress=False, names=("Adam",))
        >>> len(res["Adam"]["losses"]), 0.0 <= res["Adam"]["test_acc"] <= 1.0
        (1, True)
    """
    import torch
    from tqdm.auto import tqdm

    from ftmlopt.experiments.data import load_digits_split
    from ftmlopt.experiments.harness import ClassifierRun

    xtr, ytr, xte, yte = (torch.from_numpy(a) for a in load_digits_split(seed=0))
    data = {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte}
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        # same seed -> same initial weights and the same batches for every optimizer
        run = ClassifierRun(
            build_model, lambda p, n=name: make_demo_optimizer(n, p, RATES[n]), data, batch=32, seed=seed
        )
        losses: list[float] = []
        bar = tqdm(range(epochs), desc=f"{name:<12}", disable=not progress, file=sys.stderr, dynamic_ncols=True)
        for _ in bar:
            losses.append(run.step())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        results[name] = {"lr": RATES[name], "losses": losses, "test_acc": run.evaluate()["test_acc"]}
    return results


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
    if args.epochs < 1:
        print(f"ftmlopt demo: --epochs must be >= 1, got {args.epochs}", file=sys.stderr)
        return 2
    import torch

    from ftmlopt.experiments import harness

    torch.set_num_threads(max(1, args.threads))
    t0 = time.perf_counter()
    print(
        f"Small CNN on scikit-learn digits (1437 train / 360 held out), {args.epochs} epochs, batch 32, "
        f"same initial weights (seed {args.seed}) for every optimizer"
    )
    res = train(args.epochs, args.seed, progress=not args.no_progress)
    elapsed = time.perf_counter() - t0
    print(f"\n{'optimizer':<13} {'lr':>7}  {'final train loss':>16}  {'held-out acc':>12}")
    for name, r in sorted(res.items(), key=lambda kv: kv[1]["losses"][-1]):
        print(f"{name:<13} {r['lr']:>7g}  {r['losses'][-1]:>16.4g}  {r['test_acc']:>12.3f}")
    out = Path(args.out)
    harness.write_json({"epochs": args.epochs, "seed": args.seed, "seconds": round(elapsed, 1), "runs": res},
                       out / "demo.json")
    png = harness.plot_curves(
        {"demo": {name: [r["losses"]] for name, r in res.items()}}, out / "demo.png",
        f"Digits CNN, batch 32, same initial weights (seed {args.seed})",
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

    t0 = time.perf_counter()
    print(f"One-hidden-layer MLP on scikit-learn digits through ftmlopt.optimizer.get_updater, {args.epochs} epochs")
    results = numpy_demo.run(epochs=args.epochs, seed=args.seed, progress=not args.no_progress)
    print()
    print(numpy_demo.format_table(results))
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0
