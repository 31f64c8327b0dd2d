"""no_gradient (live): trainable parameters in the optimizer that never receive a gradient.

Sources: the "unit test that every weight gets a gradient" of the training
debugging guides; "37 reasons why your neural network is not working" (#23,
frozen layers). The same id as preflight's one-batch check, here on the real
training: the per-tensor gradient norms of every step (`grad_norms`, null
where `.grad` is None when the optimizer steps).

A `.detach()`, `.item()` or numpy round trip in `forward` cuts everything
before it off the loss; an unused branch never gets a gradient. After WINDOW
steps with gradients, each trainable tensor (requires_grad, and in the
optimizer when the client knew it) that had none on any of them is listed,
in one finding per run (one cause: the cut), naming the module closest to the
output among them, where the cut is. A tensor that gets a gradient on some
steps (a mixture-of-experts expert, a branch taken now and then, embedding
rows the batch did not use: their tensor has a gradient) is not flagged, nor
is anything while no tensor at all gets a gradient (that is no training step).
"""

from __future__ import annotations

from layerwatch.server.diagnosis.view import RunView
from layerwatch.server.records import Finding

RULE_ID = "no_gradient"

# Steps with gradients before judging: a branch taken once in WINDOW steps, or an expert routed
# to once in as many batches, is used; and the finding comes well within 50 steps of the start.
WINDOW = 30
SEVERITY = "warning"  # DIAGNOSTICS.md (preflight's, one batch before training, is critical)


def check(view: RunView, state: dict) -> list[Finding]:
    if state.get("done"):
        return []
    norms = view.record.signals.get("grad_norms")
    tensors = view.history.tensor_info()
    if not norms or len(norms) != len(tensors) or all(n is None for n in norms):
        return []
    seen: set[int] = state.setdefault("seen", set())
    seen.update(i for i, n in enumerate(norms) if n is not None)
    state["steps"] = steps = state.get("steps", 0) + 1
    if steps < WINDOW:
        return []
    state["done"] = True  # judged once: a tensor's first gradient after this is a late branch, not a cut
    optimizer_known = view.optimizer is not None
    never = [t for i, t in enumerate(tensors) if i not in seen and t.trainable(optimizer_known)]
    if not never:
        return []
    layers = sorted({t.layer for t in never}, key=view.order)
    nearest = layers[-1]
    trainable = sum(t.trainable(optimizer_known) for t in tensors)
    shown = ", ".join(repr(layer) for layer in layers[:6]) + (", ..." if len(layers) > 6 else "")
    message = (
        f"{len(never)} of {trainable} trainable tensors never received a gradient in the first {steps} steps "
        f"(modules {shown}); the one closest to the output is {nearest!r}: look for what cuts it off the loss "
        f"right after it"
    )
    evidence = {"tensors": [t.label for t in never][:50], "layers": layers[:50], "steps": steps, "source": "live"}
    return [view.finding(RULE_ID, message, layer=nearest or None, evidence=evidence, severity=SEVERITY)]
