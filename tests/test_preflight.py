"""monitor.preflight: each check fires on its fault and stays silent on healthy models; nothing of the user's changes.

Real small models, real optimizers, a real `layerwatch serve` for the stored
report; no mocks. Every model here trains on CPU in well under a second.
"""

from __future__ import annotations

import random
import re

import httpx
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from client_hook import monitor
from client_hook.catalog import RULES
from client_hook.preflight.report import Finding, PreflightReport
from tests.serving import serve

N, D, C = 32, 20, 10


def data(seed: int = 0, n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g), torch.randint(0, C, (n,), generator=g)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D, 64)
        self.fc2 = nn.Linear(64, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class Detached(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)).detach())  # fc1 never learns


class UnusedBranch(MLP):
    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Linear(64, C)  # built, never called


class Mixing(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        h = h.t().reshape(x.shape[0], -1)  # the (seq, batch) mix-up: rows now hold other samples' features
        return self.fc2(h)


def cnn_bn() -> nn.Module:
    # Conv bias before BatchNorm: its gradient is ~0 by construction; DIAGNOSTICS lists it as healthy.
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, C),
    )


def severe(report: PreflightReport) -> list[Finding]:
    return [f for f in report.findings if f.severity in ("warning", "critical")]


def rules(report: PreflightReport) -> set[str]:
    return {f.rule for f in report.findings}


# ------------------------------------------------------------------ healthy: silent


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_healthy_mlp_passes_every_check(seed: int) -> None:
    torch.manual_seed(seed)
    report = monitor.preflight(MLP(), batch=data(seed), loss_fn=F.cross_entropy)
    assert report.ok, str(report)
    assert severe(report) == []
    ran = {r.check for r in report.rows if r.result == "ok"}
    assert {
        "loss_at_init",
        "overfit_one_batch_failed",
        "no_gradient",
        "weights_not_updating",
        "batch_mixing",
        "softmax_before_loss",
        "non_finite",
        "input_not_normalized",
        "single_class_batch",
    } <= ran


def test_healthy_cnn_with_batchnorm_and_an_optimizer_instance_passes() -> None:
    torch.manual_seed(0)
    model = cnn_bn()
    x, y = torch.randn(16, 3, 8, 8), torch.arange(16) % C
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    report = monitor.preflight(model, batch=(x, y), loss_fn=nn.CrossEntropyLoss(), optimizer=opt)
    assert report.ok, str(report)
    mixing = next(r for r in report.rows if r.check == "batch_mixing")
    assert mixing.result == "ok" and "BatchNorm" in mixing.measured


def test_label_smoothing_floor_does_not_count_as_failing_to_overfit() -> None:
    torch.manual_seed(0)
    report = monitor.preflight(MLP(), batch=data(), loss_fn=nn.CrossEntropyLoss(label_smoothing=0.2))
    assert report.ok, str(report)


# ------------------------------------------------------------------ each fault: fires, placed


def test_detach_in_forward_is_no_gradient_on_that_module() -> None:
    torch.manual_seed(0)
    report = monitor.preflight(Detached(), batch=data(), loss_fn=F.cross_entropy)
    (found,) = report.by_rule("no_gradient")
    assert (found.layer, found.severity) == ("fc1", "critical")
    assert found.remedy == RULES["no_gradient"].remedy
    assert "weight" in found.message and "bias" in found.message
    assert not report.ok


def test_unused_branch_is_no_gradient_on_the_branch() -> None:
    torch.manual_seed(0)
    report = monitor.preflight(UnusedBranch(), batch=data(), loss_fn=F.cross_entropy)
    assert [f.layer for f in report.by_rule("no_gradient")] == ["aux"]
    assert "no gradient" in report.by_rule("no_gradient")[0].message
    assert rules(report) == {"no_gradient"}, str(report)


def test_reshape_across_the_batch_is_batch_mixing() -> None:
    torch.manual_seed(0)
    report = monitor.preflight(Mixing(), batch=data(), loss_fn=F.cross_entropy)
    (found,) = report.by_rule("batch_mixing")
    assert found.severity == "critical"
    assert found.layer == "fc2"  # the first module whose output already mixes samples
    assert found.evidence["cross_grad_norm"] > 0


def test_softmax_module_before_cross_entropy() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 64), nn.ReLU(), nn.Linear(64, C), nn.Softmax(dim=1))
    report = monitor.preflight(model, batch=data(), loss_fn=F.cross_entropy)
    (found,) = report.by_rule("softmax_before_loss")
    assert (found.layer, found.severity) == ("3", "warning")
    assert "probabilities" in found.message


def test_log_softmax_before_cross_entropy() -> None:
    class LogSoftmaxed(MLP):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.log_softmax(super().forward(x), dim=1)

    torch.manual_seed(0)
    report = monitor.preflight(LogSoftmaxed(), batch=data(), loss_fn=F.cross_entropy)
    assert report.by_rule("softmax_before_loss")[0].evidence["kind"] == "log-probabilities"
    # The same model with NLLLoss is right: log-probabilities are what it takes.
    report = monitor.preflight(LogSoftmaxed(), batch=data(), loss_fn=F.nll_loss)
    assert report.ok, str(report)


def test_parameter_missing_from_the_optimizer_instance_is_weights_not_updating() -> None:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.Adam(model.fc2.parameters(), lr=1e-2)  # fc1 forgotten
    report = monitor.preflight(model, batch=data(), loss_fn=F.cross_entropy, optimizer=opt)
    (found,) = report.by_rule("weights_not_updating")
    assert (found.layer, found.severity) == ("fc1", "warning")
    assert found.evidence["params"] == ["bias", "weight"] or set(found.evidence["params"]) == {"weight", "bias"}
    assert opt.state == {}  # the user's optimizer never stepped


def test_parameter_missing_from_the_optimizer_factory_is_weights_not_updating() -> None:
    torch.manual_seed(0)
    report = monitor.preflight(
        MLP(),
        batch=data(),
        loss_fn=F.cross_entropy,
        optimizer=lambda params: torch.optim.SGD(list(params)[2:], lr=0.5),  # drops fc1.weight, fc1.bias
    )
    assert [f.layer for f in report.by_rule("weights_not_updating")] == ["fc1"]


def test_unnormalized_inputs() -> None:
    torch.manual_seed(0)
    x, y = data()
    report = monitor.preflight(MLP(), batch=(x * 1000, y), loss_fn=F.cross_entropy)
    (found,) = report.by_rule("input_not_normalized")
    assert found.severity == "warning" and found.evidence["std"] > 10


def test_single_class_labels() -> None:
    torch.manual_seed(0)
    x, _ = data()
    report = monitor.preflight(MLP(), batch=(x, torch.full((N,), 3)), loss_fn=F.cross_entropy)
    (found,) = report.by_rule("single_class_batch")
    assert found.evidence["cls"] == 3 and "class 3" in found.message
    assert not report.ok


def test_class_imbalance_is_info_then_warning() -> None:
    torch.manual_seed(0)
    x, _ = data(n=204)
    report = monitor.preflight(MLP(), batch=(x, torch.arange(204) % C), loss_fn=F.cross_entropy, steps=5)
    assert [r.result for r in report.rows if r.check == "class_imbalance"] == ["ok"]
    y = torch.zeros(204, dtype=torch.long)
    y[:12] = 1  # 192/12 = 16: info
    report = monitor.preflight(MLP(), batch=(x, y), loss_fn=F.cross_entropy, steps=5)
    assert [f.severity for f in report.by_rule("class_imbalance")] == ["info"]
    y[:] = 0
    y[:2] = 1  # 202/2 = 101: warning
    report = monitor.preflight(MLP(), batch=(x, y), loss_fn=F.cross_entropy, steps=5)
    assert [f.severity for f in report.by_rule("class_imbalance")] == ["warning"]


def test_loss_at_init_far_from_ln_c() -> None:
    torch.manual_seed(0)
    model = MLP()
    with torch.no_grad():
        model.fc2.weight.mul_(50)  # confident random logits: loss far above ln 10
    report = monitor.preflight(model, batch=data(), loss_fn=F.cross_entropy)
    (found,) = report.by_rule("loss_at_init")
    assert found.evidence["loss"] > 1.5 * found.evidence["expected"]
    assert found.remedy == RULES["loss_at_init"].remedy


def test_nan_in_the_input_is_non_finite_at_input() -> None:
    torch.manual_seed(0)
    x, y = data()
    x[3, 4] = float("nan")
    report = monitor.preflight(MLP(), batch=(x, y), loss_fn=F.cross_entropy, steps=3)
    assert report.by_rule("non_finite")[0].layer == "input"
    assert not report.ok


def test_identical_inputs_with_different_labels_cannot_be_overfit() -> None:
    torch.manual_seed(0)
    _, y = data()
    x = torch.randn(1, D).expand(N, D).contiguous()  # one input, ten labels: the loss floor is the label entropy
    report = monitor.preflight(MLP(), batch=(x, y), loss_fn=F.cross_entropy, steps=30)
    (found,) = report.by_rule("overfit_one_batch_failed")
    assert found.severity == "warning" and found.evidence["fraction"] > 0.5
    assert {f.rule for f in severe(report)} == {"overfit_one_batch_failed"}, str(report)


def test_a_batch_the_model_cannot_take_names_the_shapes() -> None:
    with pytest.raises(ValueError, match=r"model raised RuntimeError on input of shape \(8, 3, 32, 32\): mat1"):
        monitor.preflight(MLP(), batch=(torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long)))
    x, _ = data()
    with pytest.raises(ValueError, match=r"loss_fn raised .* output of shape \(32, 10\) and targets of shape \(5,\)"):
        monitor.preflight(MLP(), batch=(x, torch.zeros(5, dtype=torch.long)))
    with pytest.raises(TypeError, match="batch must be a pair"):
        monitor.preflight(MLP(), batch=x)


# ------------------------------------------------------------------ do no harm


def test_the_users_model_optimizer_rng_and_data_are_untouched() -> None:
    torch.manual_seed(0)
    model = cnn_bn()
    model[0].bias.requires_grad_(False)
    model.eval()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x, y = torch.randn(16, 3, 8, 8), torch.arange(16) % C
    x.requires_grad_(True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    x0, y0 = x.detach().clone(), y.clone()
    random.seed(5)
    np.random.seed(5)
    rng = torch.get_rng_state(), random.getstate(), np.random.get_state()

    report = monitor.preflight(model, batch=(x, y), loss_fn=F.cross_entropy, optimizer=opt)

    assert report.rows
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters()) and x.grad is None
    assert model.training is False and all(not m.training for m in model.modules())
    assert torch.equal(x.detach(), x0) and torch.equal(y, y0) and x.requires_grad
    assert opt.state == {} and opt.param_groups[0]["lr"] == 1e-3
    assert torch.equal(torch.get_rng_state(), rng[0])
    assert random.getstate() == rng[1]
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), rng[2]))
    assert [f.rule for f in report.by_rule("frozen_parameters")] == ["frozen_parameters"]


# ------------------------------------------------------------------ the table


def test_report_prints_an_aligned_table() -> None:
    torch.manual_seed(0)
    report = monitor.preflight(Detached(), batch=data(), loss_fn=F.cross_entropy)
    lines = str(report).splitlines()
    assert re.fullmatch(r"check\s+\| result\s+\| layer\s+\| measured\s+\| remedy", lines[0])
    bars = {tuple(m.start() for m in re.finditer(r"\|", line))[:4] for line in lines[:1] + lines[2:-1]}
    assert len(bars) == 1  # every row's first four separators line up with the header's
    assert len(lines) == 3 + len(report.rows)
    assert any(line.startswith("no_gradient") and "'fc1'" in line and "critical" in line for line in lines)
    assert lines[-1].startswith("preflight NOT OK")


# ------------------------------------------------------------------ stored with the run


def _alerts(url: str, name: str) -> list[dict]:
    (run,) = httpx.get(f"{url}/api/runs", params={"name": name}).json()
    return httpx.get(f"{url}/api/runs/{run['id']}/alerts").json()


def test_findings_are_stored_with_the_run(tmp_path) -> None:
    torch.manual_seed(0)
    with serve(tmp_path / "db.sqlite") as url:
        # No monitor attached: a short-lived one on a copy creates the run and carries the findings.
        report = monitor.preflight(UnusedBranch(), batch=data(), loss_fn=F.cross_entropy, server=url, run="pf-new")
        alerts = _alerts(url, "pf-new")
        assert [(a["rule"], a["layer"], a["severity"]) for a in alerts] == [("no_gradient", "aux", "critical")]
        assert alerts[0]["remedy"] == report.findings[0].remedy
        assert alerts[0]["evidence"]["source"] == "preflight"

        # A monitor attached to the model: the findings go to its run, before any training step.
        model = Detached()
        mon = monitor.attach(model, server=url, run="pf-attached")
        monitor.preflight(model, batch=data(), loss_fn=F.cross_entropy)
        assert mon._collector.forward_order is None  # the monitor's hooks did not see the copies run
        x, y = data(1)
        mon.log(loss=F.cross_entropy(model(x), y))
        mon.close()
        alerts = _alerts(url, "pf-attached")
        assert {(a["rule"], a["layer"]) for a in alerts} >= {("no_gradient", "fc1")}
        assert all(a["evidence"]["source"] == "preflight" for a in alerts if a["rule"] == "no_gradient")
