"""dead_network: most of the model's gradients are exactly zero, step after step: the network died.

Sources: AutoTrainer (ICSE'21) calls a network with >= 70% of its gradient
entries exactly zero "dying ReLU"; CS231n ("a large fraction of the network
dead", usually after a too-large update knocked the units off). Signal: the
per-tensor gradient norms sent every step (`grad_norms`): a norm of exactly 0
means every element of that gradient is 0. Whatever made the units dead (an
nn.ReLU, a functional F.relu, a clamp, a saturated sigmoid rounding to 0), the
gradients show it, which the per-module activation statistics cannot for a
functional call.

Only tensors that had a gradient are counted (frozen and unused ones have
none: `no_gradient`'s and `frozen_parameters`' findings). A tensor whose
gradient is zero from the first step on is a design fact, not a death (a conv
bias before BatchNorm is ~0, rarely exactly 0), so the fraction is taken over
the tensors that once had a non-zero gradient, or over all of them from
DEAD_FROM_START steps on (a network dead from its initialisation never had
one). The finding names the first layer, in forward order, that died: where
the signal stops.
"""

from __future__ import annotations

from layerwatch.server.diagnosis.view import RunView
from layerwatch.server.records import Finding

RULE_ID = "dead_network"

DEAD_FRACTION = 0.7  # AutoTrainer: >= 70% of gradient entries exactly zero
SUSTAIN_STEPS = 10  # consecutive steps: one all-zero batch (a masked or padded one) is not a death
DEAD_FROM_START = 20  # steps after which tensors zero since the start count too (dead at initialisation)
MIN_TENSORS = 2  # a one-tensor model has no "most of its gradients"


def check(view: RunView, state: dict) -> list[Finding]:
    norms = view.record.signals.get("grad_norms")
    tensors = view.history.tensor_info()
    if not norms or len(norms) != len(tensors):
        return []  # no per-tensor norms (an older client) or another model description
    lived: set[int] = state.setdefault("lived", set())
    state["steps"] = steps = state.get("steps", 0) + 1
    present = [i for i, n in enumerate(norms) if n is not None]
    lived.update(i for i in present if norms[i] != 0)
    counted = present if steps >= DEAD_FROM_START else [i for i in present if i in lived]
    zero = [i for i in counted if norms[i] == 0]
    dead = len(counted) >= MIN_TENSORS and len(zero) >= DEAD_FRACTION * len(counted)
    state["run"] = run = state.get("run", 0) + 1 if dead else 0
    if run == 1:
        state["since"] = view.step
    if run < SUSTAIN_STEPS or state.get("reported"):
        return []
    state["reported"] = True
    layers = sorted({tensors[i].layer for i in zero}, key=view.order)
    first = layers[0] if layers else None
    loss = view.record.scalars.get("loss")
    message = (
        f"{len(zero)} of {len(counted)} gradient tensors are exactly zero on every step since step {state['since']} "
        f"({run} steps): the network is dead from {first!r} on"
        + (f"; the loss is stuck at {loss:.4g}" if loss is not None else "")
    )
    evidence = {
        "zero_tensors": [tensors[i].label for i in zero][:50],
        "zero": len(zero),
        "counted": len(counted),
        "since": state["since"],
        "steps": run,
    }
    return [view.finding(RULE_ID, message, layer=first or None, evidence=evidence)]


def mostly_zero(view: RunView) -> bool:
    """This step's per-tensor gradient norms are DEAD_FRACTION or more exactly zero (or none present):
    for the loss rules, whose plateau or chance-level remedies would be wrong for a dead network."""
    norms = view.record.signals.get("grad_norms")
    if not norms:
        return False
    present = [n for n in norms if n is not None]
    return not present or sum(n == 0 for n in present) >= DEAD_FRACTION * len(present)
