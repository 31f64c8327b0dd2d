"""amp_steps_skipped: the GradScaler skips most optimizer steps, so the model barely trains.

Source: the PyTorch AMP docs (`torch.amp.GradScaler`): a step whose unscaled
gradients hold inf/NaN is skipped and the scale multiplied by `backoff_factor`
(0.5); after `growth_interval` (2000) clean steps it grows again. So a healthy
fp16 run skips a few steps at the start, while the scale finds its level (about
one per halving from 2**16), then about one step in 2000. Micikevicius et al.
2018 (Mixed Precision Training) describe the same dynamic loss scaling.

Signal: the per-step `skipped` flag (the client sees `scaler.step()` return
without running the optimizer step). Over the last WINDOW steps that carried
signals, more than SKIPPED_SHARE skipped: the scale keeps collapsing, i.e. the
gradients overflow float16 whatever the scale (activations past 65504, a too-high
learning rate), or the scaler was misused (the loss scaled twice).
"""

from __future__ import annotations

from collections import deque

from layerwatch.server.diagnosis.view import RunView, fmt
from layerwatch.server.records import Finding

RULE_ID = "amp_steps_skipped"

WINDOW = 50  # recent steps judged: after the scale's warm-up (~16 halvings from 2**16) is out of the window
MIN_STEPS = 30  # judge only with this many steps in the window
SKIPPED_SHARE = 0.5  # more than half of the recent steps skipped: no longer a warm-up or a rare overflow


def check(view: RunView, state: dict) -> list[Finding]:
    signals = view.record.signals
    if not signals:
        return []
    recent: deque[bool] = state.setdefault("recent", deque(maxlen=WINDOW))
    recent.append(bool(signals.get("skipped")))
    if len(recent) < MIN_STEPS:
        return []
    skipped = sum(recent)
    if skipped <= SKIPPED_SHARE * len(recent):
        return []
    scale = view.series("loss_scale", last=1)
    scale_text = f"; the loss scale is now {fmt(scale[-1][1])}" if scale else ""
    message = (
        f"{skipped} of the last {len(recent)} optimizer steps were skipped by the GradScaler (inf/NaN gradients)"
        f"{scale_text}: the weights are updated on a minority of steps"
    )
    evidence = {
        "skipped_steps": skipped,
        "window_steps": len(recent),
        "loss_scale": scale[-1][1] if scale else None,
    }
    return [view.finding(RULE_ID, message, evidence=evidence)]
