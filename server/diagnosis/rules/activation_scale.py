"""activation_scale: a layer's outputs are far too small or far too large, sample after sample.

Sources: the DL4J visualisation guide (activations with a standard deviation
of about 0.5 to 2.0 are healthy); "37 reasons why your neural network is not
working" (initialisation and normalization). Signal: the `std` of each
module's activation row, on sampled steps.

DL4J's [0.5, 2.0] is too narrow for PyTorch defaults: a default-initialised
nn.Linear (kaiming_uniform, a=sqrt(5)) multiplies its input's std by about
1/sqrt(3) and a ReLU by about 0.58 again, so healthy MLPs measured 0.29-0.49
on every hidden layer, and every layer would be reported. The `info` band is
DL4J's widened five-fold each way, [0.1, 10]: a layer ten times off the
healthy range is worth knowing (a GPT-style embedding at std 0.02 still is, as
information). Outside [1e-3, 1e3]
is a `warning` when the scale also reaches the *next* module in forward
order: the signal is vanishing or blowing up on its way through the network.
A single tiny or huge module whose scale is absorbed right after it (a
zero-initialised residual branch or BatchNorm gamma, a projection followed by
a normalization layer) is only `info`.

Left out: the model's last module (logits and outputs have whatever scale the
task needs), modules whose range is fixed by construction (softmax,
sigmoid/tanh: their trouble is `saturated_units`), and ReLU layers that are
(nearly) all zeros (`dead_units` says that). Also left out, because they are
not where a scale goes off: modules that pass their input through
(`Dropout(p=0)`, or any dropout, which keeps the input's scale; `Identity`) —
the module before them is the one to name, and naming both was two findings
for one cause (GPT-2 from config: 13 infos a run, 5 of them its dropouts).
An `Embedding`'s scale is the architecture's choice (GPT-2 and BERT initialise
it at std 0.02 and normalise after it), so it gets no `info`; it still gets the
`warning` when its scale is extreme and reaches the next module.

One finding per cause: the `info`s of a run are one alert, named after the
first module found off-scale, whose message lists every module found so far
(a model whose projections all sit at std 0.05 has one cause, its init, not
twelve); each `warning` is its own alert (only the first module in forward
order where an extreme scale propagates gets one).
"""

from __future__ import annotations

from layerwatch.server.diagnosis.view import RunView, fmt, streak, sustained
from layerwatch.server.records import Finding

RULE_ID = "activation_scale"

# DL4J visualisation guide's healthy range [0.5, 2.0], widened 5x each way (see above): info outside.
STD_LOW, STD_HIGH = 0.1, 10.0
STD_TINY, STD_HUGE = 1e-3, 1e3  # DIAGNOSTICS.md: warning outside, when the scale propagates
# Sustained: on every sample over SPAN_STEPS steps (at least two), whatever the interval: a streak of
# samples 2 steps apart at initialisation is a transient that samples 60 apart never see.
SPAN_STEPS = 30
DEAD_ZEROS = 0.99  # zero_frac above which the layer is dead_units' business, not a scale
# Keep their input's scale: the module before them is measured and named instead.
PASS_THROUGH_TYPES = frozenset(
    {"Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout", "Identity"}
)
DESIGNED_SCALE_TYPES = frozenset({"Embedding", "EmbeddingBag"})  # warning only, no info (see above)
BOUNDED_TYPES = frozenset(
    {"Softmax", "Softmin", "LogSoftmax", "Softmax2d", "Sigmoid", "Tanh", "Hardtanh", "Hardsigmoid", "Softsign"}
)


def check(view: RunView, state: dict) -> list[Finding]:
    sample = view.sample
    if sample is None or not sample.stats:
        return []
    last = view.output_module()
    stds: dict[str, float] = {}  # every measured module (the "next module" may be any of them)
    zeros: dict[str, float] = {}
    for (layer, _, kind), row in sample.stats.items():
        std = row.get("std")
        if kind == "activation" and std is not None and std == std:
            if view.module_type(layer) in PASS_THROUGH_TYPES:
                continue
            stds[layer] = std
            zeros[layer] = row.get("zero_frac", 0.0)
    ordered = sorted(stds, key=view.order)
    findings: list[Finding] = []
    warned = False
    for i, layer in enumerate(ordered):
        std = stds[layer]
        measured = layer != last and view.module_type(layer) not in BOUNDED_TYPES and zeros[layer] <= DEAD_ZEROS
        count, since = streak(state, layer, measured and not STD_LOW <= std <= STD_HIGH, view.step)
        if not sustained(count, since, view.step, span_steps=SPAN_STEPS):
            continue
        following = ordered[i + 1] if i + 1 < len(ordered) else None
        nxt = stds.get(following) if following is not None else None
        extreme = std < STD_TINY or std > STD_HUGE
        propagates = nxt is not None and ((std < STD_TINY and nxt < STD_TINY) or (std > STD_HUGE and nxt > STD_HUGE))
        # Only the first module in forward order where the scale goes off gets the warning:
        # the ones after it inherit it, and one alert where it starts says more than ten.
        severity = "warning" if extreme and propagates and not warned else "info"
        if severity == "info" and view.module_type(layer) in DESIGNED_SCALE_TYPES:
            continue
        warned = warned or severity == "warning"
        told: dict = state.setdefault("told", {})  # layer -> its std when first said, in the order found
        if severity == "info":
            if layer not in told:
                told[layer] = std
                findings.append(_info(view, told))
            continue  # info is said once per layer, in one alert for all: worth knowing, not worth repeating
        message = (
            f"the output std of {layer!r} ({view.module_type(layer)}) is {fmt(std)}, outside "
            f"[{fmt(STD_LOW)}, {fmt(STD_HIGH)}], over {count} consecutive samples (since step {since})"
        )
        if severity == "warning":
            bound = "below " + fmt(STD_TINY) if std < STD_TINY else "above " + fmt(STD_HUGE)
            message += f"; it is {bound} and the next module {following!r} carries it on (std {fmt(nxt)})"
        evidence = {"std": std, "next_module": following, "next_std": nxt, "since_step": since}
        findings.append(view.finding(RULE_ID, message, layer=layer, evidence=evidence, severity=severity))
    return findings


def _info(view: RunView, told: dict) -> Finding:
    """The run's one `info` alert: named after the first module found off-scale, listing all of them."""
    first = next(iter(told))
    listed = ", ".join(
        f"{layer!r} ({view.module_type(layer)}, std {fmt(std)})" for layer, std in list(told.items())[:8]
    )
    more = f" and {len(told) - 8} more" if len(told) > 8 else ""
    message = (
        f"{len(told)} module output{'s' if len(told) > 1 else ''} off the scale [{fmt(STD_LOW)}, {fmt(STD_HIGH)}] "
        f"on every sample over {SPAN_STEPS}+ steps: {listed}{more}"
    )
    evidence = {"modules": {layer: std for layer, std in told.items()}}
    return view.finding(RULE_ID, message, layer=first, evidence=evidence, severity="info")
