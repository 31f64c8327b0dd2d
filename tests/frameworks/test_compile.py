"""torch.compile with the monitor: no graph break and no recompile the same compiled model does not
have without it (counted with dynamo's own counters), attached before or after compiling; layer
names are the original model's (no `_orig_mod.`); steps, losses and gradients all arrive.

The "aot_eager" backend runs dynamo and AOTAutograd as `torch.compile` does (graph breaks and
recompiles are dynamo's) without building C++ kernels, so the test runs anywhere.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.nn import functional as F

from client_hook import monitor
from tests.frameworks.conftest import alarms, get

STEPS = 8


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))


def _train(compiled: nn.Module, opt: torch.optim.Optimizer, mon: monitor.Monitor | None) -> list[float]:
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(STEPS):
        x, y = torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
        loss = F.cross_entropy(compiled(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if mon is not None:
            mon.log(loss=loss, targets=y)
        losses.append(loss.item())
    return losses


def _dynamo_counts() -> dict[str, int]:
    return {
        "graph_breaks": sum(counters["graph_break"].values()),
        "unique_graphs": counters["stats"]["unique_graphs"],
        "frames": counters["frames"]["total"],
    }


def _run(how: str, url: str) -> tuple[dict[str, int], list[float], monitor.Monitor | None]:
    torch._dynamo.reset()
    counters.clear()
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    mon = None
    if how == "attach-then-compile":
        mon = monitor.attach(model, opt, server=url, run=how, every=1, close_timeout=60)
        compiled = torch.compile(model, backend="aot_eager")
    else:
        compiled = torch.compile(model, backend="aot_eager")
        if how == "compile-then-attach":
            mon = monitor.attach(compiled, opt, server=url, run=how, every=1, close_timeout=60)
    try:
        losses = _train(compiled, opt, mon)
    finally:
        if mon is not None:
            mon.close()
    counts = _dynamo_counts()
    torch._dynamo.reset()
    return counts, losses, mon


@pytest.mark.parametrize("how", ["attach-then-compile", "compile-then-attach"])
def test_no_graph_break_or_recompile_and_original_names(url: str, signals, how: str) -> None:
    plain, plain_losses, _ = _run("plain", url)
    assert plain["graph_breaks"] == 0 and plain["unique_graphs"] >= 1
    monitored, losses, mon = _run(how, url)
    assert monitored == plain  # not one graph break, graph or frame more than without the monitor
    assert losses == plain_losses  # the numerics are untouched
    assert mon is not None
    loss = get(url, mon.run_id, "scalars", key="loss")
    assert loss["steps"] == list(range(STEPS))
    names = [m["name"] for m in get(url, mon.run_id)["model"]["modules"]]
    assert names and not any("_orig_mod" in n for n in names)
    assert set(names) == {"", "0", "1", "2", "3", "4"}
    grads = get(url, mon.run_id, "layer_stats", layer="4", param="weight", kind="grad")
    assert grads["steps"] == list(range(STEPS))
    assert all(fields.get("grad_norm", 0) > 0 for fields in signals(mon.run_id).values())
    assert alarms(url, mon.run_id) == []
