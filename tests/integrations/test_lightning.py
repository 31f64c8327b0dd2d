"""Lightning with `layerwatch.integrations.lightning.LayerwatchCallback`, for real: a small LightningModule
trains on CPU with a per-step LR schedule and validation; what the server stored is checked against what
Lightning's own hooks measured at every optimizer step (its loss, its gradient norm in
`on_before_optimizer_step`, the lr there).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from layerwatch.integrations.lightning import LayerwatchCallback
from tests.frameworks.conftest import alarms, get

STEPS = 12


class Classifier(pl.LightningModule):
    """An MLP on a learnable synthetic task; records what Lightning shows it at each optimizer step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
        self.batch_losses: list[float] = []  # every training_step's loss (micro-batches)
        self.grad_norms: list[float] = []
        self.lrs: list[float] = []
        self.validated_at: list[int] = []  # trainer.global_step of each validation (not the sanity check)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.validated_at.append(self.trainer.global_step)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.batch_losses.append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y))

    def on_before_optimizer_step(self, optimizer) -> None:
        squares = sum(float(p.grad.double().norm()) ** 2 for p in self.parameters() if p.grad is not None)
        self.grad_norms.append(math.sqrt(squares))
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=3e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=STEPS)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _loader(n: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def _fit(tmp: Path, url: str, run: str, accumulate: int = 1) -> tuple[LayerwatchCallback, Classifier, pl.Trainer]:
    module = Classifier()
    watch = LayerwatchCallback(server=url, run=run, every=3, close_timeout=60)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=STEPS, accumulate_grad_batches=accumulate, val_check_interval=6,
        limit_val_batches=2, num_sanity_val_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp), callbacks=[watch],
    )  # fmt: skip
    trainer.fit(module, _loader(16 * STEPS * accumulate, 0), _loader(64, 1))
    return watch, module, trainer


@pytest.mark.parametrize("accumulate", [1, 2])
def test_every_step_matches_lightnings_own_hooks(tmp_path: Path, url: str, signals, accumulate: int) -> None:
    watch, module, trainer = _fit(tmp_path, url, f"lightning-accum{accumulate}", accumulate)
    run_id = watch.monitor.run_id
    assert trainer.global_step == STEPS and len(module.grad_norms) == STEPS
    loss = get(url, run_id, "scalars", key="loss")
    assert loss["steps"] == list(range(STEPS))
    # One loss per optimizer step: the mean of its micro-batches' losses.
    starts = range(0, STEPS * accumulate, accumulate)
    per_step = [sum(module.batch_losses[i : i + accumulate]) / accumulate for i in starts]
    assert loss["values"] == pytest.approx(per_step, rel=1e-5)
    # Lightning calls optimizer.step(closure): the gradients stored at step s are the ones step s applied.
    stored = signals(run_id)
    assert sorted(stored) == list(range(STEPS))
    assert [stored[s]["grad_norm"] for s in range(STEPS)] == pytest.approx(module.grad_norms, rel=1e-5)
    lr = get(url, run_id, "scalars", key="lr")
    assert lr["steps"] == list(range(STEPS)) and lr["values"] == pytest.approx(module.lrs, rel=1e-9)
    assert len(set(module.lrs)) > 6  # the schedule moved every step
    val = get(url, run_id, "scalars", key="val_loss")
    # Validation at global step G is stored at step G - 1, the step it followed; the sanity check is not stored.
    assert len(module.validated_at) >= 2 and val["steps"] == [g - 1 for g in module.validated_at]
    assert get(url, run_id)["status"] == "finished"
    assert alarms(url, run_id) == []
