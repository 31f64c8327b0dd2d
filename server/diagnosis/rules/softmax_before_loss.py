"""softmax_before_loss (live): the model returns probabilities and the loss applies a softmax again.

Sources: "37 reasons why your neural network is not working" (#19, the loss
expects logits: a double softmax); the same id as preflight's check. Signals:
`output_info` (the output's first rows, in the first steps and now and then:
probabilities have min >= 0, max <= 1 and rows summing to 1) and, when the
targets are logged, `target_info.loss_matches` (the client computed
cross_entropy and -log p of those rows against the targets and compared them
with the logged loss).

Three ways to know:
- from the gradient, without targets or the loss: a loss that applies a softmax
  to its input is blind to a constant added to a row, so the rows of the
  gradient it sends back to the output sum to 0 (`grad_row_sum` below
  GRAD_SUM_ATOL), and cross_entropy's gradient is (softmax(rows) - targets)/n,
  so softmax(rows) - n*g gives the targets back: one-hot or label-smoothed
  rows (`targets_min` >= -TARGETS_ATOL, `targets_peak` >= TARGETS_PEAK,
  `targets_second` <= TARGETS_SECOND) on CONFIRM probed steps. The right losses
  of probabilities (NLL of their log, BCE, MSE against one-hot rows) give
  neither; three classes at least (the client's probe);
- exactly, with targets: the logged loss equals cross_entropy(probabilities)
  and not -log p (NLLLoss on their log, the right pairing) on CONFIRM steps;
- from the loss, without targets: a cross-entropy over probabilities cannot go
  below ln(1 + (C - 1)/e) (the one-hot row's softmax), so a loss that came
  most of the way down to that floor (within FLOOR_BAND of the way from ln C)
  and stopped there, never below it, is that loss on probabilities.
Outputs of one column (a sigmoid for a binary task) have no class dimension and
are left to preflight. The finding names the output module.
"""

from __future__ import annotations

import math

from layerwatch.server.diagnosis.view import RunView, fmt
from layerwatch.server.records import Finding

RULE_ID = "softmax_before_loss"

PROB_ATOL = 1e-3  # rows summing to 1 this closely are probabilities (preflight's PROB_SUM_ATOL)
CONFIRM = 2  # steps where the logged loss is cross_entropy of the probabilities (and not -log p)
PROBED = 3  # probed steps with probability outputs before the loss-floor reading counts
GRAD_SUM_ATOL = 1e-3  # rows of a softmax's input gradient sum to 0 up to float rounding (~1e-7 relative)
TARGETS_ATOL = 0.02  # implied targets this far below 0 are still 0 (bf16/fp16 gradients round)
TARGETS_PEAK = 0.85  # the rows' mean largest implied target: one-hot, or label smoothing up to ~0.15
TARGETS_SECOND = 0.05  # no other implied target above this (a smoothed row's eps/C)
FLOOR_BAND = 0.25  # within 25% of the way from ln C down to the floor
SMOOTH = 20  # losses averaged
STALL_STEPS = 30  # ... improving by less than STALL over this many steps
STALL = 0.02


def check(view: RunView, state: dict) -> list[Finding]:
    if state.get("done"):
        return []
    signals = view.record.signals
    info = signals.get("output_info")
    if isinstance(info, dict) and "row_sum_error" in info:
        probabilities = _probabilities(info)
        state["probed"] = state.get("probed", 0) + 1 if probabilities else 0
        if probabilities:
            state["classes"] = int(info["shape"][-1])
            state["implied"] = state.get("implied", 0) + 1 if _implies_targets(info) else 0
            if state["implied"] >= CONFIRM:
                return _finding(
                    view,
                    state,
                    f"the gradient the loss sends back to them is softmax(outputs) - targets (its rows sum to "
                    f"{fmt(info['grad_row_sum'])} of their size, and softmax(outputs) minus it gives one-hot rows, "
                    f"mean top {fmt(info['targets_peak'])}): the loss is a cross-entropy that takes logits",
                )
        else:
            state.pop("classes", None)
    matches = (signals.get("target_info") or {}).get("loss_matches")
    if isinstance(matches, list):
        if "nll_of_log" in matches or not matches:
            state["done"] = True  # the loss is -log p (right), or not a loss of these rows: nothing to say
            return []
        state["confirmed"] = state.get("confirmed", 0) + 1
        if state["confirmed"] >= CONFIRM and state.get("classes"):
            return _finding(view, state, "the logged loss equals cross_entropy applied to these probabilities")
    return _from_the_loss_floor(view, state)


def _probabilities(info: dict) -> bool:
    shape = info.get("shape") or []
    try:
        return (
            len(shape) >= 2
            and shape[-1] >= 2
            and info["min"] >= -1e-6
            and info["max"] <= 1 + 1e-6
            and info["row_sum_error"] <= PROB_ATOL
        )
    except (TypeError, KeyError):
        return False


def _implies_targets(info: dict) -> bool:
    """Whether the output's gradient is cross_entropy's: rows summing to 0, and softmax(rows) minus it one-hot."""
    try:
        return (
            info["grad_row_sum"] <= GRAD_SUM_ATOL
            and info["targets_min"] >= -TARGETS_ATOL
            and info["targets_peak"] >= TARGETS_PEAK
            and info["targets_second"] <= TARGETS_SECOND
        )
    except (TypeError, KeyError):
        return False  # an older client, a step whose backward did not reach the output


def _from_the_loss_floor(view: RunView, state: dict) -> list[Finding]:
    loss = view.record.scalars.get("loss")
    classes = state.get("classes")
    if loss is None or not math.isfinite(loss):
        return []
    recent = state.setdefault("recent", [])
    recent.append(loss)
    del recent[:-SMOOTH]
    if not classes or state.get("probed", 0) < PROBED or len(recent) < SMOOTH:
        return []
    floor, chance = math.log(1 + (classes - 1) / math.e), math.log(classes)
    if loss < floor * 0.99:
        state["done"] = True  # below what a cross-entropy of probabilities allows: not that loss
        return []
    smoothed = sum(recent) / len(recent)
    history = state.setdefault("smoothed", [])
    history.append(smoothed)
    del history[: -(STALL_STEPS + 1)]
    near = smoothed <= floor + FLOOR_BAND * (chance - floor)
    stalled = len(history) > STALL_STEPS and smoothed > history[0] * (1 - STALL)
    if not (near and stalled):
        return []
    return _finding(
        view,
        state,
        f"the loss has stopped at {fmt(smoothed)}, just above {fmt(floor)} = ln(1 + (C-1)/e), the lowest a "
        f"cross-entropy of probabilities can reach (C = {classes}; from logits it would go on towards 0)",
    )


def _finding(view: RunView, state: dict, why: str) -> list[Finding]:
    state["done"] = True
    layer = view.output_module()
    message = (
        f"the model's outputs are probabilities (non-negative rows summing to 1 over {state['classes']} classes"
        f"{f', from {layer!r}' if layer else ''}) and {why}: the softmax is applied twice"
    )
    evidence = {"classes": state["classes"], "source": "live"}
    return [view.finding(RULE_ID, message, layer=layer or None, evidence=evidence)]
