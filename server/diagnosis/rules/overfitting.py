"""overfitting: the validation loss turned up and keeps rising while the training loss still falls.

Sources: the guides on early stopping and validation monitoring; UMLAUT
(CHI'21: validation loss up while training loss is not). Signals: the
`val_loss` scalar (`mon.log(val_loss=...)`, at each evaluation) and `loss`.

A validation loss is noisy (a small held-out set, dropout off, a decaying
LR), so one bad evaluation proves nothing; a real trend is required, all of:
- no new best for the last PATIENCE evaluations, and either those evaluations
  rose one after another, or all of them are RISE above the best;
- the latest is RISE above the best, and the rise is at least
  MIN_RISE_OF_GAIN of what validation had gained from its first evaluation to
  its best (a wobble of a few % of the progress is noise, not a turn);
- the training loss (mean of the last TRAIN_SMOOTH losses) is lower now than
  at the best evaluation: the model still fits the training set better.
The message names the step of the best evaluation: the checkpoint to keep.
A validation loss that was never better than chance is not overfitting (there
was no good checkpoint to stop at): that is `loss_at_chance`'s finding.
"""

from __future__ import annotations

import math

from layerwatch.server.diagnosis.references import chance_level
from layerwatch.server.diagnosis.rules import loss_at_chance
from layerwatch.server.diagnosis.view import RunView, fmt
from layerwatch.server.records import Finding

RULE_ID = "overfitting"

PATIENCE = 3  # DIAGNOSTICS.md: validation loss rising for 3 evaluations
RISE = 0.10  # DIAGNOSTICS.md: (or) > 10% above its best
MIN_RISE_OF_GAIN = 0.08  # rise >= 8% of the gain first -> best (healthy val noise here <= 4%)
TRAIN_SMOOTH = 20  # training losses averaged to say "still falling"


def check(view: RunView, state: dict) -> list[Finding]:
    scalars = view.record.scalars
    loss = scalars.get("loss")
    if loss is not None and math.isfinite(loss):
        recent = state.setdefault("train", [])
        recent.append(loss)
        del recent[:-TRAIN_SMOOTH]
    val = scalars.get("val_loss")
    if val is None or not math.isfinite(val):
        return []
    train = state.get("train")
    train_now = sum(train) / len(train) if train else None
    evals = state.setdefault("evals", [])  # (step, val_loss) of the evaluations since the best
    state.setdefault("first", val)
    if val < state.get("best", math.inf):
        state["best"], state["best_step"], state["train_at_best"] = val, view.step, train_now
        evals.clear()
        return []
    evals.append((view.step, val))
    best, first = state["best"], state["first"]
    if len(evals) < PATIENCE:
        return []
    since_best = [best] + [v for _, v in evals]
    last = since_best[-PATIENCE:]
    rising = all(a < b for a, b in zip(since_best[-PATIENCE - 1 :], last))
    high = best + RISE * abs(best)
    if not (rising or all(v > high for v in last)):
        return []
    rise = val - best
    if val <= high or rise < MIN_RISE_OF_GAIN * (first - best):
        return []
    chance = chance_level(view)
    if chance is not None and best >= (1 - loss_at_chance.BAND) * chance.loss:
        return []  # never better than chance: nothing to stop early at (loss_at_chance)
    train_at_best = state.get("train_at_best")
    if train_now is None or train_at_best is None or not train_now < train_at_best:
        return []
    message = (
        f"the validation loss rose to {fmt(val)} from its best {fmt(best)} (+{fmt(100 * rise / abs(best))}%) "
        f"over {len(evals)} evaluations while the training loss fell from {fmt(train_at_best)} to {fmt(train_now)}; "
        f"the best checkpoint was at step {state['best_step']}"
    )
    evidence = {
        "val_loss": val,
        "best_val_loss": best,
        "best_step": state["best_step"],
        "evaluations_since_best": len(evals),
        "train_loss_at_best": train_at_best,
        "train_loss_now": train_now,
    }
    return [view.finding(RULE_ID, message, evidence=evidence)]
