"""Loss rules: each fault is flagged within a few dozen steps of onset; layer is None (the loss is the model's).

loss_diverging, loss_oscillating, loss_plateau, loss_at_init, overfitting. The
healthy suite (test_healthy.py) is where they must stay quiet.
"""

from __future__ import annotations

import math

import torch
from sklearn.datasets import load_digits, make_regression
from torch import nn
from torch.nn import functional as F

from tests.faults.conftest import by_rule, describe

_X, _Y = load_digits(return_X_y=True)
DIGITS_X = torch.tensor(_X / 16.0, dtype=torch.float32)
DIGITS_Y = torch.tensor(_Y)


def mlp(seed: int = 0, act: type[nn.Module] = nn.ReLU, hidden: int = 64) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), act(), nn.Linear(hidden, 10))


def digits_loop(model, opt, steps: int, *, seed: int = 0, at=None, loss_fn=F.cross_entropy):
    """A classification loop on digits; `at(step)` may change the optimizer before a step (the fault's onset)."""

    def train(mon) -> None:
        g = torch.Generator().manual_seed(seed)
        for step in range(steps):
            if at is not None:
                at(step)
            idx = torch.randint(0, len(DIGITS_X), (32,), generator=g)
            loss = loss_fn(model(DIGITS_X[idx]), DIGITS_Y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.log(loss=loss, targets=DIGITS_Y[idx])

    return train


def only(alerts, rule):
    found = by_rule(alerts, rule)
    assert len(found) == 1, describe(alerts)
    assert found[0]["layer"] is None, describe(found)
    return found[0]


# ---------------------------------------------------------------- loss_diverging


def test_optimizer_maximising_the_loss_diverges(train_and_diagnose) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    onset = 40  # the sign flips: SGD(maximize=True) climbs the loss it should descend

    def flip(step: int) -> None:
        if step == onset:
            opt.param_groups[0]["maximize"] = True

    alerts = train_and_diagnose(digits_loop(model, opt, 100, at=flip), model, opt)
    found = only(alerts, "loss_diverging")
    assert found["severity"] == "critical"
    assert onset < found["step"] <= onset + 40, describe(found)
    assert "early value" in found["message"] and "still rising" in found["message"]


def test_sgd_lr_too_high_on_regression_diverges(train_and_diagnose) -> None:
    x, y = make_regression(n_samples=512, n_features=10, noise=5.0, random_state=0)
    x = torch.tensor(x, dtype=torch.float32)  # standardized features: the MSE's curvature is ~2
    y = torch.tensor(y / y.std(), dtype=torch.float32)[:, None]
    torch.manual_seed(0)
    model = nn.Linear(10, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    onset = 40

    def train(mon) -> None:
        g = torch.Generator().manual_seed(0)
        for step in range(100):
            if step == onset:
                opt.param_groups[0]["lr"] = 1.3  # above the stability limit 2 / curvature ~ 1: each step overshoots
            idx = torch.randint(0, len(x), (32,), generator=g)
            loss = F.mse_loss(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.log(loss=loss)
            if not torch.isfinite(loss):
                break

    alerts = train_and_diagnose(train, model, opt)
    found = only(alerts, "loss_diverging")
    assert onset < found["step"] <= onset + 40, describe(found)


# ---------------------------------------------------------------- loss_oscillating


def test_lr_too_high_with_momentum_oscillates(train_and_diagnose) -> None:
    model = mlp(act=nn.Tanh)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)  # ~10x a sensible LR for this MLP
    alerts = train_and_diagnose(digits_loop(model, opt, 150), model, opt)
    found = only(alerts, "loss_oscillating")
    assert found["severity"] == "warning"
    assert found["step"] <= 80, describe(found)  # the first window of 60 losses, and a few more
    assert not by_rule(alerts, "loss_diverging"), describe(alerts)


# ---------------------------------------------------------------- loss_plateau


def test_lr_far_too_low_plateaus(train_and_diagnose) -> None:
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-6)
    alerts = train_and_diagnose(digits_loop(model, opt, 120), model, opt)
    found = only(alerts, "loss_plateau")
    assert found["step"] <= 70, describe(found)
    assert "initial" in found["message"] and "lr = 1e-06" in found["message"]


def test_a_model_dead_from_its_init_is_a_dead_network_not_a_plateau(train_and_diagnose) -> None:
    model = mlp()
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every ReLU dead from the start: only the output bias can learn
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    alerts = train_and_diagnose(digits_loop(model, opt, 120), model, opt)
    found = by_rule(alerts, "dead_network")
    assert len(found) == 1 and found[0]["step"] <= 40, describe(alerts)
    assert found[0]["layer"] == "0", describe(found)  # where the signal stops
    assert not by_rule(alerts, "loss_plateau"), describe(alerts)  # "raise the LR" would not revive it


def test_a_flat_loss_at_the_planned_end_of_a_decay_is_not_a_plateau(train_and_diagnose) -> None:
    """SGD 0.1 with a cosine decay to 1e-4 of it over 60 steps, then held there: the loss falls while
    the lr is real and is flat (still > 50% of its start) after; 'raise the LR' would be wrong advice
    at the end of a schedule (the cry-wolf seen on healthy language models)."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    decay = 60
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * min(s, decay) / decay))
    )
    loop = digits_loop(model, opt, 180, at=lambda step: schedule.step() if step else None)
    alerts = train_and_diagnose(loop, model, opt)
    assert not by_rule(alerts, "loss_plateau"), describe(alerts)


# ---------------------------------------------------------------- loss_at_init


def test_output_layer_scaled_up_at_init(train_and_diagnose) -> None:
    model = mlp()
    with torch.no_grad():
        model[2].weight.mul_(50.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    alerts = train_and_diagnose(digits_loop(model, opt, 20), model, opt)
    found = only(alerts, "loss_at_init")
    assert found["step"] == 0 and "C = 10" in found["message"] and "'2'" in found["message"], describe(found)


def test_nll_loss_on_probabilities_at_init(train_and_diagnose) -> None:
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def nll_on_softmax(logits, y):
        return F.nll_loss(F.softmax(logits, dim=1), y)  # the bug: NLLLoss wants log-probabilities

    alerts = train_and_diagnose(digits_loop(model, opt, 20, loss_fn=nll_on_softmax), model, opt)
    found = only(alerts, "loss_at_init")
    assert found["step"] == 0 and "below 0" in found["message"], describe(found)


# ---------------------------------------------------------------- overfitting


def test_big_mlp_on_a_tiny_training_set_overfits(train_and_diagnose) -> None:
    perm = torch.randperm(len(DIGITS_X), generator=torch.Generator().manual_seed(0))
    tr, va = perm[:50], perm[500:1000]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    evals: list[tuple[int, float]] = []

    def train(mon) -> None:
        for step in range(200):
            idx = tr[torch.randperm(50)[:25]]
            loss = F.cross_entropy(model(DIGITS_X[idx]), DIGITS_Y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.log(loss=loss, targets=DIGITS_Y[idx])
            if step % 5 == 4:
                with torch.no_grad():
                    val = F.cross_entropy(model(DIGITS_X[va]), DIGITS_Y[va]).item()
                evals.append((step, val))
                mon.log(val_loss=val)

    alerts = train_and_diagnose(train, model, opt)
    found = only(alerts, "overfitting")
    best_step = min(evals, key=lambda e: e[1])[0]
    assert f"the best checkpoint was at step {best_step}" in found["message"], (describe(found), evals)
    assert best_step < found["step"] <= best_step + 60, (describe(found), evals)
