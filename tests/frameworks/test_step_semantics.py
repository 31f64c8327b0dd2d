"""Step k's gradients are the ones step k applied, and its learning rate the one it used: with a
closure optimizer (as Lightning calls every optimizer), LBFGS, and a scheduler that steps before
the loss is logged (as the HF Trainer does). Checked against values the training itself measured.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from client_hook import monitor
from tests.frameworks.conftest import get


def _data(n: int = 12) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)) for _ in range(n)]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def _global_norm(model: nn.Module) -> float:
    return math.sqrt(sum(float(p.grad.double().norm()) ** 2 for p in model.parameters() if p.grad is not None))


@pytest.mark.parametrize("opt_name", ["sgd", "lbfgs"])
def test_closure_optimizer_gradients_belong_to_the_step_that_applied_them(url: str, signals, opt_name: str) -> None:
    model = _model()
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3, history_size=5)
    mon = monitor.attach(model, opt, server=url, run=f"closure-{opt_name}", every=1, close_timeout=60)
    first_norms: list[float] = []
    for x, y in _data():
        calls = 0

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            nonlocal calls
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            if calls == 0:
                first_norms.append(_global_norm(model))  # the gradient at the weights the step starts from
            calls += 1
            return loss

        loss = opt.step(closure)
        mon.log(loss=loss)
    mon.close()
    stored = signals(mon.run_id)
    assert sorted(stored) == list(range(12))  # step 0 and the last step have their gradients too
    assert [stored[s]["grad_norm"] for s in range(12)] == pytest.approx(first_norms, rel=1e-5)
    # The sampled gradient rows are read at the same moment: their exact norms combine to the same value.
    grads = get(url, mon.run_id, "layer_stats", layer="2", param="weight", kind="grad")
    assert grads["steps"] == list(range(12))


@pytest.mark.parametrize("log_after_step", [True, False])
def test_learning_rate_is_the_one_the_step_used(url: str, log_after_step: bool) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=20)
    mon = monitor.attach(model, opt, server=url, run=f"lr-after-{log_after_step}", every=5, close_timeout=60)
    used: list[float] = []
    for x, y in _data(20):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if not log_after_step:
            mon.log(loss=loss)
        used.append(opt.param_groups[0]["lr"])  # what this step is about to apply
        opt.step()
        sched.step()  # the HF Trainer's order: optimizer, scheduler, then the loss is logged
        if log_after_step:
            mon.log(loss=loss)
    mon.close()
    lr = get(url, mon.run_id, "scalars", key="lr")
    assert lr["steps"] == list(range(20))
    assert lr["values"] == pytest.approx(used, rel=1e-9)
    assert len(set(used)) > 10  # the schedule really moved every step
