"""What the loss rules measure a run against: its chance level and its loss at initialisation.

A loss means little on its own scale (2.3 is chance for 10 classes and good
for 1,000), so the rules compare it with two references worked out once per
run and kept on its history (`RunHistory.references`):

- `chance_level`: what a classifier that ignores its inputs scores. With the
  class labels logged (`mon.log(targets=...)`), the entropy of the labels seen
  so far (a model that learnt only the class frequencies reaches it; ln C for
  balanced classes, "37 reasons" #17); otherwise ln C for the head's output
  width C (a tied head: the vocabulary of the largest embedding), taken as a
  classification only if the first loss is within INFERRED_TOLERANCE of ln C
  (a regression whose MSE happens to be near ln C of its output width is rare;
  without the first loss at chance nothing is inferred).
- `initial_loss`: the first logged loss (`first_loss` of the view), before any
  update moved the model: the baseline divergence is judged from, since a
  window of early losses may already hold an explosion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from layerwatch.server.diagnosis.view import RunView, param_descriptions

INFERRED_TOLERANCE = 0.25  # without labels: the first loss within 25% of ln C makes it a classification
MIN_TARGETS = 64  # labels counted before their entropy is trusted as the chance level


@dataclass(frozen=True)
class Chance:
    """A classification's chance level: `loss` nats for `classes` classes, and where that came from."""

    classes: int
    loss: float
    source: str


def class_counts(counts: dict[str, int] | None) -> dict[int, int]:
    """`target_counts` as {class: count}, negative labels (ignore_index = -100) left out."""
    classes: dict[int, int] = {}
    for name, count in (counts or {}).items():
        try:
            label = int(name)
        except (TypeError, ValueError):
            continue
        if label >= 0:
            classes[label] = count
    return classes


def num_classes(view: RunView, classes: dict[int, int]) -> tuple[int, str]:
    """C: the output width of the last called leaf module with a matrix weight when that holds every class
    seen, else the largest class + 1 (also when the head's weight is tied and described elsewhere)."""
    seen = max(classes) + 1 if classes else 0
    width, source = head_width(view)
    if width is not None and width >= seen:
        return width, source
    return seen, "the largest class label + 1"


def head_width(view: RunView) -> tuple[int | None, str]:
    """The output width of the model's head, and how it was found (None if unknown)."""
    for module in reversed(view.modules):
        if not module.get("leaf", True) or module.get("called") is False:
            continue
        weights = [p.get("shape") or [] for p in param_descriptions(module) if p["name"] == "weight"]
        if weights and len(weights[0]) >= 2 and isinstance(weights[0][0], int):
            return int(weights[0][0]), f"the output width of {module['name']!r}"
        if not weights and "Linear" in (module.get("type") or ""):
            # A head whose weight is tied to an embedding (language models): the vocabulary.
            rows = [
                (int(p["shape"][0]), m["name"])
                for m in view.modules
                if m.get("type") == "Embedding"
                for p in param_descriptions(m)
                if p["name"] == "weight" and len(p.get("shape") or []) == 2
            ]
            if rows:
                vocab, name = max(rows)
                return vocab, f"the vocabulary of {name!r} (the head's tied weight)"
            return None, ""
        if not weights and "Conv" in (module.get("type") or ""):
            return None, ""
    return None, ""


def chance_level(view: RunView) -> Chance | None:
    """The run's chance level (module docstring), or None when it is not a classification we can tell."""
    refs = view.history.references
    counts = refs.setdefault("class_counts", {})
    step_counts = class_counts(view.record.signals.get("target_counts"))
    if step_counts and refs.get("counted_step") != view.step:
        refs["counted_step"] = view.step
        for label, count in step_counts.items():
            counts[label] = counts.get(label, 0) + count
    total = sum(counts.values())
    if total >= MIN_TARGETS and len(counts) >= 2:
        c, source = num_classes(view, counts)
        entropy = -sum(n / total * math.log(n / total) for n in counts.values() if n)
        return Chance(c, entropy, f"the entropy of the {len(counts)} labels seen ({source}: C = {c})")
    if "inferred" not in refs:
        first = view.history.first_loss
        if first is None:
            return None
        width, source = head_width(view)
        inferred = None
        if width is not None and width >= 2 and math.isfinite(first[1]):
            ln_c = math.log(width)
            if abs(first[1] - ln_c) <= INFERRED_TOLERANCE * ln_c:
                inferred = Chance(width, ln_c, f"ln C for C = {width}, {source}")
        refs["inferred"] = inferred
    return refs["inferred"]


def initial_loss(view: RunView) -> float | None:
    """The first logged loss of the run (finite), or None."""
    first = view.history.first_loss
    return first[1] if first is not None and math.isfinite(first[1]) else None
