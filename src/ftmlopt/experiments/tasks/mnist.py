"""§4.1a: the Keras ``mnist_cnn`` network on the 10k MNIST images, batch 128.

Network (paper widths times ``WIDTH``): conv3x3(32) + ReLU, conv3x3(64) + ReLU, max-pool 2x2,
dropout 0.25, dense(128) + ReLU, dropout 0.5, dense(10), softmax cross-entropy; inputs in [0, 1].
At CPU scale the widths are a quarter of the paper's (8, 16, 32): the full network costs about 40x
more per image. Data: the 10,000 MNIST test images split 8,000 train / 2,000 held-out with the
fixed permutation seed 0 (:func:`ftmlopt.experiments.data.split_mnist10k`). The training loss of an
epoch is the mean mini-batch loss during it (dropout on), as Keras reports it; held-out accuracy is
measured once at the end. Quick mode: the first 512 training and 512 held-out images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftmlopt.experiments.data import load_mnist, resolve_data
from ftmlopt.experiments.harness import ClassifierRun, Run, TaskSpec

WIDTH = 0.25
BATCH = 128
QUICK_TRAIN = 512


def build_model(width: float = WIDTH) -> Any:
    """The Keras ``mnist_cnn`` network with every layer width multiplied by ``width``."""
    import torch.nn as nn

    c1, c2, fc = (max(1, round(n * width)) for n in (32, 64, 128))
    return nn.Sequential(
        nn.Conv2d(1, c1, 3), nn.ReLU(), nn.Conv2d(c1, c2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.25),
        nn.Flatten(), nn.Linear(c2 * 12 * 12, fc), nn.ReLU(), nn.Dropout(0.5), nn.Linear(fc, 10),
    )


def _load(data: Path | None, quick: bool) -> dict[str, Any]:
    import torch

    # the full 60k/10k MNIST when it can be had; else the 10k test split, 8,000/2,000 (load_mnist warns)
    files = resolve_data(data, "mnist")
    xtr, ytr, xte, yte = load_mnist(files)
    if quick:
        xtr, ytr, xte, yte = xtr[:QUICK_TRAIN], ytr[:QUICK_TRAIN], xte[:QUICK_TRAIN], yte[:QUICK_TRAIN]
    t = torch.from_numpy
    return {"x_train": t(xtr), "y_train": t(ytr), "x_test": t(xte), "y_test": t(yte),
            "provenance": files.provenance}


def _make_run(data: Any, variant: str, make_opt: Any, seed: int, quick: bool) -> Run:
    return ClassifierRun(build_model, make_opt, data, BATCH, seed)


# Five-rate windows of the paper's grid: the first run (four rates) chose FTML's and Adam's top rate,
# so the windows now reach one rate higher; a chosen rate at an edge is flagged in the output.
_ADAPTIVE = (0.01, 0.005, 0.0025, 0.001, 0.0005)
SPEC = TaskSpec(
    name="mnist",
    title="§4.1a MNIST CNN (Keras mnist_cnn, widths x0.25), 8k of MNIST-10k, batch 128",
    paper=(
        "50 epochs: FTML ≈ Adam ≈ 5e-4 (intertwined), NAG ≈ 2e-3, Adadelta ≈ 9e-3, RMSprop ≈ 2.3e-2. "
        "FTML best, Adam comparable, RMSprop slow."
    ),
    optimizers=("FTML", "Adam", "RMSprop", "Adadelta", "NAG"),
    grids={"FTML": (0.05, 0.025, 0.01, 0.005, 0.0025), "Adam": (0.025, *_ADAPTIVE[:-1]), "RMSprop": _ADAPTIVE,
           "Adadelta": (1.0,), "NAG": (0.25, 0.1, 0.05, 0.025, 0.01)},
    quick_grids={"FTML": (0.0025, 0.001), "Adam": (0.001,), "RMSprop": (0.001,), "Adadelta": (1.0,),
                 "NAG": (0.05,)},
    epochs=12,
    quick_epochs=2,
    seeds=3,
    load=_load,
    make_run=_make_run,
    prune_after=3,
    keep=2,
)
