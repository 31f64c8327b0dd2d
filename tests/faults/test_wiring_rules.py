"""Live wiring checks on real trainings: a dead network and parameters that never get a gradient.

Each fault is trained for real and checked against its fixed variant with
plain torch first (the bug must hurt, the fix must train); the monitor's
verdict comes from the per-tensor gradient norms sent every step, so it must
not depend on the sampling interval (each test runs at two of them).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from layerwatch.server.diagnosis.rules import dead_network, no_gradient
from tests.faults.conftest import alarms, by_rule, describe, diagnose_stored

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


def train_on_digits(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    *,
    flat: bool = False,
    loss_fn=F.cross_entropy,
    log_targets: bool = False,
):
    """`train(mon)` on random digit batches of 32 (images, or flattened with `flat`) for the fault harness;
    also runs without a monitor (mon=None) for the plain-torch checks. Returns the losses."""
    inputs = IMAGES.flatten(1) if flat else IMAGES

    def train(mon) -> list[float]:
        g = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(steps):
            idx = torch.randint(0, len(inputs), (32,), generator=g)
            loss = loss_fn(model(inputs[idx]), LABELS[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if mon is not None:
                mon.log(loss=loss, targets=LABELS[idx]) if log_targets else mon.log(loss=loss)
        return losses

    return train


def train_cnn(model: nn.Module, opt: torch.optim.Optimizer, steps: int):
    return train_on_digits(model, opt, steps)


def train_mlp(model: nn.Module, opt: torch.optim.Optimizer, steps: int):
    return train_on_digits(model, opt, steps, flat=True)


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


# ---------------------------------------------------------------- softmax_before_loss (live)


def softmax_mlp(softmax: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    layers = [nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)] + ([nn.Softmax(dim=-1)] if softmax else [])
    model = nn.Sequential(*layers)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def train_softmax(model: nn.Module, opt: torch.optim.Optimizer, steps: int, *, loss_fn, log_targets: bool):
    return train_on_digits(model, opt, steps, flat=True, loss_fn=loss_fn, log_targets=log_targets)


def nll_of_log(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.nll_loss(torch.log(probs), y)


def test_a_softmax_before_cross_entropy_hurts_in_plain_torch() -> None:
    bad = train_softmax(*softmax_mlp(True), 300, loss_fn=F.cross_entropy, log_targets=False)(None)
    good = train_softmax(*softmax_mlp(True), 300, loss_fn=nll_of_log, log_targets=False)(None)
    floor = math.log(1 + 9 / math.e)  # the lowest a cross-entropy of probabilities can go (C = 10)
    assert min(bad) > floor and sum(good[-20:]) / 20 < 0.5 * floor


@pytest.mark.parametrize("log_targets", [True, False])
def test_a_softmax_before_cross_entropy_is_named_live(train_and_diagnose, log_targets: bool) -> None:
    """A Softmax as the model's last layer, trained with CrossEntropyLoss (which applies log_softmax again):
    https://github.com/ariecattan/SciCo/issues/2 ("stuck around 1.0 ... bounds the minimum possible loss"),
    https://github.com/NaJaeMin92/pytorch-DANN/issues/7. With the targets logged the client matches the logged
    loss against cross_entropy of the output rows; without them, the gradient the loss sends back to the
    output tells it (softmax(outputs) minus it is one-hot): found in the first steps either way."""
    model, opt = softmax_mlp(True)
    train = train_softmax(model, opt, 300, loss_fn=F.cross_entropy, log_targets=log_targets)
    alerts = train_and_diagnose(train, model, opt, every=None)
    found = by_rule(alerts, "softmax_before_loss")
    assert len(found) == 1 and found[0]["layer"] == "3", describe(alerts)
    assert found[0]["step"] <= 5, describe(found)
    assert "Remove the final softmax" in found[0]["remedy"]
    assert not by_rule(alerts, "loss_plateau"), describe(alerts)  # "raise the LR" is not the fix


def test_label_smoothing_does_not_hide_the_double_softmax(train_and_diagnose) -> None:
    """The implied targets of a label-smoothed cross-entropy are smoothed one-hot rows: still found."""
    model, opt = softmax_mlp(True)

    def smoothed(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(probs, y, label_smoothing=0.1)

    alerts = train_and_diagnose(train_softmax(model, opt, 40, loss_fn=smoothed, log_targets=False), model, opt)
    found = by_rule(alerts, "softmax_before_loss")
    assert len(found) == 1 and found[0]["step"] <= 5, describe(alerts)


def brier(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The Brier score: MSE between the probabilities and one-hot targets (its gradient's rows sum to 0 too)."""
    return F.mse_loss(probs, F.one_hot(y, probs.shape[-1]).float())


@pytest.mark.parametrize("log_targets", [True, False])
@pytest.mark.parametrize("loss_fn", [nll_of_log, brier], ids=["nll_of_log", "brier"])
def test_a_softmax_with_a_loss_of_probabilities_is_right(train_and_diagnose, loss_fn, log_targets: bool) -> None:
    model, opt = softmax_mlp(True)
    train = train_softmax(model, opt, 200, loss_fn=loss_fn, log_targets=log_targets)
    alerts = train_and_diagnose(train, model, opt, every=None)
    assert not by_rule(alerts, "softmax_before_loss"), describe(alerts)
    if loss_fn is nll_of_log:
        assert not alarms(alerts), describe(alerts)


# ---------------------------------------------------------------- shape_mismatch


def regression_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = x @ torch.randn(8, generator=g) + 0.1 * torch.randn(512, generator=g)  # shape (512,)
    return x, y


def train_regression(squeeze: bool, steps: int = 150):
    x, y = regression_data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def train(mon) -> list[float]:
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(steps):
            idx = torch.randint(0, len(x), (64,), generator=g)
            out = model(x[idx])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PyTorch's own warning of the bug, easy to miss in a log
                loss = F.mse_loss(out.squeeze(-1) if squeeze else out, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if mon is not None:
                mon.log(loss=loss, targets=y[idx])
        return losses

    return model, opt, train


def test_an_unsqueezed_regression_output_hurts_in_plain_torch() -> None:
    bad = train_regression(False)[2](None)
    good = train_regression(True)[2](None)
    assert sum(good[-20:]) < 0.2 * sum(bad[-20:]), (good[-20:], bad[-20:])


def test_an_n_by_1_output_against_n_targets_is_a_shape_mismatch(train_and_diagnose) -> None:
    """(N, 1) predictions against (N,) targets: MSE broadcasts to (N, N) and the model learns the mean
    (https://github.com/timeseriesAI/tsai/issues/22, https://github.com/deepset-ai/FARM/issues/229)."""
    model, opt, train = train_regression(False)
    alerts = train_and_diagnose(train, model, opt, every=None)
    found = by_rule(alerts, "shape_mismatch")
    assert len(found) == 1 and found[0]["severity"] == "critical" and found[0]["step"] <= 3, describe(alerts)
    assert found[0]["layer"] == "2" and "(64, 1)" in found[0]["message"] and "(64,)" in found[0]["message"]


def test_a_squeezed_regression_output_is_fine(train_and_diagnose) -> None:
    model, opt, train = train_regression(True)
    alerts = train_and_diagnose(train, model, opt, every=None)
    assert not alarms(alerts), describe(alerts)


def test_a_stored_run_is_diagnosed_the_same_from_the_database(train_and_diagnose, diag_db) -> None:
    """The live checks read only what is stored (grad_norms, output_info, target_info): a replay of the
    stored rows (`layerwatch diagnose`) finds the same wiring faults."""
    model, opt, train = train_regression(False, steps=40)
    live = train_and_diagnose(train, model, opt, every=None, run="stored-shape-mismatch")
    out = diagnose_stored(train_and_diagnose.last_run_id, diag_db)
    assert by_rule(live, "shape_mismatch") and "critical shape_mismatch [2]" in out, out
    detached_model, detached_opt = detached(True)
    train_and_diagnose(train_mlp(detached_model, detached_opt, 40), detached_model, detached_opt, run="stored-detach")
    out = diagnose_stored(train_and_diagnose.last_run_id, diag_db)
    assert "warning  no_gradient [body.2]" in out, out
