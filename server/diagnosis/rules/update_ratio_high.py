"""update_ratio_high: one weight tensor's updates are too large for its values, sample after sample.

Sources: CS231n ("the ratio of updates to weights should be about 1e-3");
DL4J's visualisation guide (log10 ratio about -3; above -2 is a problem);
DeepDiagnosis (ICSE'22: outside [1e-5, 1e-1]). Signal: the `update_ratio` of
each weight row on sampled steps, ||w_after - w_before|| / ||w_before||
across one optimizer step.

Which tensors count: weight matrices and kernels (two or more dimensions).
Biases and normalisation scales are left out: a bias starts at 0, and with
Adam its ratio is ~1/t for its first hundred steps, which says nothing about
the LR. A matrix that starts at 0 or far below the model's other weights
(zero-initialised heads, LoRA's B, small-init output layers) is left out for
the same reason: it is meant to grow fast.

When: after WARMUP_STEPS, any counted tensor above RATIO_HIGH for SUSTAIN
samples. Before it, Adam's first updates are lr per element whatever the
gradient, so a high ratio everywhere is expected; only a tensor far above the
rest of the model (OUTLIER_FACTOR x their median) counts then. That early
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
SUSTAIN = 3  # consecutive samples above RATIO_HIGH (samples, not steps: sampling is sparse)
OUTLIER_FACTOR = 10.0  # during warm-up: this many times the other tensors' median ratio
SMALL_INIT = 0.1  # first weight RMS below this fraction of the others' median: meant to grow, not counted


def check(view: RunView, state: dict) -> list[Finding]:
    sample = view.sample
    if sample is None or not sample.stats:
        return []
    shapes = {(layer, name): p.get("shape") or [] for layer, name, p in view.params()}
    rows = {
        (layer, name): row
        for (layer, name, kind), row in sample.stats.items()
        if kind == "weight" and len(shapes.get((layer, name), [])) >= 2
    }
    excluded: set = state.setdefault("excluded", set())
    seen: set = state.setdefault("seen", set())
    new = [key for key in rows if key not in seen]
    if new:
        scale = median([r["rms"] for r in rows.values() if r.get("rms") is not None])
        for key in new:
            seen.add(key)
            rms = rows[key].get("rms")
            if rms is None or not rms > 0 or (len(rows) > 1 and rms < SMALL_INIT * scale):
                excluded.add(key)
    ratios = {
        key: row["update_ratio"]
        for key, row in rows.items()
        if key not in excluded and row.get("update_ratio") is not None and not math.isnan(row["update_ratio"])
    }
    runs: dict = state.setdefault("runs", {})
    findings = []
    for key, ratio in ratios.items():
        others = [r for k, r in ratios.items() if k != key]
        typical = median(others) if others else math.nan
        if view.step >= WARMUP_STEPS:
            high = ratio > RATIO_HIGH
        else:
            high = ratio > RATIO_HIGH and math.isfinite(typical) and ratio > OUTLIER_FACTOR * typical
        history = runs.setdefault(key, [])
        if not high:
            history.clear()
            continue
        history.append(ratio)
        if len(history) < SUSTAIN:
            continue
        layer, name = key
        recent = history[-SUSTAIN:]
        label = f"{layer}.{name}" if layer else name
        message = (
            f"the update ratio ||dw||/||w|| of {label!r} is {fmt(ratio)} "
            f"({fmt(min(recent))}..{fmt(max(recent))} over the last {len(recent)} samples, above {RATIO_HIGH}; "
            "about 1e-3 is healthy)"
        )
        if math.isfinite(typical):
            message += f"; the other weights' median is {fmt(typical)}"
        evidence = {"param": name, "update_ratio": ratio, "recent": recent, "others_median": typical}
        findings.append(view.finding(RULE_ID, message, layer=layer or None, evidence=evidence))
    return findings
