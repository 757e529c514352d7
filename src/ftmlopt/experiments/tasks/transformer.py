"""A character-level GPT on tiny-shakespeare: FTML against AdamW, Adam and the Theorem 1 control.

Not in the paper (its §4 predates transformers at this scale); added because "does FTML train a
transformer?" is the first question a user asks. Everything but the optimizer is held fixed:

* **Model**: a pre-norm GPT: token + learned position embeddings (``D`` = 64), ``LAYERS`` = 2 blocks of
  causal self-attention (``HEADS`` = 4) and a 4x GELU MLP, final LayerNorm, untied linear read-out over
  the 65 characters. Context ``BLOCK`` = 64 characters, batch 16, no dropout.
* **Data**: the first 90% of tiny-shakespeare for training (random 64-character windows drawn from the
  run's own seeded stream), the last 10% held out. Validation loss is the mean cross-entropy (nats per
  character) over ``VAL_BATCHES`` fixed held-out batches, measured after every unit.
* **Schedule, for every optimizer**: linear warmup over the first ``WARMUP`` steps, then cosine decay to
  10% of the peak rate; gradient norm clipped at 1.0; decoupled weight decay ``WD`` = 0.1 on the
  matrices (embeddings and linear weights), none on biases and LayerNorm parameters.
* **Optimizers** (the peak rate is searched per optimizer):

  - FTML: ``ftmlopt.torch.FTML(groups, lr, weight_decay=0.1, decoupled_weight_decay=True)``, every other
    setting at the front end's defaults (betas (0.6, 0.999), eps 1e-8).
  - AdamW: ``torch.optim.AdamW(lr, betas=(0.9, 0.95), weight_decay=0.1)``, the usual GPT recipe.
  - Adam: ``torch.optim.AdamW(lr, betas=(0.9, 0.999), weight_decay=0.1)``: Adam's default moments with
    the same decoupled decay (so the only difference from AdamW is beta2).
  - Adam(b1=0): ``torch.optim.AdamW(0.4 * lr_FTML, betas=(0, 0.999), weight_decay=0.1 / 0.4)``: the
    Theorem 1 control; the weight decay is scaled so that its per-step decay ``lr * wd`` equals FTML's.

One unit of the harness ("epoch" in its vocabulary) is ``STEPS_PER_UNIT`` optimizer steps; its loss is
the mean training loss over those steps. Quick mode: a 1-block, 16-wide model on the first 20,000
characters, 5 steps per unit, for tests.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

from ftmlopt.experiments import harness
from ftmlopt.experiments.data import load_tinyshakespeare, resolve_data
from ftmlopt.experiments.harness import CONTROL, Run, TaskSpec

D, LAYERS, HEADS, BLOCK, BATCH = 64, 2, 4, 64, 16
STEPS_PER_UNIT = 50
UNITS = 12  # 600 steps
WARMUP = 50
WD = 0.1
CLIP = 1.0
VAL_BATCHES = 8  # 8 x 16 windows of 64 characters
QUICK = {"d": 16, "layers": 1, "heads": 2, "chars": 20_000, "steps": 5, "val_batches": 2}

OPTIMIZER_NOTES: dict[str, str] = {
    "FTML": "ftmlopt.torch.FTML(groups, lr, weight_decay=0.1, decoupled_weight_decay=True, foreach=True, "
    "fused=False), defaults otherwise",
    "AdamW": "torch.optim.AdamW(groups, lr, betas=(0.9, 0.95), weight_decay=0.1)",
    "Adam": "torch.optim.AdamW(groups, lr, betas=(0.9, 0.999), weight_decay=0.1): Adam's moments, same decay",
    CONTROL: "torch.optim.AdamW(groups, 0.4 * lr_FTML, betas=(0.0, 0.999), weight_decay=0.1 / 0.4): "
    "Theorem 1 control, per-step decay lr * wd equal to FTML's",
}


#: the one optimizer factory (:func:`ftmlopt.experiments.harness.make_optimizer`) with this task's settings:
#: decoupled weight decay 0.1 (the control's scaled to ``wd / 0.4``), FTML's multi-tensor path (see PATH_NOTE).
#: ``groups`` are the two groups of :func:`param_groups`; the group without decay keeps ``weight_decay=0``.
make_optimizer = functools.partial(harness.make_optimizer, weight_decay=WD, ftml_foreach=True)


def build_model(vocab: int, d: int = D, layers: int = LAYERS, heads: int = HEADS, block: int = BLOCK) -> Any:
    """The GPT described in the module docstring; ``model(x)`` maps ``(b, t)`` codes to ``(b, t, vocab)`` logits."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, _ = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
            q, k, v = (z.view(b, t, heads, d // heads).transpose(1, 2) for z in (q, k, v))
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
            out: torch.Tensor = x + self.mlp(self.ln2(x))
            return out

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(block, d)
            self.blocks = nn.Sequential(*(Block() for _ in range(layers)))
            self.ln = nn.LayerNorm(d)
            self.head = nn.Linear(d, vocab)
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=0.02)
                    if isinstance(m, nn.Linear) and m.bias is not None:
                        nn.init.zeros_(m.bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.tok(x) + self.pos(torch.arange(x.shape[1]))
            logits: torch.Tensor = self.head(self.ln(self.blocks(h)))
            return logits

    return GPT()


def param_groups(model: Any) -> list[dict[str, Any]]:
    """Matrices (``dim >= 2``: embeddings, linear weights) decay; biases and LayerNorm parameters do not."""
    params = list(model.parameters())
    return [
        {"params": [p for p in params if p.dim() >= 2]},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Warmup then cosine: ``step/warmup`` for ``step < warmup``, then from 1 down to 0.1 at ``step = total``.

    Example:
        >>> from ftmlopt.experiments.tasks.transformer import lr_factor
        >>> [round(lr_factor(s, 100, 10), 3) for s in (0, 5, 10, 55, 100)]
        [0.1, 0.6, 1.0, 0.55, 0.1]
    """
    if step < warmup:
        return (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac))


class GPTRun(Run):
    """One training run; :meth:`train_epoch` takes ``steps`` optimizer steps and records validation loss."""

    def __init__(self, data: dict[str, Any], make_opt: Any, seed: int, units: int) -> None:
        import torch

        super().__init__(seed)
        cfg = data["cfg"]
        self.model = build_model(data["vocab"], cfg["d"], cfg["layers"], cfg["heads"], BLOCK)
        self.opt = make_opt(param_groups(self.model))
        self.peak = [g["lr"] for g in self.opt.param_groups]
        self.train_codes, self.val = data["train"], data["val"]
        self.steps: int = int(cfg["steps"])
        self.total = self.steps * units
        self.warmup = min(WARMUP, max(1, self.total // 10))
        self.t = 0
        self.val_curve: list[float] = []
        self._offsets = torch.arange(BLOCK + 1)

    def train_epoch(self) -> float:
        import torch
        import torch.nn.functional as F

        self.model.train()
        total = 0.0
        for _ in range(self.steps):
            factor = lr_factor(self.t, self.total, self.warmup)
            for g, peak in zip(self.opt.param_groups, self.peak):
                g["lr"] = peak * factor
            starts = torch.randint(0, len(self.train_codes) - BLOCK - 1, (BATCH,))
            chunk = self.train_codes[starts[:, None] + self._offsets]
            logits = self.model(chunk[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
            self.opt.step()
            self.t += 1
            value = float(loss.detach().item())
            if not math.isfinite(value):
                self.val_curve.append(math.nan)
                return math.nan
            total += value
        self.val_curve.append(self._val_loss())
        return total / self.steps

    def _val_loss(self) -> float:
        import torch
        import torch.nn.functional as F

        self.model.eval()
        with torch.no_grad():
            x, y = self.val
            logits = self.model(x)
            return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))

    def evaluate(self) -> dict[str, float]:
        return {"val_loss": self.val_curve[-1]} if self.val_curve else {}

    def curves(self) -> dict[str, list[float]]:
        return {"validation loss": list(self.val_curve)}


def _load(data: Path | None, quick: bool) -> dict[str, Any]:
    import numpy as np
    import torch

    files = resolve_data(data, "tinyshakespeare")
    codes, chars = load_tinyshakespeare(files)
    cfg = (
        {"d": QUICK["d"], "layers": QUICK["layers"], "heads": QUICK["heads"], "steps": QUICK["steps"],
         "val_batches": QUICK["val_batches"]}
        if quick else {"d": D, "layers": LAYERS, "heads": HEADS, "steps": STEPS_PER_UNIT, "val_batches": VAL_BATCHES}
    )
    if quick:
        codes = codes[: QUICK["chars"]]
    split = int(0.9 * len(codes))
    train = torch.from_numpy(np.ascontiguousarray(codes[:split]).astype(np.int64))
    val = torch.from_numpy(np.ascontiguousarray(codes[split:]).astype(np.int64))
    # fixed held-out batches: evenly spaced windows (the same for every run)
    n = cfg["val_batches"] * BATCH
    starts = torch.linspace(0, len(val) - BLOCK - 2, n).long()
    chunk = val[starts[:, None] + torch.arange(BLOCK + 1)]
    return {
        "train": train, "val": (chunk[:, :-1], chunk[:, 1:]), "vocab": len(chars), "cfg": cfg,
        "provenance": files.provenance,
    }


def _make_run(data: Any, variant: str, make_opt: Any, seed: int, quick: bool) -> Run:
    return GPTRun(data, make_opt, seed, data["units"])


SPEC = TaskSpec(
    name="transformer",
    title=f"char-GPT ({LAYERS} blocks, d={D}, {HEADS} heads, context {BLOCK}), tiny-shakespeare, batch {BATCH}, "
    f"warmup+cosine, decoupled wd {WD}",
    paper="Not in the paper (2017). Question asked: does FTML match AdamW on a small transformer?",
    optimizers=("FTML", "AdamW", "Adam"),
    # FTML's window is Adam's times 2.5 (Theorem 1: FTML at lr steps like Adam(b1=0) at 0.4 lr)
    grids={"FTML": (0.025, 0.01, 0.005), "AdamW": (0.01, 0.005, 0.0025), "Adam": (0.01, 0.005, 0.0025)},
    quick_grids={"FTML": (0.005,), "AdamW": (0.002,), "Adam": (0.002,)},
    epochs=UNITS,
    quick_epochs=2,
    seeds=3,
    load=_load,
    make_run=_make_run,
    prune_after=3,
    keep=1,
    x_label=f"steps (x{STEPS_PER_UNIT}; quick: x{QUICK['steps']})",
    y_label="loss (nats/char)",
    notes=(
        f"one unit = {STEPS_PER_UNIT} optimizer steps (quick: {QUICK['steps']}); training loss = mean over the unit's "
        "steps; validation loss after each unit on fixed held-out batches",
        "rates are the peak of the warmup+cosine schedule; the Theorem 1 control gets 0.4x FTML's peak rate and "
        "wd / 0.4",
    ),
    optimizer_factory=make_optimizer,
    optimizer_notes=OPTIMIZER_NOTES,
    extra_panels=("validation loss",),
    with_horizon=True,
)
