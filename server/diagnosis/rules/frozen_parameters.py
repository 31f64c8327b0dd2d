"""frozen_parameters: the parameters with `requires_grad=False`, listed once.

Source: "37 reasons why your neural network is not working" (frozen layers).
Signal: the model description of run_start (each parameter's `requires_grad`).
Info only: freezing is usually deliberate (fine-tuning a head on a frozen
backbone); the alert is there so that an accidental freeze is seen.

One alert for the whole model, not one per module: a frozen backbone has
dozens of modules. Its `layer` is the smallest module that holds every frozen
parameter and nothing trainable (e.g. 'backbone'), or None when the frozen
parameters are spread over the model.
"""

from __future__ import annotations

from layerwatch.server.diagnosis.view import RunView, fmt
from layerwatch.server.records import Finding

RULE_ID = "frozen_parameters"

MAX_NAMED = 8  # modules named in the message; the evidence lists them all


def check(view: RunView, state: dict) -> list[Finding]:
    if state.get("done") or not view.modules:
        return []  # once per run, as soon as the model is described
    state["done"] = True
    params = list(view.params())
    frozen = [(layer, name, p) for layer, name, p in params if p.get("requires_grad") is False]
    if not frozen:
        return []
    modules = list(dict.fromkeys(layer for layer, _, _ in frozen))
    numel = sum(int(p.get("numel") or 0) for _, _, p in frozen)
    total = sum(int(p.get("numel") or 0) for _, _, p in params)
    trainable = {layer for layer, _, p in params if p.get("requires_grad") is not False}
    layer = _enclosing(modules, trainable)
    named = ", ".join(repr(m) for m in modules[:MAX_NAMED]) + (", ..." if len(modules) > MAX_NAMED else "")
    share = f" ({fmt(100 * numel / total)}% of {total})" if total else ""
    message = (
        f"{len(frozen)} parameter tensors with {numel} values{share} have requires_grad=False "
        f"in {len(modules)} module(s): {named}"
    )
    evidence = {
        "modules": modules,
        "params": [f"{layer}.{name}" if layer else name for layer, name, _ in frozen],
        "frozen_values": numel,
        "total_values": total,
    }
    return [view.finding(RULE_ID, message, layer=layer, evidence=evidence)]


def _enclosing(modules: list[str], trainable: set[str]) -> str | None:
    """The deepest module name that contains every frozen module and no trainable one; None if only the root does."""
    parts = [m.split(".") if m else [] for m in modules]
    common: list[str] = []
    for segment in zip(*parts):
        if len(set(segment)) != 1:
            break
        common.append(segment[0])
    prefix = ".".join(common)
    if not prefix:
        return None
    if any(t == prefix or t.startswith(prefix + ".") for t in trainable):
        return None
    return prefix
