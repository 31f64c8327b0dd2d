"""vanishing_gradients: the earliest layers get almost no gradient compared with the last one.

Sources: Glorot & Bengio 2010 (gradients shrink layer by layer towards the
input in deep saturating networks); AutoTrainer (ICSE'21: first/last gradient
ratio < 1e-3 and first-layer gradient < 1e-4, only while the run is not
learning). Signal: the gradient RMS of each weight (two or more dimensions:
not biases, not normalisation scales), in forward order, every step: from the
per-tensor gradient norms of the signals (norm / sqrt(numel)), so the verdict
does not depend on how often the run is sampled; from the sampled layer
statistics for a client that sends no per-tensor norms.

The ratio is first layer's RMS / last layer's RMS. Left out: layers with no
gradient or an all-zero one (frozen, unused this step), and embeddings (their
gradient is zero on every row the batch did not use). The alert names the
layer closest to the output whose ratio is below VANISH_RATIO, where the
signal starts to die. Like AutoTrainer, it waits while the loss still improves
by LEARNING_DROP per LEARNING_WINDOW steps: a network that learns is not stuck.

Vanishing is a chain: the gradient shrinks layer by layer (by at most ~4x per
sigmoid layer, its largest derivative being 1/4; Glorot & Bengio). So the layers
below the ratio must end in a slope, not a cliff: when the next layer in forward
order has more than MAX_STEP_UP times the gradient of the last layer below, the
small gradients are a side branch, not a dying chain. Attention is the common case:
at initialisation its softmax is near uniform and the query and key projections get
gradients more than 1000x below the value projection's, the next layer in forward
order (measured on a tiny BERT from config, tests/integrations/test_huggingface.py),
until training sharpens the attention.
"""

from __future__ import annotations

import math

from layerwatch.server.diagnosis.view import RunView, fmt
from layerwatch.server.records import Finding

RULE_ID = "vanishing_gradients"

VANISH_RATIO = 1e-5  # DIAGNOSTICS.md (AutoTrainer uses 1e-3 with an absolute 1e-4 on the first layer)
SUSTAIN = 3  # consecutive samples below VANISH_RATIO (a client without per-step norms)
SUSTAIN_STEPS = 20  # consecutive steps below VANISH_RATIO, from the per-step norms
LEARNING_WINDOW = 50  # steps of loss compared with the LEARNING_WINDOW steps before them
LEARNING_DROP = 0.1  # a 10% lower mean loss over a window: still learning
SPARSE_GRADS = ("Embedding", "EmbeddingBag")  # modules whose gradients are mostly zero rows
# A layer-to-layer rise above this, right after the last vanished layer, is a branch, not a chain: a
# vanishing chain rises ~4-10x a layer (sigmoid: at most 4x in the gradient itself, times the weights).
MAX_STEP_UP = 1000.0


def check(view: RunView, state: dict) -> list[Finding]:
    norms = view.record.signals.get("grad_norms")
    tensors = view.history.tensor_info()
    if norms and len(norms) == len(tensors):
        layers, needed = rms_from_norms(view, norms), SUSTAIN_STEPS
    elif not tensors and view.sample is not None and view.sample.stats:
        layers, needed = _weight_grad_rms(view, view.sample.stats), SUSTAIN
    else:
        return []
    if len(layers) < 2:
        state["run"] = 0
        return []
    last_layer, last_rms = layers[-1]
    below = [(layer, rms / last_rms) for layer, rms in layers[:-1] if rms / last_rms < VANISH_RATIO]
    first_layer, first_rms = layers[0]
    if not below or below[0][0] != first_layer or _cliff(layers, below[-1][0]):
        state["run"] = 0
        return []
    state["run"] = state.get("run", 0) + 1
    if state["run"] < needed or _learning(view):
        return []
    if "layer" not in state:
        # The one closest to the output: where the gradient has died. Named once and kept, so
        # that a ratio wandering around the threshold does not split the alert over layers.
        state["layer"] = below[-1][0]
    layer = state["layer"]
    ratio = next((r for name, r in below if name == layer), below[-1][1])
    unit = "steps" if needed == SUSTAIN_STEPS else "samples"
    message = (
        f"gradient RMS of the first layer {first_layer!r} is {fmt(first_rms)}, {fmt(first_rms / last_rms)} of the "
        f"last layer's ({last_layer!r}: {fmt(last_rms)}) over {state['run']} {unit}; the ratio first falls "
        f"below {VANISH_RATIO} at {layer!r} ({fmt(ratio)}), and the loss is not improving"
    )
    evidence = {
        "ratios": {name: rms / last_rms for name, rms in layers},
        "first_layer": first_layer,
        "last_layer": last_layer,
        "samples": state["run"],
    }
    return [view.finding(RULE_ID, message, layer=layer or None, evidence=evidence)]


def _weight_grad_rms(view: RunView, stats: dict) -> list[tuple[str, float]]:
    """(layer, gradient RMS of its weight matrices) in forward order, for layers with a live gradient."""
    shapes = {(layer, name): p.get("shape") or [] for layer, name, p in view.params()}
    squares: dict[str, tuple[float, float]] = {}  # layer -> (sum of squares, elements)
    for (layer, name, kind), row in stats.items():
        if kind != "grad" or len(shapes.get((layer, name), [])) < 2 or view.module_type(layer) in SPARSE_GRADS:
            continue
        rms, numel = row.get("rms"), row.get("numel")
        if rms is None or not math.isfinite(rms) or not numel or row.get("zero_frac") == 1.0 or rms <= 0:
            continue
        total, count = squares.get(layer, (0.0, 0.0))
        squares[layer] = (total + rms * rms * numel, count + numel)
    layers = [(layer, math.sqrt(total / count)) for layer, (total, count) in squares.items()]
    return sorted(layers, key=lambda lc: view.order(lc[0]))


def rms_from_norms(view: RunView, norms: list[float | None]) -> list[tuple[str, float]]:
    """The same as `_weight_grad_rms`, from the step's per-tensor gradient norms (RMS = norm / sqrt(numel))."""
    squares: dict[str, tuple[float, float]] = {}
    for tensor, norm in zip(view.history.tensor_info(), norms):
        numel = tensor.description.get("numel")
        if norm is None or not tensor.is_matrix or not numel or not 0 < norm < math.inf:
            continue
        if view.module_type(tensor.layer) in SPARSE_GRADS:
            continue
        total, count = squares.get(tensor.layer, (0.0, 0.0))
        squares[tensor.layer] = (total + norm * norm, count + numel)
    layers = [(layer, math.sqrt(total / count)) for layer, (total, count) in squares.items()]
    return sorted(layers, key=lambda lc: view.order(lc[0]))


def _cliff(layers: list[tuple[str, float]], last_below: str) -> bool:
    """Whether the gradient jumps by more than MAX_STEP_UP from `last_below` to the next layer in forward order."""
    names = [name for name, _ in layers]
    i = names.index(last_below)
    if i + 1 >= len(layers):
        return False
    return layers[i + 1][1] > MAX_STEP_UP * layers[i][1]


def _learning(view: RunView) -> bool:
    """Is the loss still falling? Mean of the last LEARNING_WINDOW steps vs. the window before."""
    losses = [v for _, v in view.series("loss", last=2 * LEARNING_WINDOW) if math.isfinite(v)]
    if len(losses) < 2 * LEARNING_WINDOW:
        return False  # too early to tell: the gradient ratio alone decides
    before = sum(losses[:LEARNING_WINDOW]) / LEARNING_WINDOW
    recent = sum(losses[LEARNING_WINDOW:]) / LEARNING_WINDOW
    return recent < (1 - LEARNING_DROP) * before


def vanished(view: RunView) -> bool:
    """This step's per-tensor norms put the first layer's gradient RMS below VANISH_RATIO of the last's:
    for the loss rules, whose plateau or chance-level remedies would miss the cause."""
    norms = view.record.signals.get("grad_norms")
    if not norms or len(norms) != len(view.history.tensor_info()):
        return False
    layers = rms_from_norms(view, norms)
    return len(layers) >= 2 and layers[0][1] < VANISH_RATIO * layers[-1][1]
