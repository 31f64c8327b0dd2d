"""Gradient and update rules: each fault is flagged within a few dozen steps of onset, at the right layer;
the healthy look-alikes (gradient accumulation, frozen layers, cosine decay to ~0) stay quiet.

exploding_gradients, vanishing_gradients, update_ratio_high, update_ratio_low,
weights_not_updating, frozen_parameters, gradients_not_zeroed.
"""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.datasets import load_digits, make_regression
from torch import nn
from torch.nn import functional as F

from layerwatch.server.diagnosis.rules import vanishing_gradients
from tests.faults.conftest import alarms, by_rule, describe, diagnose_stored

_X, _Y = load_digits(return_X_y=True)
DIGITS_X = torch.tensor(_X / 16.0, dtype=torch.float32)
DIGITS_Y = torch.tensor(_Y)


def batches(steps: int, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(DIGITS_X), (size,), generator=g)
        yield step, DIGITS_X[idx], DIGITS_Y[idx]


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def loop(model: nn.Module, opt: torch.optim.Optimizer, steps: int, *, zero_grad: bool = True, scheduler=None):
    def train(mon) -> None:
        for _, x, y in batches(steps):
            loss = F.cross_entropy(model(x), y)
            if zero_grad:
                opt.zero_grad()
            loss.backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()
            mon.log(loss=loss)

    return train


def only(alerts, rule):
    found = by_rule(alerts, rule)
    assert len(found) == 1, describe(alerts)
    return found[0]


# ---------------------------------------------------------------- exploding_gradients


@pytest.mark.parametrize("every", [None, 1])
def test_sgd_lr_too_high_on_unnormalized_regression_explodes_before_nan(train_and_diagnose, every) -> None:
    x, y = make_regression(n_samples=512, n_features=10, noise=5.0, random_state=0)
    x = torch.tensor(x * 3 + 2, dtype=torch.float32)  # unnormalized: mean 2, std 3
    y = torch.tensor(y, dtype=torch.float32)[:, None]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    onset = 30  # the LR jumps to 1.3x the stability limit 2/lambda_max (~0.021 here)

    def train(mon) -> None:
        g = torch.Generator().manual_seed(0)
        for step in range(90):
            if step == onset:
                opt.param_groups[0]["lr"] = 0.027
            idx = torch.randint(0, len(x), (32,), generator=g)
            loss = F.mse_loss(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.log(loss=loss)

    alerts = train_and_diagnose(train, model, opt, every=every)
    found = only(alerts, "exploding_gradients")
    assert found["severity"] == "critical"
    assert onset < found["step"] <= onset + 30, describe(found)
    assert not by_rule(alerts, "non_finite"), describe(alerts)  # flagged while still finite
    # Named from every step's per-tensor norms: the same layer at any sampling interval.
    assert found["layer"] == "0" and "'0'" in found["message"], describe(found)


# ---------------------------------------------------------------- vanishing_gradients


def deep_sigmoid_mlp() -> nn.Sequential:
    """15 sigmoid layers of 32 with weights at std 0.1 (Glorot & Bengio 2010's failing case): the gradient RMS
    falls ~10x per layer towards the input."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    width = 64
    for _ in range(15):
        linear = nn.Linear(width, 32)
        nn.init.normal_(linear.weight, std=0.1)
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.Sigmoid()]
        width = 32
    return nn.Sequential(*layers, nn.Linear(32, 10))


@pytest.mark.parametrize("every", [10, 1])
def test_deep_sigmoid_mlp_with_small_init_vanishes(train_and_diagnose, every) -> None:
    model = deep_sigmoid_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    alerts = train_and_diagnose(loop(model, opt, 80), model, opt, every=every)
    found = only(alerts, "vanishing_gradients")
    assert found["severity"] == "warning"
    # Judged on every step's per-tensor norms, whatever the sampling: vanished from the start.
    assert found["step"] < vanishing_gradients.SUSTAIN_STEPS + 5, describe(found)
    # Gradient RMS falls ~10x per layer from the output; the last one below 1e-5 of it is '18' or '20'.
    assert found["layer"] in ("16", "18", "20"), describe(found)
    assert not by_rule(alerts, "weights_not_updating"), describe(alerts)


# ---------------------------------------------------------------- update_ratio_high


@pytest.mark.parametrize("every", [1, 2])
def test_a_param_group_with_a_100x_lr_is_named(train_and_diagnose, every) -> None:
    model = mlp()
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.1}]
    opt = torch.optim.Adam([*groups, {"params": model[4].parameters()}], lr=1e-3)
    alerts = train_and_diagnose(loop(model, opt, 40), model, opt, every=every)
    found = only(alerts, "update_ratio_high")
    assert found["layer"] == "2" and found["severity"] == "warning", describe(found)
    assert found["step"] <= 3 * every, describe(found)
    assert "'2.weight'" in found["message"]


# ---------------------------------------------------------------- update_ratio_low


def test_lr_1e_9_is_too_low(train_and_diagnose) -> None:
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-9)
    alerts = train_and_diagnose(loop(model, opt, 60), model, opt, every=5)
    found = only(alerts, "update_ratio_low")
    assert found["step"] <= 15 and found["layer"] is None, describe(found)
    assert "lr = 1e-09" in found["message"]
    assert not by_rule(alerts, "weights_not_updating"), describe(alerts)  # rounding of tiny updates


def test_cosine_decay_to_zero_is_quiet(train_and_diagnose) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    steps = 120
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=0.0)
    alerts = train_and_diagnose(loop(model, opt, steps, scheduler=sched), model, opt, every=1)
    assert not alarms(alerts), describe(alerts)


# ---------------------------------------------------------------- weights_not_updating


@pytest.mark.parametrize("every", [10, 1])
def test_a_layer_left_out_of_the_optimizer_is_named(train_and_diagnose, every) -> None:
    model = mlp()
    opt = torch.optim.Adam([*model[0].parameters(), *model[2].parameters()], lr=1e-3)  # forgot the head
    alerts = train_and_diagnose(loop(model, opt, 60), model, opt, every=every)
    found = only(alerts, "weights_not_updating")
    assert found["layer"] == "4" and found["step"] <= 2 * every, describe(found)
    assert "not in any optimizer param group" in found["message"]
    assert not by_rule(alerts, "gradients_not_zeroed"), describe(alerts)  # its grads pile up, the loop is fine


def test_diagnose_finds_the_left_out_head_again_from_the_stored_run(train_and_diagnose, diag_db) -> None:
    """The per-step update ratios go through the store: a replay of the stored run (`layerwatch diagnose`)
    finds what the live diagnosis found, at the same step."""
    model = mlp()
    opt = torch.optim.Adam([*model[0].parameters(), *model[2].parameters()], lr=1e-3)
    alerts = train_and_diagnose(loop(model, opt, 40), model, opt, every=1000, run="head-left-out-replay")
    live = only(alerts, "weights_not_updating")
    out = diagnose_stored(train_and_diagnose.last_run_id, diag_db)
    assert f"weights_not_updating [4]  steps {live['step']}.." in out, out


def test_a_param_group_with_lr_0_is_named(train_and_diagnose) -> None:
    model = mlp()
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.0}]
    opt = torch.optim.SGD([*groups, {"params": model[4].parameters()}], lr=0.05, momentum=0.9)
    alerts = train_and_diagnose(loop(model, opt, 40), model, opt, every=2)
    found = only(alerts, "weights_not_updating")
    assert found["layer"] == "2" and found["step"] <= 6, describe(found)
    assert "lr=0" in found["message"]


# ---------------------------------------------------------------- frozen_parameters


def test_frozen_layers_are_listed_once_as_info(train_and_diagnose) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU()),  # a frozen "backbone"
        nn.Linear(64, 10),
    )
    for p in model[0].parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(model[1].parameters(), lr=0.05, momentum=0.9)
    alerts = train_and_diagnose(loop(model, opt, 40), model, opt, every=1)
    found = only(alerts, "frozen_parameters")
    assert found["severity"] == "info" and found["layer"] == "0" and found["step"] == 0, describe(found)
    assert "'0.0'" in found["message"] and "'0.2'" in found["message"]
    assert not alarms(alerts), describe(alerts)


# ---------------------------------------------------------------- gradients_not_zeroed


def test_a_loop_without_zero_grad_is_critical(train_and_diagnose) -> None:
    """optimizer.zero_grad() missing from the loop: https://github.com/opendp/smartnoise-sdk/issues/280 (a
    student model's loss with no zero_grad, "It's actually a bug")."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    alerts = train_and_diagnose(loop(model, opt, 30, zero_grad=False), model, opt)
    found = only(alerts, "gradients_not_zeroed")
    # Step 0 starts clean; from step 1 each backward adds to the previous step's gradients.
    assert found["severity"] == "critical" and found["step"] == 3 and found["layer"] is None, describe(found)


@pytest.mark.parametrize("every", [None, 1])
def test_gradient_accumulation_on_purpose_is_quiet(train_and_diagnose, every) -> None:
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def train(mon) -> None:
        micro = batches(4 * 40, size=8)
        for _ in range(40):
            total = 0.0
            for _ in range(4):  # four micro-batches per optimizer step, zeroed after the step
                _, x, y = next(micro)
                loss = F.cross_entropy(model(x), y) / 4
                loss.backward()
                total += float(loss)
            opt.step()
            opt.zero_grad()
            mon.log(loss=total)

    alerts = train_and_diagnose(train, model, opt, every=every)
    assert not alarms(alerts), describe(alerts)


# ---------------------------------------------------------------- quick healthy checks


@pytest.mark.parametrize("seed", [0, 1])
def test_healthy_mlp_adam_and_bn_cnn_sgd_are_quiet(train_and_diagnose, seed) -> None:
    model = mlp(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    alerts = train_and_diagnose(loop(model, opt, 150), model, opt, every=1)
    assert not alarms(alerts), describe(alerts)

    torch.manual_seed(seed)
    cnn = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),  # conv bias before BatchNorm: gradient ~0 by construction
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    sgd = torch.optim.SGD(cnn.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def train(mon) -> None:
        for _, x, y in batches(120):
            loss = F.cross_entropy(cnn(x.view(-1, 1, 8, 8)), y)
            sgd.zero_grad()
            loss.backward()
            sgd.step()
            mon.log(loss=loss)

    alerts = train_and_diagnose(train, cnn, sgd, every=None)
    assert not alarms(alerts), describe(alerts)
    assert math.isfinite(1.0)
