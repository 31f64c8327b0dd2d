"""update_ratio_high: one weight tensor's updates are too large for its values, sample after sample.

Sources: CS231n ("the ratio of updates to weights should be about 1e-3");
DL4J's visualisation guide (log10 ratio about -3; above -2 is a problem);
DeepDiagnosis (ICSE'22: outside [1e-5, 1e-1]). Signal: each weight's update
ratio ||w_after - w_before|| / ||w_before|| across one optimizer step, from
the per-step `update_ratios` (every step of the first 50, then every 10th: the
same readings on every machine), or the sampled statistics of an older client
(`view.update_readings`).

Which tensors count: weight matrices and kernels (two or more dimensions).
Biases and normalisation scales are left out: a bias starts at 0, and with
Adam its ratio is ~1/t for its first hundred steps, which says nothing about
the LR. A matrix that starts at 0 or far below the model's other weights
(zero-initialised heads, LoRA's B, small-init output layers) is left out for
the same reason: it is meant to grow fast.

When: after WARMUP_STEPS, any counted tensor above RATIO_HIGH for SUSTAIN
readings spanning SUSTAIN_STEPS steps. Before it, Adam's first updates are lr per element whatever the
gradient, so a high ratio everywhere is expected; only a tensor far above the
rest of the model (OUTLIER_FACTOR x their median) counts then, and SUSTAIN
readings of such an outlier are enough at any time. That early
window matters: a param group with a 10-100x LR under Adam blows its weights
up until the ratio falls back to a few times the others' (the weights are then
~100x too large), so the first steps are where the fault is plainest.
"""

from __future__ import annotations

import math

from layerwatch.server.diagnosis.view import RunView, fmt, median
from layerwatch.server.records import Finding

RULE_ID = "update_ratio_high"

RATIO_HIGH = 1e-1  # DeepDiagnosis' upper bound; DL4J calls anything above 1e-2 a problem
WARMUP_STEPS = 20  # Adam's first steps (bias correction) and any early transient
SUSTAIN = 3  # consecutive readings above RATIO_HIGH ...
# ... spanning this many steps, unless the tensor is far above the rest (OUTLIER_FACTOR) in each of them.
# SGD at lr 0.1 with momentum 0.9 on a small CNN (healthy: tests/faults/test_wiring_rules.py) puts its
# layers above 0.1 together for ~8 steps early on; an LR that is too high keeps them there.
SUSTAIN_STEPS = 20
OUTLIER_FACTOR = 10.0  # during warm-up: this many times the other tensors' median ratio
SMALL_INIT = 0.1  # first weight RMS below this fraction of the others' median: meant to grow, not counted


def check(view: RunView, state: dict) -> list[Finding]:
    readings = view.update_readings()
    if not readings:
        return []
    rows = {r.key: r for r in readings if r.is_matrix}
    excluded: set = state.setdefault("excluded", set())
    seen: set = state.setdefault("seen", set())
    new = [key for key in rows if key not in seen]
    if new:
        scale = median([r.weight_rms for r in rows.values() if r.weight_rms is not None])
        for key in new:
            seen.add(key)
            rms = rows[key].weight_rms
            if rms is None or not rms > 0 or (len(rows) > 1 and rms < SMALL_INIT * scale):
                excluded.add(key)
    ratios = {key: r.ratio for key, r in rows.items() if key not in excluded}
    runs: dict = state.setdefault("runs", {})
    findings = []
    for key, ratio in ratios.items():
        others = [r for k, r in ratios.items() if k != key]
        typical = median(others) if others else math.nan
        outlier = ratio > RATIO_HIGH and math.isfinite(typical) and ratio > OUTLIER_FACTOR * typical
        high = ratio > RATIO_HIGH if view.step >= WARMUP_STEPS else outlier
        history = runs.setdefault(key, [])
        if not high:
            history.clear()
            continue
        history.append((view.step, ratio, outlier))
        if len(history) < SUSTAIN:
            continue
        if history[-1][0] - history[0][0] < SUSTAIN_STEPS and not all(o for _, _, o in history[-SUSTAIN:]):
            continue  # high with the rest of the model: a transient until it lasts SUSTAIN_STEPS
        layer, name = key
        recent = [r for _, r, _ in history[-SUSTAIN:]]
        label = f"{layer}.{name}" if layer else name
        message = (
            f"the update ratio ||dw||/||w|| of {label!r} is {fmt(ratio)} "
            f"({fmt(min(recent))}..{fmt(max(recent))} over the last {len(recent)} readings, above {RATIO_HIGH}; "
            "about 1e-3 is healthy)"
        )
        if math.isfinite(typical):
            message += f"; the other weights' median is {fmt(typical)}"
        evidence = {"param": name, "update_ratio": ratio, "recent": recent, "others_median": typical}
        findings.append(view.finding(RULE_ID, message, layer=layer or None, evidence=evidence))
    return findings
