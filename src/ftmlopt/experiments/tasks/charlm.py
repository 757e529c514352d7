"""Character-level LSTM language model on tiny-shakespeare, standing in for the paper's §4.4 dialogue model.

The paper's §4.4 model (a 1000-unit seq2seq LSTM on 50,000 Cornell movie dialogues) is far too large
for a CPU, so this task keeps its character: an LSTM trained on text with a constant step size.
Network: embedding(65 chars, 32), 1-layer LSTM(128), dense(65), softmax cross-entropy per
character. Data: the first ``TRAIN_CHARS`` characters cut into non-overlapping 65-character windows
(64 inputs, 64 next-character targets), shuffled every epoch, batch 32, hidden state reset per
window; held-out loss on the last 100,000 characters. Quick mode: the first 8,192 characters, and the
last 8,192 held out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftmlopt.experiments.data import load_tinyshakespeare, resolve_data
from ftmlopt.experiments.harness import ClassifierRun, Run, TaskSpec

SEQ = 64
BATCH = 32
TRAIN_CHARS = 100_000
QUICK_CHARS = 8_192
HELD_OUT = 100_000


class CharLSTM:
    """Factory for the network (a function, so torch is imported lazily)."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def __call__(self) -> Any:
        import torch
        import torch.nn as nn

        vocab = self.vocab

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.emb = nn.Embedding(vocab, 32)
                self.lstm = nn.LSTM(32, 128, batch_first=True)
                self.out = nn.Linear(128, vocab)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                h, _ = self.lstm(self.emb(x))
                logits: torch.Tensor = self.out(h)
                return logits.reshape(-1, vocab)  # (batch*seq, vocab): one prediction per character

        return Net()


def _windows(codes: Any) -> tuple[Any, Any]:
    import torch

    n = (len(codes) - 1) // SEQ
    x = torch.from_numpy(codes[: n * SEQ].reshape(n, SEQ).copy())
    y = torch.from_numpy(codes[1 : n * SEQ + 1].reshape(n, SEQ).copy())
    return x, y


class _Targets:
    """Per-window targets indexed like inputs but flattened, to match the (batch*seq, vocab) logits."""

    def __init__(self, y: Any) -> None:
        self.y = y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, idx: Any) -> Any:
        return self.y[idx].reshape(-1)


def _load(data: Path | None, quick: bool) -> dict[str, Any]:
    files = resolve_data(data, "tinyshakespeare")
    codes, chars = load_tinyshakespeare(files)
    xtr, ytr = _windows(codes[: QUICK_CHARS if quick else TRAIN_CHARS])
    xte, yte = _windows(codes[-(QUICK_CHARS if quick else HELD_OUT) :])
    return {"x_train": xtr, "y_train": _Targets(ytr), "x_test": xte, "y_test": yte.reshape(-1), "vocab": len(chars),
            "provenance": files.provenance}


def _make_run(data: Any, variant: str, make_opt: Any, seed: int, quick: bool) -> Run:
    return ClassifierRun(CharLSTM(data["vocab"]), make_opt, data, BATCH, seed)


_ADAPTIVE = (0.01, 0.005, 0.0025, 0.001)
SPEC = TaskSpec(
    name="charlm",
    title="char-LSTM(128), tiny-shakespeare (stand-in for §4.4), batch 32",
    paper=(
        "§4.4 (Cornell dialogues, seq2seq LSTM): FTML (≈0.5) beats Adam (≈0.55), RMSprop far worse (≈2.2); "
        "NAG slower for ~21 epochs, then lowest (≈0.35). Adadelta omitted as poor."
    ),
    optimizers=("FTML", "Adam", "RMSprop", "NAG"),
    grids={"FTML": (0.025, 0.01, 0.005, 0.0025), "Adam": _ADAPTIVE, "RMSprop": _ADAPTIVE,
           "NAG": (0.5, 0.25, 0.1, 0.05)},
    quick_grids={"FTML": (0.005, 0.0025), "Adam": (0.001,), "RMSprop": (0.001,), "NAG": (0.5,)},
    epochs=10,
    quick_epochs=2,
    seeds=3,
    load=_load,
    make_run=_make_run,
    prune_after=3,
    keep=2,
)
