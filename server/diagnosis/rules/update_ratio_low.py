"""update_ratio_low: the whole model barely moves: its median update ratio is tiny, reading after reading.

Sources: CS231n ("ratio of updates to weights about 1e-3"); DL4J; DeepDiagnosis
(ICSE'22: outside [1e-5, 1e-1]). Signal: each weight's update ratio
(`view.update_readings`: the per-step readings, the same steps on every
machine, or an older client's samples), and the `lr` scalars (one per group).

Counted: parameters the optimizer holds (`in_optimizer`) that received a
gradient; a parameter outside every group is weights_not_updating's. Not
flagged while the LR is at the end of a decay schedule (below
LR_DECAYED of the highest LR seen, where small updates are the point) or still
rising (warm-up from ~0).
"""

from __future__ import annotations

import math

from layerwatch.server.diagnosis.view import RunView, fmt, median
from layerwatch.server.records import Finding

RULE_ID = "update_ratio_low"

RATIO_LOW = 1e-7  # DIAGNOSTICS.md; DeepDiagnosis' lower bound is 1e-5, kept lower to stay quiet
SUSTAIN = 3  # consecutive readings below RATIO_LOW
LR_DECAYED = 0.01  # the LR below 1% of its peak: the end of a decay schedule


def check(view: RunView, state: dict) -> list[Finding]:
    lr = _lr(view)
    if lr is not None:
        state["peak_lr"] = max(state.get("peak_lr", 0.0), lr)
    readings = view.update_readings()
    if not readings:
        return []
    has_optimizer = view.optimizer is not None
    ratios = [
        r.ratio
        for r in readings
        if not (has_optimizer and r.description.get("in_optimizer") is False)
        and r.grad_rms  # no gradient reached it this step: nothing to update with
        and math.isfinite(r.grad_rms)  # a NaN/Inf one is non_finite's
    ]
    history: list = state.setdefault("history", [])
    typical = median(ratios) if ratios else math.nan
    if not ratios or not typical < RATIO_LOW:
        history.clear()
        return []
    history.append((view.step, typical, lr))
    if len(history) < SUSTAIN:
        return []
    recent = history[-SUSTAIN:]
    peak = state.get("peak_lr", 0.0)
    if lr is not None:
        if peak > 0 and lr < LR_DECAYED * peak:
            return []  # the end of a decay schedule: tiny updates are intended
        first_lr = recent[0][2]
        if first_lr is not None and lr > first_lr:
            return []  # the LR is still rising (warm-up): wait until it stops
    message = (
        f"the model's median update ratio ||dw||/||w|| is {fmt(typical)} over the last {len(recent)} readings "
        f"(steps {recent[0][0]}..{recent[-1][0]}, below {RATIO_LOW}; about 1e-3 is healthy)"
        + (f" with lr = {fmt(lr)}" if lr is not None else "")
    )
    evidence = {"median_update_ratio": typical, "recent": [r[1] for r in recent], "lr": lr, "peak_lr": peak}
    return [view.finding(RULE_ID, message, evidence=evidence)]


def _lr(view: RunView) -> float | None:
    """The highest LR over the param groups at this step ("lr", "lr/1", ...)."""
    lrs = [v for k, v in view.record.scalars.items() if (k == "lr" or k.startswith("lr/")) and math.isfinite(v)]
    return max(lrs) if lrs else None
