"""amp_overflow: the GradScaler skips most optimizer steps, or its scale collapses: float16 overflows.

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
learning rate), or the scaler was misused (the loss scaled twice). Or the logged
`loss_scale` fell below SCALE_FLOOR: the scaler starts at 2**16 and only goes below 1
when even unscaled gradients overflow, so half precision itself is out of range.
"""

from __future__ import annotations

from collections import deque

from layerwatch.server.diagnosis.view import RunView, fmt
from layerwatch.server.records import Finding

RULE_ID = "amp_overflow"

WINDOW = 50  # recent steps judged: after the scale's warm-up (~16 halvings from 2**16) is out of the window
MIN_STEPS = 30  # judge only with this many steps in the window
SKIPPED_SHARE = 0.5  # more than half of the recent steps skipped: no longer a warm-up or a rare overflow
SCALE_FLOOR = 1.0  # a loss scale below 1: gradients overflow float16 unscaled (the default start is 2**16)


def check(view: RunView, state: dict) -> list[Finding]:
    signals = view.record.signals
    if not signals:
        return []
    recent: deque[bool] = state.setdefault("recent", deque(maxlen=WINDOW))
    recent.append(bool(signals.get("skipped")))
    skipped = sum(recent)
    scale = view.record.scalars.get("loss_scale")
    collapsed = scale is not None and scale < SCALE_FLOOR
    most = len(recent) >= MIN_STEPS and skipped > SKIPPED_SHARE * len(recent)
    if not (most or collapsed):
        return []
    scale_text = f"; the loss scale is {fmt(scale)}" if scale is not None else ""
    if most:
        message = (
            f"{skipped} of the last {len(recent)} optimizer steps were skipped by the GradScaler (inf/NaN "
            f"gradients){scale_text}: the weights are updated on a minority of steps"
        )
    else:
        message = (
            f"the GradScaler's loss scale fell to {fmt(scale)} (it starts at 65536): the gradients overflow "
            "float16 even unscaled"
        )
    evidence = {"skipped_steps": skipped, "window_steps": len(recent), "loss_scale": scale}
    return [view.finding(RULE_ID, message, evidence=evidence)]
