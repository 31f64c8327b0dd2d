"""gradients_not_zeroed: `.grad` still holds the previous step's values when the next backward begins.

Source: "37 reasons why your neural network is not working"; the PyTorch docs
on `optimizer.zero_grad()`. Signal: the per-step `grads_stale` flag — the
client probes one small parameter's `.grad` at the start of each backward
between two optimizer steps: stale when none of them found it clean (None or
zero). Gradient accumulation done on purpose zeroes after the step and runs
several backwards before the next one: the first of them finds zeros (or
None), so it is not flagged. Nor is a GAN's discriminator, which the
generator's backward reaches right after the discriminator's step (its
`.grad` holds that step's values then), and which is zeroed before its own
next backward.
"""

from __future__ import annotations

from layerwatch.server.diagnosis.view import RunView
from layerwatch.server.records import Finding

RULE_ID = "gradients_not_zeroed"

# Consecutive steps with stale gradients before the alert: one stale step can be
# a deliberate trick (e.g. an extra backward for a regulariser); three in a row is the loop.
SUSTAIN = 3


def check(view: RunView, state: dict) -> list[Finding]:
    stale = view.record.signals.get("grads_stale")
    if stale is None:
        return []  # not observed at this step (e.g. the first step): neither evidence for nor against
    if not stale:
        state["run"] = 0
        return []
    state["run"] = state.get("run", 0) + 1
    if state["run"] == 1:
        state["since"] = view.step
    if state["run"] < SUSTAIN:
        return []
    message = (
        f"the gradients still held the previous step's values in every backward of the step, "
        f"{state['run']} steps in a row (since step {state['since']}): they accumulate across steps"
    )
    evidence = {"consecutive_steps": state["run"], "since_step": state["since"]}
    return [view.finding(RULE_ID, message, evidence=evidence)]
