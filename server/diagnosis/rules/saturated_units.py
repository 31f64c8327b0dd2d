"""saturated_units: a tanh/sigmoid layer whose outputs sit in the flat tails, sample after sample.

Source: DeepDiagnosis (ICSE'22: more than 50% of sigmoid/tanh pre-activations
beyond ±5). A saturated unit passes almost no gradient (tanh' < 0.02 at
|tanh| > 0.99), so the layers below it stop learning. Signal: `sat_frac` of
the activation rows of saturating modules (nn.Tanh, nn.Sigmoid, nn.Hardtanh,
nn.Softsign, nn.Hardsigmoid): the fraction of outputs with |tanh| > 0.99 or
sigmoid outside [0.01, 0.99]. Only modules are measured: the tanh/sigmoid
inside a GRU/LSTM cell or a functional `torch.tanh` is not visible.

Hidden layers only: the model's last module is left out, since a final
sigmoid (BCE) or tanh (bounded regression) is *meant* to reach 0/1 or ±1 on
examples the model is sure about.
"""

from __future__ import annotations

from layerwatch.server.diagnosis.view import RunView, fmt, streak, sustained
from layerwatch.server.records import Finding

RULE_ID = "saturated_units"

SATURATED_FRACTION = 0.5  # DeepDiagnosis (ICSE'22): > 50% of the units saturated
# Sustained: on every sample over SPAN_STEPS steps (at least two), whatever the interval: a streak of
# samples 2 steps apart at initialisation is a transient that samples 60 apart never see.
SPAN_STEPS = 30


def check(view: RunView, state: dict) -> list[Finding]:
    sample = view.sample
    if sample is None or not sample.stats:
        return []
    last = view.output_module()
    findings = []
    for (layer, _, kind), row in sample.stats.items():
        sat = row.get("sat_frac")
        if kind != "activation" or layer == last or sat is None or sat != sat:
            continue  # sat_frac is NaN (not stored) for modules that do not saturate
        count, since = streak(state, layer, sat > SATURATED_FRACTION, view.step)
        if not sustained(count, since, view.step, span_steps=SPAN_STEPS):
            continue
        message = (
            f"{fmt(100 * sat)}% of the outputs of {layer!r} ({view.module_type(layer)}) are saturated "
            f"(in the flat tails, where the gradient is under 5% of its peak), over {count} consecutive "
            f"samples (since step {since}); output std {fmt(row.get('std'))}"
        )
        evidence = {"sat_frac": sat, "std": row.get("std"), "since_step": since}
        findings.append(view.finding(RULE_ID, message, layer=layer, evidence=evidence))
    return findings
