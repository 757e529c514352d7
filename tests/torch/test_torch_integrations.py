"""FTML inside PyTorch Lightning and Hugging Face ``transformers.Trainer`` (small, CPU, a few seconds each).

timm is not covered: its models need torchvision, which cannot be installed beside torch 2.13.0 here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ftmlopt.torch import FTML


def _data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1
    return x, y


def test_lightning_configure_optimizers_steps_with_a_closure() -> None:
    import lightning as L

    class Regressor(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)
            self.losses: list[float] = []

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self) -> Any:
            opt = FTML(self.parameters(), lr=0.05)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    torch.manual_seed(0)
    model = Regressor()
    closures: list[bool] = []
    trainer = L.Trainer(max_epochs=5, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    x, y = _data()

    def record(opt: Any, args: Any, kwargs: Any) -> None:
        closures.append(callable(kwargs.get("closure", args[0] if args else None)))

    model.on_train_start = lambda: trainer.optimizers[0].register_step_pre_hook(record)  # type: ignore[method-assign]
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=16))
    opt = trainer.optimizers[0]
    assert isinstance(opt, FTML)
    assert closures == [True] * 20  # Lightning's automatic optimization always passes a closure
    assert opt.state[model.layer.weight]["step"].item() == 20
    assert opt.param_groups[0]["lr"] == 0.05 * 0.5**2  # the step-interval scheduler ran
    assert model.losses[-1] < 0.5 * model.losses[0]


@pytest.mark.parametrize("decoupled", [False, True], ids=["coupled", "adamw-style"])
def test_transformers_trainer_optimizer_cls_and_kwargs(tmp_path: Path, decoupled: bool) -> None:
    """The documented recipe, and its AdamW variant: ``decoupled_weight_decay`` in the kwargs reaches
    every group the Trainer builds, and the decay groups then shrink the weight by ``1 - lr*wd``."""
    from transformers import Trainer, TrainingArguments

    class Regressor(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": torch.nn.functional.mse_loss(self.layer(x), labels)}

    x, y = _data()
    dataset = [{"x": xi, "labels": yi} for xi, yi in zip(x, y)]
    torch.manual_seed(0)
    model = Regressor()
    loss_before = model(x, y)["loss"].item()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=16,
                             learning_rate=0.3, weight_decay=0.01, report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True, logging_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      optimizer_cls_and_kwargs=(FTML, {"lr": 0.3, "betas": (0.6, 0.999),
                                                       "decoupled_weight_decay": decoupled}))
    trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate may wrap it
    assert isinstance(opt, FTML)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.01}  # the Trainer's decay / no-decay groups
    assert all(g["decoupled_weight_decay"] is decoupled for g in opt.param_groups)
    assert opt.state[model.layer.weight]["step"].item() == 30
    with torch.no_grad():
        assert model(x, y)["loss"].item() < 0.5 * loss_before
    # One more step with a zero gradient: decoupled, the weight shrinks by exactly 1 - lr*wd; coupled L2
    # adds wd*w to the gradient instead, which makes an lr-sized FTML step, not that shrink.
    decay_group = next(g for g in opt.param_groups if g["weight_decay"] == 0.01)
    w = decay_group["params"][0]
    before = w.detach().clone()
    lr = 0.1  # the Trainer's linear schedule has reached 0 after its last step
    for g in opt.param_groups:
        g["lr"] = lr
        for q in g["params"]:
            q.grad = torch.zeros_like(q)
    opt.step()
    if decoupled:
        torch.testing.assert_close(w.detach(), before * (1 - lr * 0.01), rtol=1e-6, atol=0.0)
    else:
        assert not torch.allclose(w.detach(), before * (1 - lr * 0.01), rtol=1e-6, atol=0.0)
