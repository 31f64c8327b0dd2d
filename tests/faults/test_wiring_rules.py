"""Live wiring checks on real trainings: a dead network and parameters that never get a gradient.

Each fault is trained for real and checked against its fixed variant with
plain torch first (the bug must hurt, the fix must train); the monitor's
verdict comes from the per-tensor gradient norms sent every step, so it must
not depend on the sampling interval (each test runs at two of them).
"""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from layerwatch.server.diagnosis.rules import dead_network, no_gradient
from tests.faults.conftest import alarms, by_rule, describe

_X, _Y = load_digits(return_X_y=True)
IMAGES = torch.tensor(_X / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
LABELS = torch.tensor(_Y)


class FunctionalReluCNN(nn.Module):
    """Two convolutions and two linear layers whose ReLUs are functional (F.relu): no module to hook."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def train_cnn(model: nn.Module, opt: torch.optim.Optimizer, steps: int):
    """`train(mon)` for the fault harness; also runs without a monitor (mon=None) for the plain-torch check."""

    def train(mon) -> list[float]:
        g = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(steps):
            idx = torch.randint(0, len(IMAGES), (32,), generator=g)
            loss = F.cross_entropy(model(IMAGES[idx]), LABELS[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if mon is not None:
                mon.log(loss=loss)
        return losses

    return train


def cnn_at(lr: float, momentum: float = 0.0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = FunctionalReluCNN()
    return model, torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)


def test_the_cnn_dies_at_lr_5_and_trains_at_lr_0_1_in_plain_torch() -> None:
    model, opt = cnn_at(5.0)
    train_cnn(model, opt, 40)(None)
    zero = [name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() == 0]
    assert len(zero) >= 6, zero  # of 8 tensors: everything but the output layer's
    fixed, fixed_opt = cnn_at(0.1, momentum=0.9)
    losses = train_cnn(fixed, fixed_opt, 150)(None)
    assert sum(losses[-10:]) / 10 < 0.5 * losses[0], losses[-10:]


@pytest.mark.parametrize("every", [3, 40])
def test_a_cnn_killed_by_a_too_high_lr_is_a_dead_network(train_and_diagnose, every) -> None:
    """The dying-ReLU failure of CS231n's notes ("as much as 40% of your network can be dead if the learning
    rate is set too high", quoted in https://www.queryfor.com/what-is-the-dying-relu-problem-in-neural-networks/;
    https://ai.stackexchange.com/questions/39853): a CNN at SGD lr 5 whose loss stays at ~ln 10 once its
    ReLUs died, here with functional ReLUs, which dead_units cannot see."""
    model, opt = cnn_at(5.0)
    alerts = train_and_diagnose(train_cnn(model, opt, 80), model, opt, every=every)
    found = by_rule(alerts, "dead_network")
    assert len(found) == 1, describe(alerts)
    assert found[0]["severity"] == "critical"
    assert found[0]["step"] <= 20 + dead_network.SUSTAIN_STEPS + 10, describe(found)  # died at ~step 20
    assert found[0]["layer"] == "conv1", describe(found)  # the first layer whose gradient is gone
    assert "lower the learning rate" in found[0]["remedy"].lower()


def test_the_cnn_at_a_sane_lr_is_not_dead(train_and_diagnose) -> None:
    model, opt = cnn_at(0.1, momentum=0.9)
    alerts = train_and_diagnose(train_cnn(model, opt, 150), model, opt, every=None)
    assert not alarms(alerts), describe(alerts)


class DetachedBody(nn.Module):
    """An MLP whose forward detaches the body's features before the head: the body never learns. Reported as
    https://github.com/facebookresearch/inversecooking/issues/3 (`.data` on the logits cut the graph) and
    https://github.com/facebookresearch/fairseq/issues/408 (every encoder gradient None)."""

    def __init__(self, detach: bool) -> None:
        super().__init__()
        self.detach = detach
        self.body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.body(x)
        if self.detach:
            features = features.detach()
        return self.head(features)


def train_mlp(model: nn.Module, opt: torch.optim.Optimizer, steps: int):
    flat = IMAGES.flatten(1)

    def train(mon) -> list[float]:
        g = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(steps):
            idx = torch.randint(0, len(flat), (32,), generator=g)
            loss = F.cross_entropy(model(flat[idx]), LABELS[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if mon is not None:
                mon.log(loss=loss)
        return losses

    return train


def detached(detach: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = DetachedBody(detach)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def test_the_detached_body_hurts_in_plain_torch() -> None:
    model, opt = detached(True)
    before = [p.clone() for p in model.body.parameters()]
    bad = train_mlp(model, opt, 200)(None)
    assert all(torch.equal(a, b) for a, b in zip(before, model.body.parameters()))  # the body never moved
    fixed, fixed_opt = detached(False)
    good = train_mlp(fixed, fixed_opt, 200)(None)
    assert sum(good[-20:]) < 0.7 * sum(bad[-20:]), (good[-20:], bad[-20:])


@pytest.mark.parametrize("every", [2, 50])
def test_a_detach_in_forward_is_no_gradient_live(train_and_diagnose, every) -> None:
    model, opt = detached(True)
    alerts = train_and_diagnose(train_mlp(model, opt, 60), model, opt, every=every)
    found = by_rule(alerts, "no_gradient")
    assert len(found) == 1, describe(alerts)  # one cause, one finding (not one per body layer)
    assert found[0]["layer"] == "body.2", describe(found)  # the body's last layer: the cut is right after it
    assert found[0]["step"] < no_gradient.WINDOW + 5, describe(found)
    assert found[0]["severity"] == "warning"
    assert ".detach()" in found[0]["remedy"]
    assert not by_rule(alerts, "dead_network"), describe(alerts)  # absent gradients are not dead ones


class SometimesBranch(nn.Module):
    """A shared trunk and two heads; the auxiliary head is used on every fifth step only (a conditional branch,
    like an auxiliary loss or an expert that is not routed to every batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)
        self.aux = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor, use_aux: bool = False) -> torch.Tensor:
        h = self.trunk(x)
        return self.head(h) + (self.aux(h) if use_aux else 0)


def test_a_branch_used_now_and_then_is_not_no_gradient(train_and_diagnose) -> None:
    torch.manual_seed(0)
    model = SometimesBranch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    flat = IMAGES.flatten(1)

    def train(mon) -> None:
        g = torch.Generator().manual_seed(0)
        for step in range(120):
            idx = torch.randint(0, len(flat), (32,), generator=g)
            loss = F.cross_entropy(model(flat[idx], use_aux=step % 5 == 4), LABELS[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.log(loss=loss)

    alerts = train_and_diagnose(train, model, opt, every=None)
    assert not by_rule(alerts, "no_gradient"), describe(alerts)
    assert not alarms(alerts), describe(alerts)
