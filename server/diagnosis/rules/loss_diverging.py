"""loss_diverging: the smoothed loss has doubled from its early value and is still rising.

Sources: the training-debugging guides ("loss growing -> sign flipped": the
optimizer maximises; "exploding -> LR too high"). Signal: the `loss` scalar.

Smoothing is a running median of the last SMOOTH losses (one outlier batch
moves it little); the early value is that median once the first EARLY losses
are in, kept in state. "Doubled" is measured on the loss's own scale, early +
(DIVERGE_FACTOR - 1) * |early|, so a loss that starts negative (a Gaussian
NLL, say) is judged by how far it rose, not by a ratio of negatives. A
healthy run with warm-up or noisy SGD dips below its start and stays there;
it does not end up twice as high and climbing.
"""

from __future__ import annotations

import math

from layerwatch.server.diagnosis.view import RunView, fmt, median
from layerwatch.server.records import Finding

RULE_ID = "loss_diverging"

DIVERGE_FACTOR = 2.0  # DIAGNOSTICS.md: smoothed loss > 2x its early smoothed value
WINDOW = 20  # losses: "still rising" = the smoothed loss is above its value WINDOW losses ago
SMOOTH = 10  # losses in the running median (batch noise of a few 10% is smoothed away)
EARLY = 10  # the first losses that define the early value


def check(view: RunView, state: dict) -> list[Finding]:
    loss = view.record.scalars.get("loss")
    if loss is None or not math.isfinite(loss):
        return []  # a NaN/Inf loss is non_finite's
    recent = state.setdefault("recent", [])
    recent.append(loss)
    del recent[:-SMOOTH]
    smoothed = median(recent)
    history = state.setdefault("smoothed", [])  # the last WINDOW + 1 smoothed values
    history.append(smoothed)
    del history[: -(WINDOW + 1)]
    state["count"] = count = state.get("count", 0) + 1
    if count == EARLY:
        state["early"], state["early_step"] = smoothed, view.step
    early = state.get("early")
    if early is None or len(history) <= WINDOW:
        return []
    limit = early + (DIVERGE_FACTOR - 1) * abs(early)
    before = history[0]
    if not (smoothed > limit and smoothed > before):
        return []
    message = (
        f"the loss (median of the last {SMOOTH}) is {fmt(smoothed)}, {fmt(_times(smoothed, early))} its early value "
        f"{fmt(early)} (step {state['early_step']}), and still rising: {fmt(before)} {WINDOW} losses ago"
    )
    evidence = {"smoothed": smoothed, "early": early, "early_step": state["early_step"], "before": before}
    return [view.finding(RULE_ID, message, evidence=evidence)]


def _times(value: float, early: float) -> float:
    """How many times the early value (on its own scale, for a negative start)."""
    return 1 + (value - early) / abs(early) if early else math.inf
