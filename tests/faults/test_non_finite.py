"""non_finite: raised at the first step with NaN/Inf, naming the module it came from."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from tests.faults.conftest import by_rule, describe
from tests.faults.test_gradient_rules import DIGITS_X, DIGITS_Y
from tests.training import optimize


class Exp(nn.Module):
    """A hand-written activation that overflows: exp() of a large input is inf."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x)


def test_overflow_in_a_layer_is_named(train_and_diagnose) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), Exp(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    onset = 30

    def train(mon) -> None:
        g = torch.Generator().manual_seed(1)
        for step in range(60):
            x = torch.randn(16, 8, generator=g) * (1.0 if step < onset else 200.0)
            loss = F.cross_entropy(model(x), torch.randint(0, 4, (16,), generator=g))
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.log(loss=loss)

    alerts = train_and_diagnose(train, model, opt)
    found = by_rule(alerts, "non_finite")
    assert len(found) == 1, describe(alerts)
    assert found[0]["severity"] == "critical"
    assert found[0]["step"] == onset and found[0]["layer"] == "3", describe(found)
    assert "'3'" in found[0]["message"] and "exp overflow" in found[0]["remedy"]


def test_nan_in_the_input_batch_is_named_input(train_and_diagnose) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def train(mon) -> None:
        for step in range(20):
            x = torch.randn(16, 8)
            if step == 12:
                x[3, 5] = float("nan")
            loss = F.cross_entropy(model(x), torch.randint(0, 4, (16,)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.log(loss=loss)

    found = by_rule(train_and_diagnose(train, model, opt), "non_finite")
    assert [(a["step"], a["layer"]) for a in found] == [(12, None)]
    assert "input batch" in found[0]["message"]


def test_the_alert_reaches_the_training_process_and_diagnose_finds_it_again(
    train_and_diagnose, diag_db, caplog
) -> None:
    import logging
    import subprocess
    import sys

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), Exp(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    received: list[dict] = []

    def train(mon) -> None:
        for step in range(40):
            x = torch.randn(16, 8) * (1.0 if step < 10 else 200.0)
            loss = F.cross_entropy(model(x), torch.randint(0, 4, (16,)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.log(loss=loss)

    with caplog.at_level(logging.WARNING, logger="layerwatch"):
        alerts = train_and_diagnose(train, model, opt, on_alert=received.append, run="nan-callback")
    # (The x200 inputs also, rightly, raise input_not_normalized: only non_finite is checked here.)
    nan_alerts = [(a["rule"], a["layer"], a["step"]) for a in received if a["rule"] == "non_finite"]
    assert nan_alerts == [("non_finite", "3", 10)], received
    logged = [r.getMessage() for r in caplog.records if "non_finite" in r.getMessage()]
    assert len(logged) == 1 and "'3'" in logged[0]  # logged once, in the user's terminal
    assert by_rule(alerts, "non_finite")[0]["step"] == 10

    run_id = train_and_diagnose.last_run_id
    out = subprocess.run(
        [sys.executable, "-m", "layerwatch", "diagnose", run_id, "--db", f"sqlite:///{diag_db}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "critical non_finite [3]  steps 10..10" in out, out
    missing = subprocess.run(
        [sys.executable, "-m", "layerwatch", "diagnose", "no-such-run", "--db", f"sqlite:///{diag_db}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 1 and "no-such-run" in missing.stderr


def half_mlp(eps: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).half()
    return model, torch.optim.Adam(model.parameters(), lr=1e-3, eps=eps)


def train_half(model: nn.Module, opt: torch.optim.Optimizer, steps: int):
    def train(mon) -> list[float]:
        g = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(steps):
            idx = torch.randint(0, len(DIGITS_Y), (32,), generator=g)
            optimize(opt, F.cross_entropy(model(DIGITS_X[idx].half()).float(), DIGITS_Y[idx]), losses, mon)
        return losses

    return train


def test_float16_adam_with_eps_1e_8_goes_nan_in_plain_torch() -> None:
    bad = train_half(*half_mlp(1e-8), 30)(None)
    good = train_half(*half_mlp(1e-4), 30)(None)
    assert not any(map(math.isfinite, bad[1:])) and all(map(math.isfinite, good)) and good[-1] < good[0]


def test_float16_adam_with_eps_1e_8_is_told_to_raise_eps(train_and_diagnose) -> None:
    """A model in float16 (`model.half()`) under Adam with its default eps 1e-8, which float16 cannot hold: the
    first step's update divides 0 by 0 wherever a gradient is 0 and the weights go NaN
    (https://github.com/pytorch/pytorch/issues/8860, https://github.com/afiaka87/glide-finetune/issues/5)."""
    model, opt = half_mlp(1e-8)
    alerts = train_and_diagnose(train_half(model, opt, 20), model, opt)
    found = by_rule(alerts, "non_finite")
    # Step 0 is sampled: its weights, read after the update, are already NaN.
    assert len(found) == 1 and found[0]["step"] == 0 and found[0]["layer"] == "0", describe(alerts)
    assert "in the weights of '0'" in found[0]["message"], describe(found)
    assert "optimizer step of step 0 turned '0.weight'" in found[0]["message"], describe(found)
    assert found[0]["remedy"].startswith("Raise the optimizer's eps to 1e-4"), found[0]["remedy"]
