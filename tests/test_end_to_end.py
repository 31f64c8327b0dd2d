"""A real seeded training against a real `layerwatch serve` process, read back over REST."""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import plotly
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from client_hook import monitor
from tests.serving import free_port, serve

STEPS = 120


def model_and_data(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Sequential(nn.Linear(32, 32), nn.Tanh()), nn.Linear(32, 4)
    )
    # Labels that follow from the inputs (which of the first 4 features is largest): random labels would be,
    # rightly, loss_at_chance, and this healthy run must raise no alert.
    x = torch.randn(256, 10)
    y = x[:, :4].argmax(1)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3), x, y


def train(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, mon, steps: int
) -> list[float]:
    losses = []
    for step in range(steps):
        idx = torch.arange(step * 16, step * 16 + 16) % len(x)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.log(loss=loss, targets=y[idx])
        losses.append(loss.item())
    return losses


def test_every_step_arrives_once_in_order_and_reads_back(tmp_path: Path) -> None:
    with serve(tmp_path / "lw.db") as url:
        model, opt, x, y = model_and_data()
        mon = monitor.attach(model, optimizer=opt, server=url, run="e2e", project="tests", every=1)
        losses = train(model, opt, x, y, mon, STEPS)
        mon.close()
        assert mon.status()["dropped"] == {}

        runs = httpx.get(f"{url}/api/runs").json()
        assert isinstance(runs, list)
        run = next(r for r in runs if r["id"] == mon.run_id)
        assert (run["name"], run["project"], run["status"], run["last_step"]) == ("e2e", "tests", "finished", STEPS - 1)

        series = httpx.get(f"{url}/api/runs/{mon.run_id}/scalars", params={"key": "loss"}).json()
        assert series["steps"] == list(range(STEPS))
        assert series["values"] == pytest.approx(losses, rel=1e-7)
        lr = httpx.get(f"{url}/api/runs/{mon.run_id}/scalars", params={"key": "lr"}).json()
        assert lr["values"] == [1e-3] * STEPS

        detail = httpx.get(f"{url}/api/runs/{mon.run_id}").json()
        names = [m["name"] for m in detail["model"]["modules"]]
        assert names == [
            name for name, _ in model.named_modules()
        ]  # this model's forward order is its registration order
        assert detail["optimizer"]["type"] == "Adam"

        stats = httpx.get(
            f"{url}/api/runs/{mon.run_id}/layer_stats", params={"layer": "3.0", "param": "weight", "kind": "grad"}
        ).json()
        assert stats["steps"] == list(range(STEPS))
        assert all(v > 0 for v in stats["norm"])
        weights = httpx.get(
            f"{url}/api/runs/{mon.run_id}/layer_stats", params={"layer": "0", "param": "weight", "kind": "weight"}
        ).json()
        assert all(0 < r < 0.1 for r in weights["update_ratio"])  # Adam at 1e-3: about 1e-3 relative change
        assert weights["norm"][-1] == pytest.approx(model[0].weight.norm().item(), rel=1e-5)

        heat = httpx.get(f"{url}/api/runs/{mon.run_id}/heatmap", params={"kind": "grad", "stat": "norm"}).json()
        assert heat["rows"][0] == "0.weight" and len(heat["steps"]) == STEPS
        acts = httpx.get(f"{url}/api/runs/{mon.run_id}/heatmap", params={"kind": "activation", "stat": "std"}).json()
        assert acts["layers"] == ["0", "1", "2", "3.0", "3.1", "4"]

        hist = httpx.get(
            f"{url}/api/runs/{mon.run_id}/histograms", params={"layer": "2", "param": "output", "kind": "activation"}
        ).json()
        assert len(hist["counts"]) == STEPS and sum(hist["counts"][0]) == 16 * 32
        assert hist["lo"][0] == 0.0  # ReLU output

        assert httpx.get(f"{url}/api/runs/{mon.run_id}/alerts").json() == []

        page = httpx.get(f"{url}/")
        assert page.status_code == 200 and '<script src="/static/plotly.min.js"' in page.text
        served = httpx.get(f"{url}/static/plotly.min.js").content
        assert served == (Path(plotly.__file__).parent / "package_data" / "plotly.min.js").read_bytes()


def test_server_started_after_training_began_gets_every_step(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    model, opt, x, y = model_and_data(1)
    mon = monitor.attach(model, optimizer=opt, server=url, run="late-server", every=5, close_timeout=30)
    train(model, opt, x, y, mon, 20)  # nobody listening yet: nothing may block or raise
    with serve(tmp_path / "late.db", port) as url:
        train(model, opt, x, y, mon, 20)
        mon.close()
        series = httpx.get(f"{url}/api/runs/{mon.run_id}/scalars", params={"key": "loss"}).json()
        assert series["steps"] == list(range(40))
        stats = httpx.get(
            f"{url}/api/runs/{mon.run_id}/layer_stats", params={"layer": "4", "param": "bias", "kind": "grad"}
        ).json()
        assert stats["steps"] == list(range(0, 40, 5))


def test_nan_loss_is_stored_as_data(tmp_path: Path) -> None:
    with serve(tmp_path / "nan.db") as url:
        model, opt, x, y = model_and_data(2)
        mon = monitor.attach(model, optimizer=opt, server=url, run="nan", every=1)
        train(model, opt, x, y, mon, 2)
        mon.log(loss=float("nan"))
        mon.close()
        series = httpx.get(f"{url}/api/runs/{mon.run_id}/scalars", params={"key": "loss"}).json()
        # Logged after the last optimizer step, the NaN replaces step 1's loss; JSON carries it as null.
        assert series["steps"] == [0, 1] and series["values"][1] is None
        assert isinstance(series["values"][0], float) and math.isfinite(series["values"][0])
