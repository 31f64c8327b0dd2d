"""dead_units: a ReLU layer whose units output 0 for every sample of the batch, sample after sample.

Sources: CS231n ("as much as 40% of your network can be dead"); AutoTrainer
(ICSE'21: >= 70% of gradient entries exactly 0); DeepDiagnosis (ICSE'22:
>= 70% of ReLU outputs <= 0). A unit is dead when it outputs 0 for every
input, so no gradient reaches its weights and it never comes back.

Which modules: nn.ReLU and nn.ReLU6, the activations that output *exactly*
0 on a whole half-line. LeakyReLU, PReLU, ELU, SELU, GELU, SiLU and Softplus
have a non-zero slope or value for negative inputs: their units cannot die.
The model's last module is left out (a final ReLU of a count regression is
legitimately 0 for many samples).

Signals, on sampled steps:
- the ReLU's activation row: `zero_frac`, the fraction of output *elements*
  that are exactly 0. Per element, a healthy ReLU layer is ~50% zeros, so
  this alone is a weak proxy: with a fraction d of units dead and the others
  firing half the time it is d + (1 - d) / 2.
- per *unit*, what the rule needs: the gradient of the bias of the module that
  feeds the ReLU (the one just before it in forward order, e.g. the Linear or
  the BatchNorm). A unit's bias gradient is a sum over the batch (and over
  positions, for a convolution) of the upstream gradient times the ReLU's
  derivative, so it is exactly 0 when the unit output 0 for every sample: its
  `zero_frac` *is* the dead fraction of the batch.
When no such bias gradient is there (no bias, a functional layer in between),
the element proxy is used with a stricter threshold, ZERO_FRACTION_PROXY.
"""

from __future__ import annotations

from layerwatch.server.diagnosis.view import RunView, fmt, streak, sustained
from layerwatch.server.records import Finding

RULE_ID = "dead_units"

RELU_TYPES = frozenset({"ReLU", "ReLU6"})  # exactly 0 on a half-line; the others cannot die
DEAD_FRACTION = 0.5  # DIAGNOSTICS.md; CS231n's "40% dead" is already bad, AutoTrainer/DeepDiagnosis use 70%
# Element proxy: with half the units dead and the rest firing half the time, 75% of outputs
# are 0; 90% means ~80% dead units at a typical firing rate, which healthy layers do not reach.
ZERO_FRACTION_PROXY = 0.9
# Sustained: on every sample over SPAN_STEPS steps (at least two), whatever the interval: a streak of
# samples 2 steps apart at initialisation is a transient that samples 60 apart never see.
SPAN_STEPS = 30
# Slack between the two measurements of dead <= zero_frac (gradient accumulation: the
# activation row is the first micro-batch's, the gradient the sum over all of them).
CONSISTENCY = 0.05


def check(view: RunView, state: dict) -> list[Finding]:
    sample = view.sample
    if sample is None or not sample.stats:
        return []
    last = view.output_module()
    findings = []
    for (layer, _, kind), row in sample.stats.items():
        if kind != "activation" or layer == last or view.module_type(layer) not in RELU_TYPES:
            continue
        zeros = row.get("zero_frac")
        if zeros is None or zeros != zeros:
            continue
        feeder, dead = _dead_fraction(view, sample.stats, layer, row)
        bad = dead > DEAD_FRACTION if dead is not None else zeros > ZERO_FRACTION_PROXY
        count, since = streak(state, layer, bad, view.step)
        if not sustained(count, since, view.step, span_steps=SPAN_STEPS):
            continue
        share = dead if dead is not None else zeros
        if dead is not None:
            what = (
                f"{fmt(100 * dead)}% of the units of {layer!r} output 0 for every sample of the batch "
                f"(the bias gradient of {feeder!r} is exactly 0 for them); {fmt(100 * zeros)}% of all its outputs are 0"
            )
        else:
            what = f"{fmt(100 * zeros)}% of the outputs of {layer!r} are exactly 0"
        message = f"{what}, over {count} consecutive samples (since step {since})"
        severity = "critical" if share >= 1.0 else None  # the whole layer is dead: nothing passes
        evidence = {"dead_fraction": dead, "zero_frac": zeros, "feeder": feeder, "since_step": since}
        findings.append(view.finding(RULE_ID, message, layer=layer, evidence=evidence, severity=severity))
    return findings


def _dead_fraction(view: RunView, stats: dict, layer: str, row: dict) -> tuple[str | None, float | None]:
    """(feeding module, fraction of its bias gradient exactly 0), or (None, None) if not measurable."""
    position = view.order(layer)
    if position == 0 or position >= len(view.modules):
        return None, None
    feeder = view.modules[position - 1]["name"]
    grad = stats.get((feeder, "bias", "grad"))
    if grad is None:
        return None, None
    units, outputs = grad.get("numel"), row.get("numel")
    # The bias must have one entry per output channel of the ReLU's input.
    dead = grad.get("zero_frac")
    if not units or not outputs or outputs % units or dead is None or dead != dead:
        return None, None
    # A dead unit's outputs are all 0, so dead <= zero_frac. A bias gradient with more zeros
    # than that is zero for another reason: no gradient reaches this layer at all (a dead
    # layer further on, a detached branch); then it says nothing about these units.
    if dead > row.get("zero_frac", 0.0) + CONSISTENCY:
        return None, None
    return feeder, dead
