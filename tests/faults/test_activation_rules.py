"""Activation rules: dead_units, saturated_units, activation_scale.

Real trainings on scikit-learn's digits; layer statistics are sampled, so the
faults are run with a fixed `every` and checked to be named at the right
module (as `model.named_modules()` names it) within a few samples.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from layerwatch.server.diagnosis.rules import activation_scale, dead_units, saturated_units
from tests.faults.conftest import alarms, by_rule, describe

ACTIVATION_RULES = ("dead_units", "saturated_units", "activation_scale")


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return torch.from_numpy(x), torch.from_numpy(y).long()


def fit(model: nn.Module, opt: torch.optim.Optimizer, steps: int, scale: float = 1.0, batch: int = 32):
    x, y = digits()

    def train(mon) -> None:
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            idx = torch.randint(0, len(x), (batch,), generator=g)
            loss = F.cross_entropy(model(x[idx] * scale), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.log(loss=loss, targets=y[idx])

    return train


def relu_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def tanh_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))


def ours(alerts) -> list:
    return [a for a in alerts if a["rule"] in ACTIVATION_RULES]


# ------------------------------------------------------------------ healthy


def test_healthy_mlps_raise_no_activation_alarm(train_and_diagnose) -> None:
    for make, every, steps in ((relu_mlp, 1, 50), (tanh_mlp, 2, 60), (relu_mlp, None, 100)):
        model = make()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        alerts = train_and_diagnose(fit(model, opt, steps), model, opt, every=every, run=f"act-healthy-{every}")
        assert alarms(ours(alerts)) == [], describe(ours(alerts))


def test_a_final_sigmoid_may_saturate(train_and_diagnose) -> None:
    x, y = digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1), nn.Sigmoid())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    target = (y == 0).float()  # an easy one-vs-rest task: the output is soon sure, 0 or 1

    def train(mon) -> None:
        for step in range(150):
            idx = torch.arange(step * 32, step * 32 + 32) % len(x)
            loss = F.binary_cross_entropy(model(x[idx]).squeeze(1), target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.log(loss=loss)

    alerts = train_and_diagnose(train, model, opt, every=5, run="act-final-sigmoid")
    assert by_rule(alerts, "saturated_units") == [], describe(alerts)


# ------------------------------------------------------------------ dead_units


def test_relu_units_killed_by_their_bias_are_named(train_and_diagnose) -> None:
    model = relu_mlp()
    with torch.no_grad():
        model[0].bias[:48] = -10.0  # 75% of the first hidden layer can never fire
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    alerts = train_and_diagnose(fit(model, opt, 40), model, opt, every=5, run="act-dead-bias")
    found = by_rule(alerts, "dead_units")
    assert [(a["layer"], a["severity"]) for a in found] == [("1", "warning")], describe(alerts)
    assert found[0]["step"] == dead_units.SPAN_STEPS, describe(found)  # every sample over SPAN_STEPS steps
    assert "75% of the units of '1'" in found[0]["message"] and "'0'" in found[0]["message"], found[0]["message"]


def test_a_layer_killed_entirely_is_critical(train_and_diagnose) -> None:
    model = relu_mlp()
    with torch.no_grad():
        model[2].bias.fill_(-10.0)  # the second hidden layer never fires
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    alerts = train_and_diagnose(fit(model, opt, 40), model, opt, every=5, run="act-dead-all")
    found = by_rule(alerts, "dead_units")
    assert [(a["layer"], a["severity"]) for a in found] == [("3", "critical")], describe(alerts)
    assert found[0]["step"] == dead_units.SPAN_STEPS
    assert by_rule(alerts, "activation_scale") == [] or all(
        a["layer"] != "3" for a in by_rule(alerts, "activation_scale")
    )


def test_a_huge_learning_rate_that_kills_units_is_flagged(train_and_diagnose) -> None:
    model = relu_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=3.0)
    onset = 0
    alerts = train_and_diagnose(fit(model, opt, 60), model, opt, every=2, run="act-dead-lr")
    found = by_rule(alerts, "dead_units")
    assert found and {a["layer"] for a in found} <= {"1", "3"}, describe(alerts)
    assert min(a["step"] for a in found) <= onset + 50, describe(found)


# ------------------------------------------------------------------ saturated_units


def test_tanh_saturated_by_unscaled_inputs_is_named(train_and_diagnose) -> None:
    model = tanh_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    alerts = train_and_diagnose(fit(model, opt, 40, scale=100.0), model, opt, every=5, run="act-saturated")
    found = by_rule(alerts, "saturated_units")
    assert [a["layer"] for a in found][:1] == ["1"] and found[0]["severity"] == "warning", describe(alerts)
    assert found[0]["step"] == saturated_units.SPAN_STEPS, describe(found)
    assert "of the outputs of '1' (Tanh) are saturated" in found[0]["message"]


# ------------------------------------------------------------------ activation_scale


def test_inputs_times_1e4_blow_up_the_first_layer(train_and_diagnose) -> None:
    model = relu_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-9)
    alerts = train_and_diagnose(fit(model, opt, 40, scale=1e4), model, opt, every=5, run="act-scale-huge")
    found = [a for a in by_rule(alerts, "activation_scale") if a["severity"] == "warning"]
    assert [a["layer"] for a in found] == ["0"], describe(alerts)
    assert found[0]["step"] == activation_scale.SPAN_STEPS and "above 1e+03" in found[0]["message"], describe(found)


def test_weights_scaled_by_1e_4_shrink_the_signal(train_and_diagnose) -> None:
    model = relu_mlp()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.mul_(1e-4)
            layer.bias.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    alerts = train_and_diagnose(fit(model, opt, 40), model, opt, every=5, run="act-scale-tiny")
    found = [a for a in by_rule(alerts, "activation_scale") if a["severity"] == "warning"]
    assert [a["layer"] for a in found] == ["0"], describe(alerts)
    assert found[0]["step"] == activation_scale.SPAN_STEPS and "below 0.001" in found[0]["message"], describe(found)


def test_gpt2s_own_init_and_its_dropout_layers_are_not_findings(train_and_diagnose) -> None:
    """HF GPT-2 from config: embeddings initialised at std 0.02 by design, and `Dropout(p=0)` layers that
    pass their input through. Neither is a finding: a dropout layer has its input's scale (the module
    before it is the one to name), and an embedding's scale is the architecture's choice."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def train(mon) -> None:
        g = torch.Generator().manual_seed(0)
        for _ in range(30):
            ids = torch.randint(0, 64, (8, 32), generator=g)
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.log(loss=loss)

    alerts = train_and_diagnose(train, model, opt, every=5, run="act-scale-gpt2")
    found = by_rule(alerts, "activation_scale")
    named = {a["layer"] for a in found}
    design = {n for n, m in model.named_modules() if isinstance(m, (nn.Dropout, nn.Embedding))}
    assert not named & design, describe(found)
    # One finding per cause: whatever else is off-scale (residual projections at init) is one info alert.
    assert len([a for a in found if a["severity"] == "info"]) <= 1, describe(found)
