"""exploding_gradients: the global gradient norm spikes or keeps growing far above its start.

Sources: Pascanu, Mikolov & Bengio 2013, "On the difficulty of training
recurrent neural networks" (gradient norm spikes; clipping as the remedy);
AutoTrainer (ICSE'21: first/last gradient-norm ratio > 70); DL4J (spikes in
the update ratio). Signal: the per-step `grad_norm` (global L2 norm of all
gradients as the optimizer saw them, i.e. after clipping: a clipped run is not
exploding), every step; the per-tensor norms of every step name the layer.

Two ways to fire, both before the values overflow (NaN is non_finite's):
- a spike: this step's norm > SPIKE_FACTOR x the median of the previous WINDOW
  steps, and above the run's early level (a batch that still has a gradient
  after the loss has reached ~0 is not an explosion);
- growth: the median of the last GROWTH_WINDOW steps > GROWTH_FACTOR x the
  median of the first EARLY_STEPS steps (slow, steady blow-up no spike catches).
"""

from __future__ import annotations

import math
from collections import deque

from layerwatch.server.diagnosis.view import RunView, fmt, median
from layerwatch.server.records import Finding

RULE_ID = "exploding_gradients"

SPIKE_FACTOR = 100.0  # DIAGNOSTICS.md; Pascanu et al. 2013 (norm spikes by orders of magnitude)
WINDOW = 20  # steps in the running median a spike is measured against
MIN_WINDOW = 10  # the first steps move a lot (init, warm-up): no spike test before this many norms
GROWTH_FACTOR = 1000.0  # DIAGNOSTICS.md: "monotonic growth > 1000x from its early median"
EARLY_STEPS = 10  # steps whose median is the run's early level
GROWTH_WINDOW = 5  # recent steps whose median is compared with the early level
MIN_LAYER_GROWTH = 10.0  # a layer is named only if its own gradient norm grew at least this much


def check(view: RunView, state: dict) -> list[Finding]:
    _remember_layers(view, state)
    norm = view.record.signals.get("grad_norm")
    if norm is None or not math.isfinite(norm):
        return []  # no gradient this step, or already non-finite (non_finite's alert)
    recent: deque[float] = state.setdefault("recent", deque(maxlen=WINDOW))
    early: list[float] = state.setdefault("early", [])
    before = list(recent)
    recent.append(norm)
    if len(early) < EARLY_STEPS:
        if norm > 0:
            early.append(norm)
        return []
    early_level = median(early)
    findings: list[Finding] = []
    window_level = median(before)
    if len(before) >= MIN_WINDOW and window_level > 0 and norm > SPIKE_FACTOR * window_level and norm > early_level:
        what = (
            f"spiked to {fmt(norm)}, {fmt(norm / window_level)}x its median of the last {len(before)} steps "
            f"({fmt(window_level)})"
        )
        findings.append(_finding(view, state, what, norm, window_level, early_level))
    else:
        level = median(list(recent)[-GROWTH_WINDOW:])
        if early_level > 0 and level > GROWTH_FACTOR * early_level:
            what = (
                f"grew to {fmt(level)} (median of the last {GROWTH_WINDOW} steps), "
                f"{fmt(level / early_level)}x its early median ({fmt(early_level)})"
            )
            findings.append(_finding(view, state, what, norm, window_level, early_level))
    return findings


def _finding(view: RunView, state: dict, what: str, norm: float, window: float, early: float) -> Finding:
    if "layer" not in state:
        # Named once, at the first firing, and kept: one alert per run, not one per guess.
        state["layer"], state["layer_growth"] = _grown_most(state)
    layer, growth = state["layer"], state["layer_growth"]
    message = f"the global gradient norm {what} at step {view.step}"
    if layer is not None:
        message += f"; the gradient of {layer!r} grew most ({fmt(growth)}x since its first gradient)"
    evidence = {"grad_norm": norm, "window_median": window, "early_median": early, "layer_growth": growth}
    return view.finding(RULE_ID, message, layer=layer, evidence=evidence)


def _remember_layers(view: RunView, state: dict) -> None:
    """Per-layer gradient norms: the first value of each layer, and the latest. From every step's per-tensor
    norms (`grad_norms`: the layer named does not depend on the sampling), else from the sampled rows."""
    squares: dict[str, float] = {}
    norms = view.record.signals.get("grad_norms")
    tensors = view.history.tensor_info()
    if norms and len(norms) == len(tensors):
        for tensor, value in zip(tensors, norms):
            if value is not None and math.isfinite(value):
                squares[tensor.layer] = squares.get(tensor.layer, 0.0) + value * value
    elif not tensors and view.sample is not None and view.sample.stats:
        for (layer, _param, kind), row in view.sample.stats.items():
            value = row.get("norm")
            if kind == "grad" and value is not None and math.isfinite(value):
                squares[layer] = squares.get(layer, 0.0) + value * value
    else:
        return
    first: dict[str, float] = state.setdefault("layer_first", {})
    for layer, sq in squares.items():
        if sq > 0:
            first.setdefault(layer, math.sqrt(sq))
    state["layer_last"] = {layer: math.sqrt(sq) for layer, sq in squares.items()}


def _grown_most(state: dict) -> tuple[str | None, float | None]:
    first, last = state.get("layer_first", {}), state.get("layer_last", {})
    growth = {layer: last[layer] / first[layer] for layer in last if first.get(layer)}
    if not growth:
        return None, None
    layer = max(growth, key=growth.get)
    if growth[layer] < MIN_LAYER_GROWTH:
        return None, growth[layer]  # the latest sample predates the blow-up: no layer to blame yet
    return layer, growth[layer]
