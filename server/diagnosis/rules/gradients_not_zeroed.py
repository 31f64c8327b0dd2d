"""gradients_not_zeroed: `.grad` still holds the previous step's values when the next backward begins.

Source: "37 reasons why your neural network is not working"; the PyTorch docs
on `optimizer.zero_grad()`. Signal: the per-step `grads_stale` flag — the
client probes the last few parameters that had a gradient at the very start of
the first backward after an optimizer step. Gradient accumulation done on
purpose zeroes after the step and runs several backwards before the next one:
the first of them finds zeros (or None), so it is not flagged.
"""

from __future__ import annotations

from server.diagnosis.view import RunView
from server.store import Finding

RULE_ID = "gradients_not_zeroed"

# Consecutive steps with stale gradients before the alert: one stale step can be
# a deliberate trick (e.g. an extra backward for a regulariser); three in a row is the loop.
SUSTAIN = 3
# How many parameters the client probes (client_hook.signals.STALE_PROBES): the
# last ones that had a gradient. Copied, not imported: the server never imports torch.
STALE_PROBES = 3


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
    unoptimized = _unoptimized_probes(view)
    if unoptimized:
        # `optimizer.zero_grad()` only zeroes the optimizer's own parameters; a probed
        # parameter outside every param group keeps accumulating although the loop is right.
        # weights_not_updating names that layer; this flag says nothing about the loop.
        return []
    message = (
        f"the gradients still held the previous step's values when backward began, "
        f"{state['run']} steps in a row (since step {state['since']}): they accumulate across steps"
    )
    evidence = {"consecutive_steps": state["run"], "since_step": state["since"]}
    return [view.finding(RULE_ID, message, evidence=evidence)]


def _unoptimized_probes(view: RunView) -> list[str]:
    """The probed parameters (the last trainable ones) that are in no optimizer param group."""
    if view.optimizer is None:
        return []  # without an optimizer, `in_optimizer` says nothing
    trainable = [(layer, name, p) for layer, name, p in view.params() if p.get("requires_grad", True)]
    probes = trainable[-STALE_PROBES:]
    return [f"{layer}.{name}" if layer else name for layer, name, p in probes if p.get("in_optimizer") is False]
