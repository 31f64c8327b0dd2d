"""loss_at_init: the first loss of a classifier is far from ln C, what a chance-level model scores.

Sources: "37 reasons why your neural network is not working" (expected initial
loss -ln(1/C)); Karpathy, "A Recipe for Training Neural Networks" ("verify
loss @ init"). Signals: the first `loss`, the `target_counts` of that step,
and the output width of the model's last layer.

Cross-entropy-like losses are recognised by their targets: the run logged
integer class labels (`mon.log(targets=...)`, so target_counts is present)
with C >= 2 classes. C is the output width of the last called leaf module with
a matrix weight (a Linear/Conv head: weight.shape[0]) when that width can hold
every class seen (a head tied to an embedding: its vocabulary), else the
largest class + 1 (`references.num_classes`). Negative classes
(ignore_index = -100) are not counted.

Too high (> ln C + TOLERANCE * ln C): outputs scaled up at init, confident
and wrong. Too low is flagged only below TOO_LOW: a loss <= 0 with class
targets means probabilities went where log-probabilities belong (NLLLoss on
softmax output); a merely small positive loss is what a pretrained or resumed
model, or a focal loss, shows, and is left alone. A loss summed over the batch
(reduction="sum") is recognised as about n * ln C for n targets and judged per
target.
"""

from __future__ import annotations

import math

from client_hook import thresholds
from layerwatch.server.diagnosis.references import class_counts, num_classes
from layerwatch.server.diagnosis.view import RunView, fmt
from layerwatch.server.records import Finding

RULE_ID = "loss_at_init"

TOLERANCE = thresholds.LOSS_AT_INIT_TOLERANCE  # |loss0 - ln C| > 0.5 * ln C, shared with preflight
TOO_LOW = 0.0  # a cross-entropy is never <= 0 at init; small positive losses have innocent causes
FIRST_STEPS = 3  # the loss must be logged within the first steps to be "at init"


def check(view: RunView, state: dict) -> list[Finding]:
    if state.get("done"):
        return []
    rec = view.record
    loss = rec.scalars.get("loss")
    if loss is None:
        if view.step >= FIRST_STEPS:
            state["done"] = True
        return []
    state["done"] = True  # the first loss decides, once
    classes = class_counts(rec.signals.get("target_counts"))
    if view.step >= FIRST_STEPS or not classes or not math.isfinite(loss):
        return []
    c, source = num_classes(view, classes)
    if c < 2:
        return []
    chance = math.log(c)
    n = sum(classes.values())
    low, high = TOO_LOW, chance * (1 + TOLERANCE)
    if loss <= low:
        why = "at or below 0, impossible for a cross-entropy (probabilities passed where log-probabilities belong?)"
    elif loss > high and not (n > 1 and abs(loss / n - chance) <= TOLERANCE * chance):
        why = f"above {fmt(high)} = ln C + {TOLERANCE:g} ln C: the model starts confident and wrong"
    else:
        return []
    message = (
        f"the first loss (step {view.step}) is {fmt(loss)}, while a model at chance scores ln C = {fmt(chance)} "
        f"for C = {c} classes ({source}); it is {why}"
    )
    evidence = {"loss": loss, "classes": c, "chance_loss": chance, "classes_from": source, "targets": n}
    return [view.finding(RULE_ID, message, evidence=evidence)]
