"""The training side without a server: hooks, steps, numerics, failure policy.

The server address is a closed loopback port, so every frame stays in the
sender's pending buffer, where these tests read what would have been sent.
"""

from __future__ import annotations

import json
import logging
import time

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from client_hook import monitor
from client_hook.sending.spool import read_segment
from client_hook.training import stats
from client_hook.wire import LAYER_STAT_COLUMNS
from tests.training import train_step

NOWHERE = "http://127.0.0.1:9"  # discard port: connection refused at once


class Net(nn.Module):
    """Nested modules, a shared activation module and an unused branch."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16))
        self.act = nn.Tanh()
        self.head = nn.Linear(16, 3)
        self.unused = nn.Linear(16, 16)  # never called: no gradient, must not break anything

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.encoder(x)))


def all_hook_counts(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    n = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    if optimizer is not None:
        n += len(optimizer._optimizer_step_pre_hooks) + len(optimizer._optimizer_step_post_hooks)
    return n


def frames(mon: monitor.Monitor, kind: str, wait: float = 2.0) -> list[dict]:
    """Frames of `kind` the sender holds (it cannot deliver them: no server), on disk after close() too."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and mon._sender._queue:
        time.sleep(0.02)
    time.sleep(0.1)
    held = list(mon._sender.pending.in_memory())
    for segment in sorted(mon._sender.spool_path.glob("*.jsonl")):
        held += read_segment(segment)[0]
    return [f for f in (json.loads(e.text) for e in sorted(held)) if f["kind"] == kind]


def train(
    model: nn.Module, opt: torch.optim.Optimizer, steps: int, mon: monitor.Monitor | None = None, seed: int = 0
) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
        train_step(model, opt, x, y, mon)


def make(seed: int = 0) -> tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Net()
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


@pytest.mark.parametrize("every", [1, None])
def test_weights_and_rng_bit_identical_with_and_without_monitor(every: int | None) -> None:
    plain, plain_opt = make()
    train(plain, plain_opt, 12)
    plain_rng = torch.get_rng_state()

    watched, watched_opt = make()
    mon = monitor.attach(watched, watched_opt, server=NOWHERE, every=every, close_timeout=0.1)
    train(watched, watched_opt, 12, mon)
    watched_rng = torch.get_rng_state()
    mon.close()

    for key, value in plain.state_dict().items():
        assert torch.equal(value, watched.state_dict()[key]), key
    assert torch.equal(plain_rng, watched_rng)
    assert all(p.requires_grad for p in watched.parameters())


def test_close_removes_every_hook_and_is_idempotent() -> None:
    model, opt = make()
    before = all_hook_counts(model, opt)
    mon = monitor.attach(model, opt, server=NOWHERE, every=1, close_timeout=0.1)
    assert all_hook_counts(model, opt) > before
    train(model, opt, 3, mon)
    mon.close()
    mon.close()
    assert all_hook_counts(model, opt) == before == 0
    assert mon.status()["hooks"] == 0


def test_attach_twice_does_not_double_hooks() -> None:
    model, opt = make()
    first = monitor.attach(model, opt, server=NOWHERE, every=1, close_timeout=0.1)
    once = all_hook_counts(model, opt)
    second = monitor.attach(model, opt, server=NOWHERE, every=1, close_timeout=0.1)
    assert all_hook_counts(model, opt) == once
    assert first._closed and not second._closed
    second.close()
    assert all_hook_counts(model, opt) == 0


def test_context_manager_closes_and_marks_crash() -> None:
    model, opt = make()
    with pytest.raises(RuntimeError):
        with monitor.attach(model, opt, server=NOWHERE, every=1, close_timeout=0.1) as mon:
            train(model, opt, 2, mon)
            raise RuntimeError("boom")
    assert all_hook_counts(model, opt) == 0
    assert frames(mon, "run_end")[0]["status"] == "crashed"


def test_frames_name_modules_as_named_modules_in_forward_order() -> None:
    model, opt = make()
    mon = monitor.attach(model, opt, server=NOWHERE, every=1, close_timeout=0.1)
    train(model, opt, 3, mon)
    start = frames(mon, "run_start")[0]
    names = [m["name"] for m in start["model"]["modules"]]
    assert names[:6] == ["", "encoder", "encoder.0", "encoder.1", "encoder.2", "act"]
    assert names[6] == "head" and names[7] == "unused"
    unused = next(m for m in start["model"]["modules"] if m["name"] == "unused")
    assert unused["called"] is False
    assert set(dict(model.named_modules())) == set(names)

    stat_frames = frames(mon, "layer_stats")
    assert [f["step"] for f in stat_frames] == [0, 1, 2]
    rows = {(r[0], r[1], r[2]) for r in stat_frames[0]["rows"]}
    assert ("encoder.0", "weight", "grad") in rows and ("head", "bias", "weight") in rows
    assert ("encoder.1", "output", "activation") in rows and ("act", "output", "activation") in rows
    # The unused branch: weights reported, no gradient rows, no activation.
    assert ("unused", "weight", "weight") in rows and ("unused", "weight", "grad") not in rows
    assert ("unused", "output", "activation") not in rows
    assert [f["step"] for f in frames(mon, "scalars")] == [0, 1, 2]
    mon.close()


def test_grad_stats_are_what_the_optimizer_saw() -> None:
    model, opt = make()
    mon = monitor.attach(model, opt, server=NOWHERE, every=1, close_timeout=0.1)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)  # the optimizer sees clipped grads
    expected = stats.summarize(model.head.weight.grad).tolist()
    before = model.head.weight.detach().clone()
    opt.step()
    mon.log(loss=loss)
    row = next(r for r in frames(mon, "layer_stats")[0]["rows"] if r[:3] == ["head", "weight", "grad"])
    assert row[3:12] == pytest.approx(expected[:9])
    weight_row = next(r for r in frames(mon, "layer_stats")[0]["rows"] if r[:3] == ["head", "weight", "weight"])
    ratio = ((model.head.weight - before).norm() / before.norm()).item()
    assert weight_row[LAYER_STAT_COLUMNS.index("update_ratio")] == pytest.approx(ratio, rel=1e-5)
    mon.close()


def test_every_n_samples_every_nth_step_and_scalars_every_step() -> None:
    model, opt = make()
    mon = monitor.attach(model, opt, server=NOWHERE, every=4, close_timeout=0.1)
    train(model, opt, 10, mon)
    assert [f["step"] for f in frames(mon, "layer_stats")] == [0, 4, 8]
    assert [f["step"] for f in frames(mon, "scalars")] == list(range(10))
    assert all("lr" in f["values"] for f in frames(mon, "scalars"))
    mon.close()


def test_no_grad_evaluation_between_steps_adds_no_steps_or_stats() -> None:
    model, opt = make()
    mon = monitor.attach(model, opt, server=NOWHERE, every=2, close_timeout=0.1)
    train(model, opt, 1, mon)  # step 0 done; step 1 is not sampled, step 2 is
    train(model, opt, 1, mon)
    with torch.no_grad():  # evaluation while the step-2 hooks are armed
        model.eval()
        model(torch.full((4, 6), 1000.0))
        model.train()
    train(model, opt, 1, mon)
    mon.log(val_loss=0.5)
    assert mon.step == 3
    act = {r[0]: r for r in frames(mon, "layer_stats")[1]["rows"] if r[2] == "activation"}
    assert act["encoder.0"][3 + 7] < 1000  # max of the training forward, not the eval one
    scalars = frames(mon, "scalars")
    assert scalars[-1]["step"] == 2 and scalars[-1]["values"] == {"val_loss": 0.5}
    mon.close()


def test_without_optimizer_log_counts_steps() -> None:
    model, opt = make()
    mon = monitor.attach(model, server=NOWHERE, every=2, close_timeout=0.1)
    train(model, opt, 5, mon)
    assert mon.step == 5
    assert [f["step"] for f in frames(mon, "scalars")] == [0, 1, 2, 3, 4]
    assert [f["step"] for f in frames(mon, "layer_stats")] == [0, 2, 4]
    mon.close()


def test_loss_logged_before_the_optimizer_step_gets_the_same_steps() -> None:
    model, opt = make()
    mon = monitor.attach(model, opt, server=NOWHERE, every=1, close_timeout=0.1)
    for _ in range(3):
        loss = F.cross_entropy(model(torch.randn(4, 6)), torch.randint(0, 3, (4,)))
        opt.zero_grad()
        loss.backward()
        mon.log(loss=loss.item())  # a float loss, logged before opt.step()
        opt.step()
    assert [f["step"] for f in frames(mon, "scalars")] == [0, 1, 2]
    mon.close()


def test_bad_values_never_raise_into_training(caplog: pytest.LogCaptureFixture) -> None:
    model, opt = make()
    mon = monitor.attach(model, opt, server=NOWHERE, every=1, close_timeout=0.1)
    with caplog.at_level(logging.WARNING, logger="layerwatch"):
        mon.log(loss="not a number", accuracy=torch.ones(3), note=object())
        mon.log(loss=float("nan"))
    assert "loss must be a number" in caplog.text and "shape (3,)" in caplog.text
    values = [f["values"] for f in frames(mon, "scalars")]
    assert any(v.get("loss") != v.get("loss") for v in values)  # the NaN loss is data, kept
    mon.close()
    mon.log(loss=1.0)  # after close: ignored, no exception


def test_bad_arguments_to_attach_name_the_value() -> None:
    model, opt = make()
    with pytest.raises(ValueError, match="every must be a positive integer or None, but got 0"):
        monitor.attach(model, opt, every=0)
    with pytest.raises(TypeError, match="must be a torch.nn.Module, but got str"):
        monitor.attach("model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="server must be an http"):
        monitor.attach(model, opt, server="ftp://x")
    assert all_hook_counts(model, opt) == 0


def test_a_failing_hook_goes_quiet_and_training_continues(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model, opt = make()
    mon = monitor.attach(model, opt, server=NOWHERE, every=1, close_timeout=0.1)

    def broken(x: torch.Tensor, bins: int = 32) -> torch.Tensor:
        raise RuntimeError("statistics exploded")

    monkeypatch.setattr(stats, "summarize", broken)
    monkeypatch.setattr(stats, "summarize_many", broken)
    monkeypatch.setattr(stats, "subset", broken)  # what the activation and optimizer hooks call first
    with caplog.at_level(logging.ERROR, logger="layerwatch"):
        train(model, opt, 4, mon)
    assert mon.step == 4
    failures = [r for r in caplog.records if "hook failed" in r.getMessage()]
    assert len(failures) == 2  # once per part (activation, optimizer), not once per step
    assert len(frames(mon, "scalars")) == 4
    mon.close()


def test_saturation_is_measured_for_saturating_activations_only() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.Sigmoid(), nn.Linear(32, 3), nn.ReLU())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = monitor.attach(model, opt, server=NOWHERE, every=1, close_timeout=0.1)
    x = torch.randn(64, 6) * 100  # drives the tanh into its tails
    loss = model(x).sum()
    loss.backward()
    opt.step()
    mon.log(loss=loss)
    with torch.no_grad():
        h = torch.tanh(model[0](x))
        expected_tanh = (h.abs() > 0.99).float().mean().item()
        s = torch.sigmoid(model[2](h))
        expected_sigmoid = ((s < 0.01) | (s > 0.99)).float().mean().item()
    sat = LAYER_STAT_COLUMNS.index("sat_frac")
    rows = {r[0]: r for r in frames(mon, "layer_stats")[0]["rows"] if r[2] == "activation"}
    assert expected_tanh > 0.5
    assert rows["1"][sat] == pytest.approx(expected_tanh, abs=0.02)  # weights moved by one step
    assert rows["3"][sat] == pytest.approx(expected_sigmoid, abs=0.05)
    assert rows["5"][sat] is None and rows["0"][sat] is None  # ReLU, Linear: does not apply
    mon.close()


def test_attaching_to_a_data_parallel_wrapper_hooks_and_names_the_module_inside() -> None:
    model, opt = make()
    wrapped = nn.DataParallel(model)  # no GPU: it calls the module itself, as DDP's forward does
    mon = monitor.attach(wrapped, opt, server=NOWHERE, every=1, close_timeout=0.1)
    assert mon.model is model and monitor._attached.get(model) is mon
    train(wrapped, opt, 2, mon)
    (start,) = frames(mon, "run_start")
    assert [m["name"] for m in start["model"]["modules"]][:2] == ["", "encoder"]
    layers = {row[0] for f in frames(mon, "layer_stats") for row in f["rows"]}
    assert "encoder.0" in layers and not any(name.startswith("module") for name in layers)
    (signals, *_) = frames(mon, "signals")
    assert signals["input_fingerprint"] and "rank" not in signals  # the inner module's hooks saw the batch
    again = monitor.attach(model, opt, server=NOWHERE, every=1, close_timeout=0.1)  # the same model: replaces it
    assert mon._closed and monitor._attached.get(model) is again
    again.close()
    assert all_hook_counts(model, opt) == 0
