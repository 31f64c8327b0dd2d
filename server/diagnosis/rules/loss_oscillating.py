"""loss_oscillating: the loss swings widely from one stretch of steps to the next, without making progress.

Source: the training-debugging guides ("oscillating -> lower LR, check labels
and augmentation"). Signal: the `loss` scalar.

The statistic, over the last WINDOW losses cut into BLOCKS blocks of equal
length, with m_i the block means:
- swing = total variation sum |m_(i+1) - m_i|, relative to the window's mean
  loss: SWING_MIN means the loss level moves by about its own size;
- progress = m_1 - m_last: the swing must exceed PROGRESS_RATIO x |progress|
  (a run still descending, or one diverging, changes a lot from block to block
  too, but in one direction);
- noise ratio = variance of the block means / (mean variance within a block /
  block length): about 1 when the blocks differ only by batch-to-batch noise
  (small batches, dropout, hard examples), large when the level itself
  jumps; it must exceed NOISE_RATIO_MIN, so noisy but healthy SGD stays quiet;
- the last block is still NOT_AT_BEST above the window's best block (one spike
  followed by recovery to a new low is not an oscillation);
- the LR did not rise within the window (warm restarts, cyclic schedules: the
  loss rises with the LR on purpose, by RAISED or more);
- the level is still above CONVERGED of the run's first loss: a loss that has
  fallen to ~0 (a small transformer fitting its task to 1e-3) swings by its own
  size from batch to batch, and that is convergence, not oscillation.
"""

from __future__ import annotations

import math

from layerwatch.server.diagnosis.references import initial_loss
from layerwatch.server.diagnosis.view import RunView, fmt
from layerwatch.server.records import Finding

RULE_ID = "loss_oscillating"

WINDOW = 60  # losses looked at (a few dozen steps: "caught early")
BLOCKS = 6  # blocks of WINDOW / BLOCKS = 10 losses
SWING_MIN = 1.0  # total variation of block means >= the mean loss (healthy runs: < 1 in our suite)
PROGRESS_RATIO = 3.0  # "variation >> net decrease" (DIAGNOSTICS.md): swing > 3x the net decrease
NOT_AT_BEST = 0.5  # the last block still >= 1.5x the window's best block: no progress
NOISE_RATIO_MIN = 5.0  # block means vary >= 5x what batch noise alone explains
RAISED = 1.5  # the lr rising 1.5x within the window: a restart or a cycle of the schedule
CONVERGED = 0.05  # a level below 5% of the first loss: converged (positive losses only)


def check(view: RunView, state: dict) -> list[Finding]:
    if view.adversarial:
        return []  # one side of a game (attach(objective="adversarial")): its loss is not driven to a minimum
    loss = view.record.scalars.get("loss")
    if loss is None or not math.isfinite(loss):
        return []
    recent = state.setdefault("recent", [])
    recent.append(loss)
    del recent[:-WINDOW]
    lrs = state.setdefault("lrs", [])
    lr = view.record.scalars.get("lr")
    if lr is not None and math.isfinite(lr):
        lrs.append(lr)
        del lrs[:-WINDOW]
    if len(recent) < WINDOW or _lr_rose(lrs):
        return []
    size = WINDOW // BLOCKS
    blocks = [recent[i : i + size] for i in range(0, WINDOW, size)]
    means = [sum(b) / size for b in blocks]
    level = sum(recent) / WINDOW
    swing = sum(abs(b - a) for a, b in zip(means, means[1:]))
    progress = means[0] - means[-1]
    if level <= 0 or swing < SWING_MIN * level or swing <= PROGRESS_RATIO * abs(progress):
        return []
    first = initial_loss(view)
    if first is not None and first > 0 and level < CONVERGED * first:
        return []  # converged to ~0: relative swings of a tiny loss are not oscillation
    if means[-1] <= min(means) * (1 + NOT_AT_BEST):
        return []  # one spike, then the best level of the window: it recovered and is making progress
    within = sum(_var(b) for b in blocks) / BLOCKS
    between = _var(means)
    noise_ratio = between / (within / size) if within > 0 else math.inf
    if noise_ratio < NOISE_RATIO_MIN:
        return []
    message = (
        f"over the last {WINDOW} losses the mean of each {size} swung by {fmt(swing)} in total "
        f"({fmt(swing / level)}x the mean loss {fmt(level)}; block means {', '.join(fmt(m) for m in means)}) "
        f"for a net decrease of {fmt(progress)}; the blocks differ {fmt(noise_ratio)}x more than batch noise explains"
    )
    evidence = {"block_means": means, "swing": swing, "level": level, "progress": progress, "noise_ratio": noise_ratio}
    return [view.finding(RULE_ID, message, evidence=evidence)]


def _lr_rose(lrs: list[float]) -> bool:
    """Whether the lr rose by RAISED or more within the window (from its lowest point before)."""
    low = math.inf
    for lr in lrs:
        if lr > RAISED * low:
            return True
        low = min(low, lr)
    return False


def _var(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / (len(values) - 1)
