"""A small real training for the fault tests: a seeded MLP, one optimizer step per call."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# The layer and parameter the tests read back: the first Linear's weight gradient.
PROBE = {"layer": "0", "param": "weight", "kind": "grad"}


class TinyTraining:
    """Linear-ReLU-Linear on a fixed random batch; `step()` trains one step and returns the loss tensor."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05)
        self.x, self.y = torch.randn(64, 8), torch.randint(0, 4, (64,))

    def step(self, index: int) -> torch.Tensor:
        rows = torch.arange(index * 16, index * 16 + 16) % len(self.x)
        loss = F.cross_entropy(self.model(self.x[rows]), self.y[rows])
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss
