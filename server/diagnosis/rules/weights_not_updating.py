"""weights_not_updating: a trainable parameter gets a gradient but the optimizer step leaves it unchanged.

Sources: the "unit test that your weights update" of the training-debugging
guides; "37 reasons why your neural network is not working" (frozen layers).
Signals (`view.update_readings`: the per-step readings, or an older client's
samples): each weight's update ratio (exactly 0 when the step changed none of
the elements read), its gradient's RMS at the step and its weight RMS; from
run_start, each parameter's `requires_grad` and `in_optimizer`.

Typical causes: the optimizer was built before a layer was added (or from
part of the model), or a param group has lr=0. Not flagged:
- frozen parameters (requires_grad=False; frozen_parameters lists them);
- parameters whose gradient is ~0 by construction (a conv bias before
  BatchNorm): no gradient, no update, nothing wrong;
- exact zeros from float rounding when the whole model's updates are tiny
  (lr=1e-9): that is update_ratio_low's finding, not a missing parameter.
"""

from __future__ import annotations

import math

from layerwatch.server.diagnosis.view import RunView, fmt, median
from layerwatch.server.records import Finding

RULE_ID = "weights_not_updating"

SUSTAIN = 3  # consecutive readings with a gradient and no change
# A gradient below this fraction of the parameter's own RMS is too small to move it in float32
# (SGD at lr <= 1e-3 moves it by < 1e-7 of its value, under half an ulp), so a zero update is
# rounding, not a missing optimizer: e.g. a conv bias before BatchNorm (gradient ~1e-9 by
# construction) or the first layers of a network whose gradients vanished (vanishing_gradients').
GRAD_FLOOR = 1e-4
# A gradient below this fraction of the model's largest gradient RMS is ~0 (a vanished one,
# 1e-20 of the output layer's): no parameter with it could move, whatever the optimizer.
MODEL_GRAD_FLOOR = 1e-6
# Below this median ratio the moving parameters themselves barely move: exact zeros elsewhere
# are rounding of tiny updates (update_ratio_low), not a missing parameter. Its RATIO_LOW.
MOVING_FLOOR = 1e-7
SPARSE_GRADS = ("Embedding", "EmbeddingBag")  # gradients on the batch's rows only


def check(view: RunView, state: dict) -> list[Finding]:
    readings = view.update_readings()
    if not readings:
        return []
    has_optimizer = view.optimizer is not None
    live = [r.grad_rms for r in readings if r.grad_rms is not None and math.isfinite(r.grad_rms)]
    largest_grad = max(live) if live else math.nan
    moving, stalled = [], []
    for r in readings:
        if r.description.get("requires_grad") is False:
            continue
        if r.ratio > 0:
            moving.append(r.ratio)
            continue
        outside = has_optimizer and r.description.get("in_optimizer") is False
        rms, weight_rms = r.grad_rms, r.weight_rms
        if rms is None or not math.isfinite(rms) or not rms > 0 or weight_rms is None:
            continue  # no gradient (unused this step): no update is right
        if not (rms > GRAD_FLOOR * weight_rms and rms > MODEL_GRAD_FLOOR * largest_grad):
            continue  # a gradient too small to change it in float32: rounding, not a fault
        if not outside and view.module_type(r.layer) in SPARSE_GRADS:
            continue  # the rows the batch did not use get no update from SGD: the subset read may hold only those
        stalled.append((r.layer, r.param, rms, outside))
    runs: dict = state.setdefault("runs", {})
    rest_moves = bool(moving) and median(moving) >= MOVING_FLOOR
    now = {(layer, name) for layer, name, _, outside in stalled if outside or rest_moves}
    for key in list(runs):
        if key not in now:
            del runs[key]
    by_layer: dict[str, list[tuple[str, float, bool, int]]] = {}
    for layer, name, rms, outside in stalled:
        if (layer, name) not in now:
            continue
        runs[(layer, name)] = runs.get((layer, name), 0) + 1
        if runs[(layer, name)] >= SUSTAIN:
            by_layer.setdefault(layer, []).append((name, rms, outside, runs[(layer, name)]))
    zero_lr = [key for key, value in view.record.scalars.items() if key.split("/")[0] == "lr" and value == 0]
    findings = []
    for layer, params in by_layer.items():
        names = ", ".join(f"{layer}.{n}" if layer else n for n, _, _, _ in params)
        outside = [n for n, _, out, _ in params if out]
        if len(outside) == len(params):
            why = "not in any optimizer param group (optimizer.step() never touches it)"
        elif zero_lr:
            groups = ", ".join("0" if k == "lr" else k.split("/")[1] for k in zero_lr)
            why = f"it is in the optimizer, and param group {groups} has lr=0 (its group?)"
        else:
            why = "it is in the optimizer, but the step leaves it unchanged (a param group with lr=0?)"
        readings = min(count for _, _, _, count in params)
        message = (
            f"{names} did not change in {readings} read optimizer steps in a row although "
            f"{'it has' if len(params) == 1 else 'they have'} a gradient (RMS {fmt(params[0][1])}): {why}"
        )
        if moving:
            message += f"; the rest of the model moves (median update ratio {fmt(median(moving))})"
        evidence = {
            "params": [n for n, _, _, _ in params],
            "grad_rms": [r for _, r, _, _ in params],
            "not_in_optimizer": outside,
            "zero_lr_groups": zero_lr,
            "model_median_update_ratio": median(moving) if moving else None,
        }
        findings.append(view.finding(RULE_ID, message, layer=layer or None, evidence=evidence))
    return findings
