"""The same seeded training gives the same alerts whatever the sampling interval.

The adaptive interval depends on the machine's speed (a small model is sampled
every 10 steps on one box and every 200 on another), so a verdict that
depends on it changes from run to run. Each training here runs twice, sampled
every 2 and every 60 steps, and the two alert sets (rule, layer, severity)
must be equal: the per-layer rules judge the every-step signals (per-tensor
gradient norms, update ratios on a fixed schedule of steps), and the densely
sampled first steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from tests.faults import test_wiring_rules as wiring
from tests.faults.conftest import describe
from tests.faults.healthy_models import healthy_mlp_adam
from tests.faults.test_gradient_rules import deep_sigmoid_mlp, loop, mlp

INTERVALS = (2, 60)


def sigmoid_mlp() -> tuple[nn.Module, torch.optim.Optimizer, Callable[[Any], None]]:
    """15 sigmoid layers with a small init: gradients vanish towards the input."""
    model = deep_sigmoid_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, loop(model, opt, 150)


def dead_cnn() -> tuple[nn.Module, torch.optim.Optimizer, Callable[[Any], None]]:
    model, opt = wiring.cnn_at(5.0)
    return model, opt, wiring.train_cnn(model, opt, 100)


def detached_body() -> tuple[nn.Module, torch.optim.Optimizer, Callable[[Any], None]]:
    model, opt = wiring.detached(True)
    return model, opt, wiring.train_mlp(model, opt, 100)


def group_at_100x_lr() -> tuple[nn.Module, torch.optim.Optimizer, Callable[[Any], None]]:
    """Adam with one param group at 100x the others' LR: update_ratio_high on that layer."""
    model = mlp()
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.1}]
    opt = torch.optim.Adam([*groups, {"params": model[4].parameters()}], lr=1e-3)
    return model, opt, loop(model, opt, 120)


def head_left_out() -> tuple[nn.Module, torch.optim.Optimizer, Callable[[Any], None]]:
    """The head missing from the optimizer: weights_not_updating on it."""
    model = mlp()
    opt = torch.optim.Adam([*model[0].parameters(), *model[2].parameters()], lr=1e-3)
    return model, opt, loop(model, opt, 120)


def healthy_mlp() -> tuple[nn.Module, torch.optim.Optimizer, Callable[[Any], None]]:
    training = healthy_mlp_adam(0, steps=200)
    return training.model, training.optimizer, training.train


CASES = {
    "sigmoid_mlp": sigmoid_mlp,
    "dead_cnn": dead_cnn,
    "detached_body": detached_body,
    "group_at_100x_lr": group_at_100x_lr,
    "head_left_out": head_left_out,
    "healthy": healthy_mlp,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_sampling_intervals_give_the_same_alerts(train_and_diagnose, case: str) -> None:
    found = {}
    for every in INTERVALS:
        model, opt, train = CASES[case]()
        alerts = train_and_diagnose(train, model, opt, every=every, run=f"interval-{case}-{every}")
        found[every] = alerts
    sets = {every: {(a["rule"], a["layer"], a["severity"]) for a in alerts} for every, alerts in found.items()}
    sparse, dense = (sets[every] for every in INTERVALS)
    assert sparse == dense, f"every={INTERVALS[0]}: {describe(found[INTERVALS[0]])}\n" + (
        f"every={INTERVALS[1]}: {describe(found[INTERVALS[1]])}"
    )
