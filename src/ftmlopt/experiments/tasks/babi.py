"""§4.3: the end-to-end memory network of Keras' ``babi_memnn`` example on bAbI QA1 (en-10k), batch 32.

Network, as in the Keras example: story words embedded twice (64-d "m" and query-length-d "c"
encodings), question embedded in 64-d, each followed by dropout 0.3; match = softmax over the
question axis of ``m . q``; response = match + c, transposed and concatenated with the question
encoding; LSTM(32), dropout 0.3, dense(vocabulary), softmax cross-entropy. Stories are the
flattened sentences seen so far (left-padded to 68 words), questions 4 words; 21 words + padding.
Training loss per epoch is the mean mini-batch loss (dropout on); test accuracy on the 1,000 test
questions at the end. Quick mode: the first 640 training questions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftmlopt.experiments.data import babi_vocab, load_babi, resolve_data, vectorize_babi
from ftmlopt.experiments.harness import ClassifierRun, Run, TaskSpec

BATCH = 32
QUICK_TRAIN = 640


def build_model(vocab_size: int, story_len: int, query_len: int) -> Any:
    """The Keras ``babi_memnn`` network; ``vocab_size`` counts the padding index 0."""
    import torch
    import torch.nn as nn

    class MemNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc_m = nn.Embedding(vocab_size, 64)
            self.enc_c = nn.Embedding(vocab_size, query_len)
            self.enc_q = nn.Embedding(vocab_size, 64)
            self.drop = nn.Dropout(0.3)
            self.lstm = nn.LSTM(story_len + 64, 32, batch_first=True)
            self.out = nn.Linear(32, vocab_size)

        def forward(self, story: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
            m = self.drop(self.enc_m(story))  # (b, story, 64)
            c = self.drop(self.enc_c(story))  # (b, story, query)
            q = self.drop(self.enc_q(question))  # (b, query, 64)
            match = torch.softmax(m @ q.transpose(1, 2), dim=-1)  # (b, story, query), softmax over the query axis
            response = (match + c).transpose(1, 2)  # (b, query, story)
            h, _ = self.lstm(torch.cat([response, q], dim=-1))
            logits: torch.Tensor = self.out(self.drop(h[:, -1]))
            return logits

    return MemNN()


def _load(data: Path | None, quick: bool) -> dict[str, Any]:
    import torch

    files = resolve_data(data, "babi-qa1")
    train, test = load_babi(files)
    vocab, story_len, query_len = babi_vocab(train, test)
    if quick:
        train = train[:QUICK_TRAIN]
    tr = vectorize_babi(train, vocab, story_len, query_len)
    te = vectorize_babi(test, vocab, story_len, query_len)
    t = torch.from_numpy
    return {
        "x_train": (t(tr.stories), t(tr.questions)), "y_train": t(tr.answers),
        "x_test": (t(te.stories), t(te.questions)), "y_test": t(te.answers),
        "shape": (len(vocab) + 1, story_len, query_len),
        "provenance": files.provenance,
    }


def _make_run(data: Any, variant: str, make_opt: Any, seed: int, quick: bool) -> Run:
    return ClassifierRun(lambda: build_model(*data["shape"]), make_opt, data, BATCH, seed)


_ADAPTIVE = (0.01, 0.005, 0.0025, 0.001)
SPEC = TaskSpec(
    name="babi",
    title="§4.3 bAbI QA1 (en-10k), Keras babi_memnn memory network, batch 32",
    paper=(
        "120 epochs: FTML ≈ RMSprop best (≈1-4e-3, noisy), Adam slower (≈6e-3-1e-2), NAG ≈ 0.15, Adadelta ≈ 0.4."
    ),
    optimizers=("FTML", "Adam", "RMSprop", "Adadelta", "NAG"),
    grids={"FTML": (0.025, 0.01, 0.005, 0.0025), "Adam": _ADAPTIVE, "RMSprop": _ADAPTIVE, "Adadelta": (1.0,),
           "NAG": (0.5, 0.25, 0.1, 0.05)},
    quick_grids={"FTML": (0.005, 0.0025), "Adam": (0.001,), "RMSprop": (0.001,), "Adadelta": (1.0,),
                 "NAG": (0.1,)},
    epochs=15,
    quick_epochs=2,
    seeds=3,
    load=_load,
    make_run=_make_run,
    prune_after=4,
    keep=2,
)
