"""non_finite: raised at the first step with NaN/Inf, naming the module it came from."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from tests.faults.conftest import by_rule, describe


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
