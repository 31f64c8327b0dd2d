"""non_finite: the first step where a NaN/±Inf appears, and the first module it came from.

Source: "37 reasons why your neural network is not working" (NaN: find the
first layer where it appears). Signals: the per-step `output_nonfinite` and
`first_nonfinite` (the client replays the forward to name the module, on the
CPU), `input_nonfinite`, `nonfinite_grads`, the loss; and, on sampled steps,
the per-layer non-finite counts of activations, gradients and weights.
"""

from __future__ import annotations

import math

from layerwatch.server.diagnosis.view import RunView
from layerwatch.server.records import Finding

RULE_ID = "non_finite"


def check(view: RunView, state: dict) -> list[Finding]:
    if state.get("fired"):
        return []  # the first step is what matters; later steps only repeat it
    rec = view.record
    sig = rec.signals
    loss = rec.scalars.get("loss")
    loss_bad = loss is not None and not math.isfinite(loss)
    where, what = _locate(view, sig, loss_bad)
    if where is None and what is None:
        return []
    state["fired"] = True
    layer = None if where in (None, "input", "") else where
    place = "in the input batch" if where == "input" else f"in the output of {where!r}" if layer else ""
    message = f"{what} first appeared at step {view.step}" + (f" {place}" if place else "")
    if loss is not None:
        message += f"; loss = {loss}"
    evidence = {"step": view.step, "where": where, "signal": what, "loss": loss}
    if sig.get("nonfinite_grads"):
        evidence["nonfinite_grads"] = sig["nonfinite_grads"][:20]
    return [view.finding(RULE_ID, message, layer=layer, evidence=evidence)]


def _locate(view: RunView, sig: dict, loss_bad: bool) -> tuple[str | None, str | None]:
    """(where, what): the module (or "input") and the kind of signal that went non-finite."""
    if sig.get("input_nonfinite"):
        return "input", "NaN/Inf"
    if sig.get("first_nonfinite"):
        return sig["first_nonfinite"], "NaN/Inf"
    sample = view.sample
    if sample is not None and sample.stats:
        # Layer statistics of this step: the first module in forward order with a non-finite
        # activation, else gradient, else weight.
        for kind in ("activation", "grad", "weight"):
            bad = [layer for (layer, _, k), row in sample.stats.items() if k == kind and row.get("nonfinite", 0) > 0]
            if bad:
                return min(bad, key=view.order), f"NaN/Inf ({kind})"
    if sig.get("output_nonfinite"):
        return None, "NaN/Inf in the model output"
    if sig.get("nonfinite_grads"):
        first = sig["nonfinite_grads"][0]
        layer = first.rsplit(".", 1)[0] if "." in first else ""
        return layer or None, "NaN/Inf in the gradients"
    if loss_bad:
        return None, "a non-finite loss"
    return None, None
