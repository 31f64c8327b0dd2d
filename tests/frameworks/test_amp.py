"""AMP's GradScaler, for real: a skipped optimizer step is still a step, marked skipped, with its loss scale.

The skips are forced the way they happen: an inf lands in a gradient, the real
`torch.amp.GradScaler` finds it when unscaling, skips `optimizer.step()` and halves
its scale. Training runs on the CPU in float32 (the scaler works the same on any
device; the overflow is put there rather than provoked with float16 autocast, which
the CPU does not scale).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from client_hook import monitor
from tests.faults.healthy_models import _digits, _epochs
from tests.frameworks.conftest import alarms, get


def _amp_training(
    url: str, *, steps: int, overflow_at: set[int], run: str, pass_scaler: bool = True, init_scale: float = 2.0**16
):
    xt, yt, _, _ = _digits(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    mon = monitor.attach(
        model, opt, scaler=scaler if pass_scaler else None, server=url, run=run, every=1, close_timeout=60
    )
    losses, scales, taken = [], [], []
    for step, idx, _ in _epochs(len(xt), 32, steps, 0):
        loss = F.cross_entropy(model(xt[idx]), yt[idx])
        opt.zero_grad()
        scaler.scale(loss).backward()
        if step in overflow_at:
            model[2].weight.grad[0, 0] = float("inf")  # what a float16 overflow leaves in a gradient
        first = model[0].weight
        before = float(opt.state[first]["step"]) if first in opt.state else 0.0  # Adam's own step count
        scaler.step(opt)
        scaler.update()
        taken.append(float(opt.state[first]["step"]) > before if first in opt.state else False)
        mon.log(loss=loss, targets=yt[idx])
        losses.append(loss.item())
        scales.append(scaler.get_scale())
    mon.close()
    return mon, losses, scales, taken


def test_skipped_steps_keep_one_loss_per_iteration_and_are_marked(url: str, signals) -> None:
    overflow = {7, 30, 31}
    mon, losses, scales, taken = _amp_training(url, steps=80, overflow_at=overflow, run="amp-occasional")
    assert [i for i, t in enumerate(taken) if not t] == sorted(overflow)  # the scaler really skipped those
    assert mon.status()["skipped_steps"] == 3
    loss = get(url, mon.run_id, "scalars", key="loss")
    assert loss["steps"] == list(range(80))  # one loss per iteration: nothing collapsed, nothing late
    assert all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for a, b in zip(loss["values"], losses))
    stored = signals(mon.run_id)
    assert sorted(s for s, fields in stored.items() if fields.get("skipped")) == sorted(overflow)
    # A skipped step's overflowed gradients are not read: no non-finite gradient is reported.
    assert all(not fields.get("nonfinite_grads") for fields in stored.values())
    scale = get(url, mon.run_id, "scalars", key="loss_scale")
    assert scale["steps"] == list(range(80))
    assert scale["values"] == scales  # after each step's update: halved at every skip
    assert scale["values"][7] == scale["values"][6] / 2
    # A healthy AMP run with occasional skips raises no warning.
    assert alarms(url, mon.run_id) == []


def test_most_steps_skipped_is_a_finding(url: str) -> None:
    overflow = {s for s in range(80) if s % 4 != 0}  # three steps in four overflow
    mon, _, _, taken = _amp_training(url, steps=80, overflow_at=overflow, run="amp-collapsing")
    assert sum(not t for t in taken) == 60
    found = [a for a in get(url, mon.run_id, "alerts") if a["rule"] == "amp_overflow"]
    assert len(found) == 1 and found[0]["severity"] == "critical", found
    assert "were skipped by the GradScaler" in found[0]["message"]
    assert found[0]["evidence"]["skipped_steps"] > found[0]["evidence"]["window_steps"] / 2


def test_a_loss_scale_fallen_below_one_is_a_finding(url: str) -> None:
    """Few skips, but the scale is below 1: even unscaled gradients overflow float16."""
    mon, _, scales, _ = _amp_training(url, steps=40, overflow_at={10, 11, 12, 13}, run="amp-floor", init_scale=8.0)
    assert scales[13] == 0.5
    found = [a for a in get(url, mon.run_id, "alerts") if a["rule"] == "amp_overflow"]
    assert len(found) == 1 and found[0]["step"] == 13, found
    assert found[0]["evidence"]["loss_scale"] == 0.5 and found[0]["evidence"]["skipped_steps"] == 4


def test_without_the_scaler_a_skip_is_not_seen_and_nothing_breaks(url: str) -> None:
    """Not told of the scaler (a hand-written loop that does not pass it), the monitor counts optimizer
    steps: the skipped iteration's loss shares a step with the next one. The run still completes."""
    mon, _, _, _ = _amp_training(url, steps=20, overflow_at={5}, run="amp-untold", pass_scaler=False)
    loss = get(url, mon.run_id, "scalars", key="loss")
    assert loss["steps"] == list(range(19))
