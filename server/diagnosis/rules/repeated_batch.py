"""repeated_batch: the model sees the very same input batch step after step.

Source: "37 reasons why your neural network is not working" (the same batch
every time: a broken data loader or iterator). Signal: `input_fingerprint`, a
cheap hash of the first floating tensor argument of the model's forward, sent
every step. Training on one batch *on purpose* (overfitting one batch is a
classic sanity check) and full-batch training on a tiny dataset look the same
from here; the rule still flags them, as DIAGNOSTICS.md says, and its message
says how to tell them apart, because a loader that yields one batch forever is
far more common than either and wastes the whole run.
"""

from __future__ import annotations

from layerwatch.server.diagnosis.view import RunView
from layerwatch.server.records import Finding

RULE_ID = "repeated_batch"

REPEAT_STEPS = 20  # DIAGNOSTICS.md: the same fingerprint for this many consecutive steps


def check(view: RunView, state: dict) -> list[Finding]:
    fingerprint = view.record.signals.get("input_fingerprint")
    if fingerprint is None:
        return []  # no float input seen at this step: neither a repeat nor a change
    if fingerprint != state.get("fingerprint"):
        state.update(fingerprint=fingerprint, since=view.step, count=1)
        return []
    state["count"] += 1
    count, since = state["count"], state["since"]
    if count < REPEAT_STEPS:
        return []
    message = (
        f"the input batch has been identical for {count} consecutive steps (steps {since}..{view.step}): "
        "the data loader or iterator yields the same batch every step. If you are overfitting one batch on "
        "purpose (a good sanity check) or training full-batch on a small dataset, this is expected."
    )
    return [view.finding(RULE_ID, message, evidence={"since_step": since, "steps": count})]
