"""One optimizer step of a plain classification training, the monitor logging it: what the
client tests (monitor, spool, robustness, upload) all train with."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from client_hook import monitor


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, mon: monitor.Monitor | None = None
) -> torch.Tensor:
    """Cross-entropy forward, zero_grad, backward, step; `mon.log(loss, targets)` when a monitor is given."""
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if mon is not None:
        mon.log(loss=loss, targets=y)
    return loss


def optimize(opt: torch.optim.Optimizer, loss: torch.Tensor, losses: list[float], mon: monitor.Monitor | None) -> None:
    """One optimizer step on `loss` (zero_grad, backward, step), its value kept in `losses`, logged to `mon`."""
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
    if mon is not None:
        mon.log(loss=loss)
