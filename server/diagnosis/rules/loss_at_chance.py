"""loss_at_chance: a classifier's loss stays at chance level, or its validation loss does while training falls.

Sources: "37 reasons why your neural network is not working" (#17: the loss
at chance is -ln(1/C); #4: check that the inputs are connected to the
outputs). Signals: `loss`, `val_loss`, and the run's chance level
(`references.chance_level`: the entropy of the labels seen, or ln C of the
head's width when the first loss says it is a classification).

Two ways to fire, both meaning "the model learnt nothing that depends on its
inputs":
- training: after START steps, the mean of the last SMOOTH losses stays
  within BAND of chance, without a MIN_PROGRESS drop, for STUCK_STEPS steps
  while the LR is not rising (a warm-up from ~0, as language models use, keeps
  the loss at chance until the LR is real): inputs that do not reach the
  model, or labels that do not belong to them;
- validation: no evaluation so far has beaten chance by more than BAND, the
  last PATIENCE of them are not improving, and the training loss is below
  FITTING of chance: the model fits its training labels and nothing carries
  over (labels shuffled apart from their inputs; a validation set paired
  wrongly). A healthy model's first evaluations follow its training loss down;
  one that overfits later beat chance first (that is `overfitting`'s case).

Not fired where another rule names the cause with the right remedy: most
gradients exactly zero (`dead_network`), no gradient at all, gradients that
vanished on the way to the first layer (`vanishing_gradients`), a loss that
diverged or spiked and never recovered (`loss_diverging`: the LR), or updates too
slow to move the weights (the first sample's median update ratio below
SLOW_UPDATES: an LR too low, loss_plateau's "raise the LR"; the first sample,
at step 0 at any interval, so the verdict does not depend on the sampling).
"""

from __future__ import annotations

import math

from layerwatch.server.diagnosis.references import chance_level
from layerwatch.server.diagnosis.rules import dead_network, vanishing_gradients
from layerwatch.server.diagnosis.view import RunView, fmt
from layerwatch.server.records import Finding

RULE_ID = "loss_at_chance"

BAND = 0.05  # within 5% of the chance level: what a model ignoring its inputs scores, give or take noise
START = 10  # steps before the training loss is judged (the first updates move it off its init value)
SMOOTH = 20  # losses averaged
# Steps the smoothed loss stays at chance: with START and SMOOTH it fires at ~step 48 for a fault present
# from the start, within 50 steps of it.
STUCK_STEPS = 30
MIN_PROGRESS = 0.015  # the smoothed loss falling by 1.5% over STUCK_STEPS steps is learning, however slow
PATIENCE = 2  # evaluations at chance, the last no better than the one before
# Training loss below 92% of chance: it has learnt something of its labels (memorising 300 random labels,
# the suite's digits MLP gets there ~40 steps after its loss leaves chance; a healthy model's validation
# has long followed it below chance by then).
FITTING = 0.92
# Median update ratio below this: the LR may be why nothing is learnt (CS231n's healthy ~1e-3, /10).
SLOW_UPDATES = 1e-4


def check(view: RunView, state: dict) -> list[Finding]:
    if view.adversarial:
        return []  # one side of a game (attach(objective="adversarial")): its loss is not driven to a minimum
    chance = chance_level(view)
    scalars = view.record.scalars
    loss = scalars.get("loss")
    if loss is not None and math.isfinite(loss):
        recent = state.setdefault("recent", [])
        recent.append(loss)
        del recent[:-SMOOTH]
    if chance is None or chance.loss <= 0:
        return []
    findings = []
    if not state.get("train_done"):
        findings += _training(view, state, chance)
    val = scalars.get("val_loss")
    if val is not None and math.isfinite(val) and not state.get("val_done"):
        findings += _validation(view, state, chance, val)
    return findings


def _training(view: RunView, state: dict, chance) -> list[Finding]:
    recent = state.get("recent") or []
    if view.record.scalars.get("loss") is None or view.step < START or len(recent) < SMOOTH:
        return []
    smoothed = sum(recent) / len(recent)
    history = state.setdefault("smoothed", [])  # smoothed losses of the current stretch at chance
    if abs(smoothed - chance.loss) > BAND * chance.loss or _explained(view):
        history.clear()
        return []
    history.append((view.step, smoothed, view.record.scalars.get("lr")))
    del history[:-STUCK_STEPS]
    if len(history) < STUCK_STEPS:
        return []
    first_step, first, first_lr = history[0]
    if smoothed < first * (1 - MIN_PROGRESS):
        return []  # slow, but learning
    lr = history[-1][2]
    if lr is not None and first_lr is not None and lr > first_lr * 1.001:
        return []  # still warming up: the run has not had its real LR yet
    state["train_done"] = True
    message = (
        f"the training loss (mean of the last {SMOOTH}) has stayed at {fmt(smoothed)} since step {first_step}, "
        f"within {fmt(100 * BAND)}% of the chance level {fmt(chance.loss)} ({chance.source}): the model predicts "
        f"no better than from the class frequencies alone"
    )
    evidence = {"smoothed": smoothed, "chance": chance.loss, "classes": chance.classes, "since_step": first_step}
    return [view.finding(RULE_ID, message, evidence=evidence)]


def _validation(view: RunView, state: dict, chance, val: float) -> list[Finding]:
    if val < (1 - BAND) * chance.loss:
        state["val_done"] = True  # it beat chance once: it learnt something that carries over
        return []
    evals = state.setdefault("evals", [])
    evals.append((view.step, val))
    del evals[:-PATIENCE]
    recent = state.get("recent") or []
    train = sum(recent) / len(recent) if recent else None
    if len(evals) < PATIENCE or train is None or train > FITTING * chance.loss:
        return []
    if evals[-1][1] < evals[0][1]:
        return []  # still improving, however slowly
    state["val_done"] = True
    message = (
        f"the validation loss is {', '.join(fmt(v) for _, v in evals)} over the last {PATIENCE} evaluations, no "
        f"better than the chance level {fmt(chance.loss)} ({chance.source}), while the training loss fell to "
        f"{fmt(train)}: the model memorises its training labels and learns nothing that carries over"
    )
    evidence = {"val_losses": [v for _, v in evals], "train_loss": train, "chance": chance.loss}
    return [view.finding(RULE_ID, message, evidence=evidence)]


def at_chance(view: RunView, smoothed: float) -> bool:
    """Whether a smoothed training loss is this rule's case: at chance, with no other rule's cause.
    (loss_plateau leaves such a loss alone: its "raise the LR" would be the wrong remedy.)"""
    chance = chance_level(view)
    return (
        chance is not None
        and chance.loss > 0
        and abs(smoothed - chance.loss) <= BAND * chance.loss
        and not _explained(view)
    )


def _explained(view: RunView) -> bool:
    """Another rule's finding, with its own remedy: a dead network, vanished gradients, slow updates."""
    if dead_network.mostly_zero(view) or vanishing_gradients.vanished(view):
        return True
    if view.told("loss_diverging"):
        return True  # the loss blew up first (an LR spike never recovered from, a jump): the LR is the cause
    return view.median_update_ratio(first=True) < SLOW_UPDATES  # False when NaN (no sample yet)
