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

from server.diagnosis.view import RunView, fmt
from server.store import Finding

RULE_ID = "saturated_units"

SATURATED_FRACTION = 0.5  # DeepDiagnosis (ICSE'22): > 50% of the units saturated
# Sustained: SUSTAIN consecutive samples, or two that are SPAN_STEPS apart. Samples, not steps:
# with adaptive sampling a small model is sampled at steps 0 and 10, then every few hundred.
SUSTAIN = 3
SPAN_STEPS = 10


def check(view: RunView, state: dict) -> list[Finding]:
    sample = view.sample
    if sample is None or not sample.stats:
        return []
    last = _output_module(view)
    runs: dict[str, int] = state.setdefault("runs", {})
    since: dict[str, int] = state.setdefault("since", {})
    findings = []
    for (layer, _, kind), row in sample.stats.items():
        sat = row.get("sat_frac")
        if kind != "activation" or layer == last or sat is None or sat != sat:
            continue  # sat_frac is NaN (not stored) for modules that do not saturate
        if sat <= SATURATED_FRACTION:
            runs[layer] = 0
            continue
        if not runs.get(layer):
            since[layer] = view.step
        runs[layer] = runs.get(layer, 0) + 1
        if runs[layer] < SUSTAIN and (runs[layer] < 2 or view.step - since[layer] < SPAN_STEPS):
            continue
        message = (
            f"{fmt(100 * sat)}% of the outputs of {layer!r} ({view.module_type(layer)}) are saturated "
            f"(in the flat tails, where the gradient is under 5% of its peak), over {runs[layer]} consecutive "
            f"samples (since step {since[layer]}); output std {fmt(row.get('std'))}"
        )
        evidence = {"sat_frac": sat, "std": row.get("std"), "since_step": since[layer]}
        findings.append(view.finding(RULE_ID, message, layer=layer, evidence=evidence))
    return findings


def _output_module(view: RunView) -> str | None:
    """The last module (other than the root) the forward called: the output layer, not a hidden one."""
    called = [m["name"] for m in view.modules if m["name"] and m.get("called") is not False]
    return called[-1] if called else None
