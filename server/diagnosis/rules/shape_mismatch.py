"""shape_mismatch: a regression output and its targets have different shapes, and the loss broadcasts them.

Sources: PyTorch's own warning ("Using a target size that is different to the
input size ... This will likely lead to incorrect results due to
broadcasting"); "37 reasons why your neural network is not working" (#25).
Signals: the step's `output_info.shape` and, from `log(targets=...)`,
`target_info` (shape, float or not). Only float targets: class labels (N,)
against logits (N, C) are how a cross-entropy takes them.

An (N, 1) output against (N,) targets (or the reverse) broadcasts to (N, N):
every prediction is compared with every target and the model learns their mean.
A differing shape alone proves nothing (the loop may squeeze the output before
the loss), so the client also computed MSE, L1 and smooth L1 of the step's
output against the targets, broadcast and reshaped, in the first steps
(`target_info.broadcast_matches` / `aligned_matches`): flagged when the logged
loss is a broadcast one and not an aligned one, on CONFIRM steps. Naming the
output module, where the squeeze belongs.
"""

from __future__ import annotations

import math

from layerwatch.server.diagnosis.view import RunView
from layerwatch.server.records import Finding

RULE_ID = "shape_mismatch"

CONFIRM = 2  # steps with the same mismatch (one odd batch is not the loop)


def check(view: RunView, state: dict) -> list[Finding]:
    if state.get("done"):
        return []
    signals = view.record.signals
    target, output = signals.get("target_info"), signals.get("output_info")
    if not isinstance(target, dict) or not isinstance(output, dict) or not target.get("float"):
        return []
    out_shape, target_shape = output.get("shape"), target.get("shape")
    if not _shapes(out_shape) or not _shapes(target_shape) or out_shape == target_shape:
        return []
    broadcast = _broadcast(out_shape, target_shape)
    if broadcast is None or math.prod(broadcast) <= max(math.prod(out_shape), math.prod(target_shape)):
        return []
    if target.get("aligned_matches"):
        state["done"] = True  # the loss is taken on the reshaped output: the loop squeezes it
        return []
    if not target.get("broadcast_matches"):
        return []  # not a loss the client recognised (or not checked at this step): no evidence
    state["seen"] = state.get("seen", 0) + 1
    if state["seen"] < CONFIRM:
        return []
    state["done"] = True
    layer = view.output_module()
    message = (
        f"the model's output has shape {tuple(out_shape)} and the targets {tuple(target_shape)}: an elementwise "
        f"loss broadcasts them to {tuple(broadcast)}, comparing every prediction with every target (the model "
        f"then learns the targets' mean)"
    )
    evidence = {"output_shape": out_shape, "target_shape": target_shape, "broadcast_shape": broadcast}
    return [view.finding(RULE_ID, message, layer=layer or None, evidence=evidence)]


def _shapes(shape) -> bool:
    return isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)


def _broadcast(a: list[int], b: list[int]) -> list[int] | None:
    """numpy/torch broadcasting of two shapes, or None if they do not broadcast."""
    out = []
    for x, y in zip([1] * (len(b) - len(a)) + a, [1] * (len(a) - len(b)) + b):
        if x != y and 1 not in (x, y):
            return None
        out.append(max(x, y))
    return out
