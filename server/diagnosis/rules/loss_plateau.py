"""loss_plateau: the smoothed loss has not improved by more than 1% for PLATEAU_STEPS, far above its start.

Source: the training-debugging guides ("plateau -> raise LR, remove
regularization"). Signal: the `loss` scalar and the `lr` scalar.

The smoothed loss is the mean of the last SMOOTH losses; "improved" compares
its best value within the last PLATEAU_STEPS losses with its best before
them, so slow but steady progress never counts as a plateau, and noise that
only wobbles around a level does. Only while the smoothed loss is still above
STILL_HIGH of the initial one: a run that converged and flattened is far
below its start. Not flagged during LR warm-up (the LR still rising over the
window: the run has not had its real LR yet), nor when the loss is more than
FLAT above its best (that is a loss getting worse, not a plateau), nor while the LR is 0, nor for a
loss whose initial value is not positive (a fraction of it means nothing).

Nor where the learning-rate schedule explains the flat loss, because "raise the LR" would be wrong
advice there: at the planned end of a decay (the LR below DECAYED of the highest it has been, e.g.
the tail of a cosine schedule), or just after a cut (the LR fell below CUT of its value at the
window's start: a step decay; the loss needs the window to settle at the new LR). Nor when the
updates are already large (the latest sample's median update-to-weight ratio above LARGE_UPDATES,
DL4J's "above 1e-2 is a problem"): a loss stuck while the weights move that much is an LR too
*high* (update_ratio_high's), and raising it would be the wrong direction. Nor at a classifier's
chance level while the weights do move (`loss_at_chance`: the inputs or labels, not the LR),
nor when the gradients say why (most exactly zero: `dead_network`; vanished: `vanishing_gradients`),
nor after a finding of CAUSES (a double softmax, a broadcast target, a body that gets no gradient, a
loss that blew up): each names why the loss is stuck, with its own remedy.
"""

from __future__ import annotations

import math

from layerwatch.server.diagnosis.rules import dead_network, loss_at_chance, vanishing_gradients
from layerwatch.server.diagnosis.view import RunView, fmt
from layerwatch.server.records import Finding

RULE_ID = "loss_plateau"
# Findings that explain a stuck loss, with a remedy that "raise the LR" would contradict.
CAUSES = ("softmax_before_loss", "shape_mismatch", "no_gradient", "loss_diverging")

PLATEAU_STEPS = 50  # losses without a >1% improvement (a few dozen steps: "caught early")
MIN_IMPROVEMENT = 0.01  # DIAGNOSTICS.md: no >1% improvement of the smoothed loss
STILL_HIGH = 0.5  # DIAGNOSTICS.md: while still > 50% of the initial loss
SMOOTH = 10  # losses in the running mean
FLAT = 0.1  # a plateau is flat: the smoothed loss within 10% of its best
INITIAL = 5  # the first losses whose mean is the initial loss
DECAYED = 0.1  # lr below 10% of its peak: the end of a decay schedule, where a flat loss is planned
CUT = 0.5  # lr halved (or more) within the window: a step decay just happened
LARGE_UPDATES = 1e-2  # median update ratio above this: the LR is not too low (DL4J's upper bound)


def check(view: RunView, state: dict) -> list[Finding]:
    if view.adversarial:
        return []  # one side of a game (attach(objective="adversarial")): its loss is not driven to a minimum
    rec = view.record
    loss = rec.scalars.get("loss")
    if loss is None or not math.isfinite(loss):
        return []
    recent = state.setdefault("recent", [])
    recent.append(loss)
    del recent[:-SMOOTH]
    if len(recent) == INITIAL and "initial" not in state:
        state["initial"] = sum(recent) / len(recent)
    initial = state.get("initial")
    if initial is None or initial <= 0 or len(recent) < SMOOTH:
        return []
    smoothed = sum(recent) / len(recent)
    window = state.setdefault("window", [])  # (step, smoothed, lr) of the last PLATEAU_STEPS losses
    lr_now = rec.scalars.get("lr")
    window.append((view.step, smoothed, lr_now))
    if lr_now is not None and math.isfinite(lr_now):
        state["peak_lr"] = max(state.get("peak_lr", 0.0), lr_now)
    if len(window) > PLATEAU_STEPS:
        step_out, dropped, _ = window.pop(0)
        if dropped < state.get("best_before", math.inf):
            state["best_before"], state["best_step"] = dropped, step_out
    best_before = state.get("best_before")
    if best_before is None:
        return []  # not yet PLATEAU_STEPS smoothed losses to compare with
    best_now = min(s for _, s, _ in window)
    if best_now < best_before * (1 - MIN_IMPROVEMENT) or smoothed <= STILL_HIGH * initial:
        return []
    if smoothed > min(best_now, best_before) * (1 + FLAT):
        return []  # worse than its best: rising or swinging (loss_diverging's, loss_oscillating's), not flat
    lrs = [lr for _, _, lr in window if lr is not None]
    if lrs and (lrs[-1] <= 0 or lrs[-1] > lrs[0] * 1.001):
        return []  # lr 0 (frozen on purpose) or still warming up
    if lrs and (lrs[-1] < DECAYED * state.get("peak_lr", 0.0) or lrs[-1] < CUT * lrs[0]):
        return []  # the schedule's decay or a cut explains the flat loss: raising the lr is not the remedy
    if dead_network.mostly_zero(view) or vanishing_gradients.vanished(view):
        return []  # dead_network's or vanishing_gradients' finding, with the remedy for that cause
    if any(view.told(rule) for rule in CAUSES):
        return []  # a finding that names why the loss is stuck, whose remedy is not "raise the LR"
    if loss_at_chance.at_chance(view, smoothed):
        return []  # at chance with normal updates: inputs or labels, loss_at_chance's finding and remedy
    if view.median_update_ratio() > LARGE_UPDATES:
        return []  # the weights move a lot: whatever stalls the loss, a higher LR is not the cure
    first_step = window[0][0]
    message = (
        f"the loss (mean of the last {SMOOTH}) is {fmt(smoothed)}, {fmt(100 * smoothed / initial)}% of its initial "
        f"{fmt(initial)}, and has not improved by more than {fmt(100 * MIN_IMPROVEMENT)}% since step {first_step} "
        f"(best {fmt(best_now)} since then, {fmt(best_before)} before)"
    )
    if lrs:
        message += f"; lr = {fmt(lrs[-1])}"
    evidence = {"smoothed": smoothed, "initial": initial, "best_before": best_before, "best_since": best_now}
    evidence["since_step"] = first_step
    return [view.finding(RULE_ID, message, evidence=evidence)]
