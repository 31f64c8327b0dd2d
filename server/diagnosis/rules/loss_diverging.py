"""loss_diverging: the loss has doubled from where it started and is still rising, sits far above it, or jumped.

Sources: the training-debugging guides ("loss growing -> sign flipped": the
optimizer maximises; "exploding -> LR too high"). Signals: the `loss` and `lr`
scalars, the run's initial loss and chance level (`references`).

Smoothing is a running median of the last SMOOTH losses (one outlier batch
moves it little). The reference is where the run started: the lowest of the
median of its first EARLY losses, its very first loss, and its chance level
when it is a classification. Not a window of early losses alone: an LR far too
high explodes the loss within a few steps (2.4 -> 4e11 by step 6, a Lightning
CNN at SGD lr 5), and a window holding the explosion would make it the norm.
"Doubled" is measured on the loss's own scale, reference + (DIVERGE_FACTOR - 1)
* |reference|, so a loss that starts negative (a Gaussian NLL) is judged by how
far it rose, not by a ratio of negatives.

Three ways to fire:
- diverging: above the doubled reference and still rising (above its value
  WINDOW losses ago) - critical;
- held: above the doubled reference for WINDOW losses in a row, rising or not
  (a recurrent LM at SGD lr 50 whose loss jumps from chance to 2-3x chance in
  its first steps and stays there, spiking) - critical;
- a jump: the loss level (median of the last LEVEL losses) has stayed above
  JUMP_FACTOR x the best level of the run, giving back at least JUMP_OF_GAIN
  of what the run had gained from its first loss to that best, for JUMP_STEPS
  steps (an LR raised 100x mid-run: +47%, for good) - a warning. (A loss near
  0 doubles from 0.009 to 0.018 in healthy noise: 1% of its gain, no jump.) Not when the LR was raised to
  at most its earlier peak (a warm restart, SGDR: the loss rises on purpose).
- a spike that was never recovered from: the smoothed loss went SPIKE_FACTOR
  above the reference, came back, and for SETTLE_STEPS steps after its peak
  has not got RECOVER below the reference (AdamW at 100x its LR on a small
  causal LM: 3.5 -> 14.5 at step 3, then ~3.3, just under chance, for good) - a
  warning, with "lower the LR" as the remedy (loss_at_chance then defers: the
  loss is at chance because of the LR, not the data).
A healthy run with warm-up or noisy SGD dips below its start and stays there.
"""

from __future__ import annotations

import math

from layerwatch.server.diagnosis.references import chance_level, initial_loss
from layerwatch.server.diagnosis.view import RunView, fmt, median
from layerwatch.server.records import Finding

RULE_ID = "loss_diverging"

DIVERGE_FACTOR = 2.0  # DIAGNOSTICS.md: smoothed loss > 2x its early smoothed value
WINDOW = 20  # losses: "still rising" = the smoothed loss is above its value WINDOW losses ago
SMOOTH = 10  # losses in the running median (batch noise of a few 10% is smoothed away)
EARLY = 10  # the first losses whose median may define the reference
LEVEL = 30  # losses in the level a jump is measured with (noise of small batches averages out)
JUMP_FACTOR = 1.3  # a level 30% above the run's best, held: the case rose 47%
JUMP_OF_GAIN = 0.2  # ... and back up by 20% of the gain from the first loss to the best level
JUMP_STEPS = 20  # steps the raised level must hold (with LEVEL's lag: ~35 steps after the jump)
RESTART = 1.01  # an lr back at <= 1.01x its earlier peak is a restart of the schedule, not a fault
SPIKE_FACTOR = 1.5  # a smoothed loss 50% above the start is a spike (a median of 10: not one bad batch) ...
RECOVER = 0.1  # ... after which a loss 10% below the start has recovered (it learns) ...
SETTLE_STEPS = 40  # ... and one that has not within this many steps of the peak has not


def check(view: RunView, state: dict) -> list[Finding]:
    if view.adversarial:
        return []  # one side of a game (attach(objective="adversarial")): its loss is not driven to a minimum
    loss = view.record.scalars.get("loss")
    lr = view.record.scalars.get("lr")
    if lr is not None and math.isfinite(lr):
        _track_lr(state, lr)
    if loss is None or not math.isfinite(loss):
        return []  # a NaN/Inf loss is non_finite's
    recent = state.setdefault("recent", [])
    recent.append(loss)
    del recent[:-SMOOTH]
    smoothed = median(recent)
    history = state.setdefault("smoothed", [])  # the last WINDOW + 1 smoothed values
    history.append(smoothed)
    del history[: -(WINDOW + 1)]
    state["count"] = count = state.get("count", 0) + 1
    if count == EARLY:
        state["early"], state["early_step"] = _reference(view, smoothed)
    early = state.get("early")
    peak = state.get("peak")
    if peak is None or smoothed > peak[0]:
        state["peak"] = (smoothed, view.step)
    findings = _jump(view, state, loss, lr)
    if early is None:
        return findings
    limit = early + (DIVERGE_FACTOR - 1) * abs(early)
    findings += _spiked(view, state, smoothed, early)
    if len(history) <= WINDOW:
        return findings
    before = history[0]
    state["held"] = held = state.get("held", 0) + 1 if smoothed > limit else 0
    rising = smoothed > limit and smoothed > before
    if not (rising or held >= WINDOW):
        return findings
    state["spike_told"] = True  # this finding says it already
    how = f"and still rising: {fmt(before)} {WINDOW} losses ago" if rising else f"for the last {held} losses"
    message = (
        f"the loss (median of the last {SMOOTH}) is {fmt(smoothed)}, {fmt(_times(smoothed, early))}x "
        f"the start, its early value {fmt(early)} ({state['early_step']}), {how}"
    )
    evidence = {"smoothed": smoothed, "early": early, "early_from": state["early_step"], "before": before}
    remedy = None
    if not rising:
        # Held high without climbing further: the weights were thrown far in a few large steps and
        # stay there. A flipped sign (the catalogue's first suspect) climbs on and on instead.
        remedy = (
            f"Lower the learning rate (by 10x to start with): the loss went to {fmt(_times(smoothed, early))}x its "
            "start and stays there without climbing further, what steps too large for the model do (a flipped "
            "sign would make it climb on)."
        )
    return findings + [view.finding(RULE_ID, message, evidence=evidence, remedy=remedy)]


def _spiked(view: RunView, state: dict, smoothed: float, early: float) -> list[Finding]:
    """The loss shot SPIKE_FACTOR above the start, came back, and has not got below where it started since."""
    peak, peak_step = state["peak"]
    if state.get("spike_told") or peak <= early + (SPIKE_FACTOR - 1) * abs(early):
        return []
    floor = early - RECOVER * abs(early)
    if smoothed < floor:
        state["spike_told"] = True  # it recovered and learns: a transient, not this finding
        return []
    if view.step - peak_step < SETTLE_STEPS:
        return []
    state["spike_told"] = True
    message = (
        f"the loss (median of the last {SMOOTH}) shot up to {fmt(peak)} at step {peak_step}, "
        f"{fmt(_times(peak, early))}x the start, its early value {fmt(early)} ({state['early_step']}); in the "
        f"{view.step - peak_step} steps since, it came back down but never below {fmt(floor)}: it is {fmt(smoothed)}"
    )
    remedy = (
        "Lower the learning rate (or add a warm-up): the first updates threw the weights to where the loss "
        "exploded, and training has not recovered the ground it lost."
    )
    evidence = {"peak": peak, "peak_step": peak_step, "early": early, "smoothed": smoothed}
    return [view.finding(RULE_ID, message, evidence=evidence, severity="warning", remedy=remedy)]


def _reference(view: RunView, early_median: float) -> tuple[float, str]:
    """The lowest of the early median, the first loss and the chance level, and which it was."""
    candidates = [(early_median, f"median of the first {EARLY} losses")]
    first = initial_loss(view)
    if first is not None:
        candidates.append((first, "the first loss"))
    chance = chance_level(view)
    if chance is not None:
        candidates.append((chance.loss, f"chance level, {chance.source}"))
    # On its own scale: for a loss that starts negative, "lowest" is still the least risen-from.
    return min(candidates, key=lambda c: c[0])


def _track_lr(state: dict, lr: float) -> None:
    state["peak_lr"] = max(state.get("peak_lr", lr), lr)


def _jump(view: RunView, state: dict, loss: float, lr: float | None) -> list[Finding]:
    levels = state.setdefault("level_losses", [])
    levels.append(loss)
    del levels[:-LEVEL]
    if len(levels) < LEVEL or state.get("jump_told"):
        return []
    level = median(levels)
    best = state.get("best_level")
    if best is None or level < best[0]:
        state["best_level"] = (level, view.step)
        state["lr_at_best"], state["peak_at_best"] = lr, state.get("peak_lr")
        state["jump_run"] = 0
        return []
    first = initial_loss(view)
    gain = first - best[0] if first is not None else 0.0
    if best[0] <= 0 or level <= JUMP_FACTOR * best[0] or level - best[0] < JUMP_OF_GAIN * gain or gain <= 0:
        state["jump_run"] = 0
        return []
    state["jump_run"] = run = state.get("jump_run", 0) + 1
    if run < JUMP_STEPS:
        return []
    lr_at_best = state.get("lr_at_best")
    peak = state.get("peak_at_best")
    if lr is not None and lr_at_best is not None and peak is not None and lr_at_best * RESTART < lr <= peak * RESTART:
        return []  # raised, but to no more than an lr the run already had: a warm restart of the schedule
    state["jump_told"] = True
    message = (
        f"the loss level (median of the last {LEVEL}) jumped to {fmt(level)}, {fmt(level / best[0])}x its best "
        f"{fmt(best[0])} (step {best[1]}), and has stayed there for {run} steps"
    )
    remedy = None
    if lr is not None and lr_at_best is not None and lr != lr_at_best:
        message += f"; the lr went from {fmt(lr_at_best)} to {fmt(lr)}"
        if lr > lr_at_best * RESTART:
            remedy = (
                f"Lower the learning rate back towards {fmt(lr_at_best)}: it rose to {fmt(lr)} (past anything the "
                f"schedule had) and the loss level rose with it; resume from the checkpoint before the jump."
            )
    evidence = {"level": level, "best_level": best[0], "best_step": best[1], "steps": run, "lr": lr}
    return [view.finding(RULE_ID, message, evidence=evidence, severity="warning", remedy=remedy)]


def _times(value: float, early: float) -> float:
    """How many times the early value (on its own scale, for a negative start)."""
    return 1 + (value - early) / abs(early) if early else math.inf
