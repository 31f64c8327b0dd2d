"""`attach` takes the optimizer wrappers frameworks hand out, hooks the torch optimizer inside, and
never raises on one it cannot hook: accelerate's AcceleratedOptimizer (the HF Trainer's), Lightning's
LightningOptimizer, ZeroRedundancyOptimizer, and an optimizer-like object with no torch optimizer.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from client_hook import monitor
from tests.frameworks.conftest import get
from tests.serving import free_port


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def _train(model: nn.Module, step_with, mon: monitor.Monitor, steps: int = 6) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
        loss = F.cross_entropy(model(x), y)
        step_with.zero_grad()
        loss.backward()
        step_with.step()
        mon.log(loss=loss)


def test_accelerated_optimizer_is_hooked_through(url: str) -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    try:
        model = _model()
        inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model, wrapped = Accelerator(cpu=True).prepare(model, inner)
        assert type(wrapped).__name__ == "AcceleratedOptimizer"
        assert isinstance(wrapped, torch.optim.Optimizer) and not hasattr(wrapped, "_optimizer_step_pre_hooks")
        mon = monitor.attach(model, wrapped, server=url, run="accelerated", every=1, close_timeout=60)
        assert mon.optimizer is inner
        _train(model, wrapped, mon)
        mon.close()
    finally:  # accelerate's process-wide state, for the tests after this one
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert mon.step == 6
    assert get(url, mon.run_id, "layer_stats", layer="2", param="weight", kind="grad")["steps"] == list(range(6))
    assert get(url, mon.run_id)["optimizer"]["type"] == "AdamW"


def test_lightning_optimizer_is_hooked_through(url: str) -> None:
    from pytorch_lightning.core.optimizer import LightningOptimizer

    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = monitor.attach(model, LightningOptimizer(inner), server=url, run="lightning-opt", every=1, close_timeout=60)
    assert mon.optimizer is inner
    _train(model, inner, mon)  # Lightning's strategy steps the inner optimizer
    mon.close()
    assert get(url, mon.run_id, "scalars", key="loss")["steps"] == list(range(6))


def test_zero_redundancy_optimizer_is_hooked(url: str) -> None:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        model = _model()
        zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.SGD, lr=0.1)
        mon = monitor.attach(model, zero, server=url, run="zero", every=1, close_timeout=60)
        assert mon.optimizer is zero
        _train(model, zero, mon)
        mon.close()
    finally:
        dist.destroy_process_group()
    assert mon.step == 6
    assert get(url, mon.run_id, "layer_stats", layer="0", param="weight", kind="grad")["steps"] == list(range(6))


class _HandRolledOptimizer:
    """An optimizer-like object holding no torch optimizer (as some research code has)."""

    def __init__(self, params) -> None:
        self.params = list(params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for p in self.params:
            p -= 0.1 * p.grad


def test_an_optimizer_it_cannot_hook_is_one_warning_and_the_run_goes_on(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    model = _model()
    opt = _HandRolledOptimizer(model.parameters())
    with caplog.at_level(logging.WARNING, logger="layerwatch"):
        mon = monitor.attach(model, opt, server=url, run="hand-rolled", every=1, close_timeout=60)
        _train(model, opt, mon)
        mon.close()
    warnings = [r.getMessage() for r in caplog.records if "cannot hook the optimizer" in r.getMessage()]
    assert len(warnings) == 1 and "_HandRolledOptimizer" in warnings[0]
    assert mon.optimizer is None
    assert get(url, mon.run_id, "scalars", key="loss")["steps"] == list(range(6))  # each log(loss=) a step


def test_a_wrong_scaler_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match="scaler must be a torch.amp.GradScaler or None, but got str"):
        monitor.attach(_model(), scaler="fp16")  # type: ignore[arg-type]
