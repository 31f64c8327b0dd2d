"""The checks `monitor.preflight` runs, one function each, thresholds with their sources.

Each check reads tensors the orchestrator (`client_hook.preflight`) measured on
a copy of the model and adds to the report: findings with the catalogue's ids
and remedies, or a passed/skipped row with what was measured. Data checks use
the same thresholds as the live rules of the same id (../shared/DIAGNOSTICS.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from client_hook.preflight.report import PreflightReport, finding
from client_hook.thresholds import (  # shared with the live rules of the same ids
    IMBALANCE_INFO,
    IMBALANCE_WARNING,
    INPUT_MEAN_MAX,
    INPUT_STD_MAX,
    INPUT_STD_MIN,
    LOSS_AT_INIT_TOLERANCE,
    SINGLE_CLASS_MIN_BATCH,
)

# overfit_one_batch_failed: the loss must fall below this fraction of its initial
# value (above the loss's floor, e.g. label smoothing's entropy) within `steps`.
# Karpathy, "A Recipe for Training Neural Networks": overfit one batch, reach ~0.
OVERFIT_FRACTION = 0.1
# softmax_before_loss: rows count as (log-)probabilities when they sum to 1 this closely.
PROB_SUM_ATOL = 1e-3


def _fmt(x: float) -> str:
    return f"{x:.4g}"


# ------------------------------------------------------------------ the batch


def check_input(report: PreflightReport, x: torch.Tensor | None) -> None:
    """non_finite (layer "input") and input_not_normalized on the first float input tensor."""
    if x is None:
        report.skipped("non_finite", "no floating-point input tensor")
        report.skipped("input_not_normalized", "no floating-point input tensor")
        return
    finite = torch.isfinite(x)
    bad = int((~finite).sum())  # host sync: preflight runs once, outside training
    if bad:
        report.add(
            finding("non_finite", f"the input batch holds {bad} NaN/Inf value(s)", layer="input", nonfinite=bad),
            f"{bad} NaN/Inf in the input",
        )
    values = x[finite].double()
    if values.numel() < 2:
        report.skipped("input_not_normalized", "fewer than 2 finite input values")
        return
    mean, std = float(values.mean()), float(values.std())
    measured = f"input mean {_fmt(mean)}, std {_fmt(std)}"
    if abs(mean) > INPUT_MEAN_MAX or std > INPUT_STD_MAX or std < INPUT_STD_MIN:
        report.add(
            finding(
                "input_not_normalized",
                f"{measured} (expected |mean| <= {INPUT_MEAN_MAX:g} and {INPUT_STD_MIN:g} <= std <= {INPUT_STD_MAX:g})",
                mean=mean,
                std=std,
            ),
            measured,
        )
    else:
        report.passed("input_not_normalized", measured)


def check_targets(report: PreflightReport, y: Any) -> None:
    """single_class_batch and class_imbalance on integer class-index targets."""
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() or y.dim() == 0:
        for rule in ("single_class_batch", "class_imbalance"):
            report.skipped(rule, "targets are not class indices")
        return
    labels = y[y >= 0]  # negative ids are ignore_index (-100 by default), not a class
    classes, counts = torch.unique(labels, return_counts=True)
    if classes.numel() == 0:
        report.skipped("single_class_batch", "no targets")
        report.skipped("class_imbalance", "no targets")
        return
    batch = y.shape[0]
    if batch < SINGLE_CLASS_MIN_BATCH:
        report.skipped("single_class_batch", f"batch of {batch} < {SINGLE_CLASS_MIN_BATCH}")
    elif classes.numel() == 1:
        only = int(classes[0])
        report.add(
            finding("single_class_batch", f"all {batch} targets of the batch are class {only}", cls=only, batch=batch),
            f"{batch} targets, all class {only}",
        )
    else:
        report.passed("single_class_batch", f"{classes.numel()} classes in {batch} targets")
    hi, lo = int(counts.max()), int(counts.min())
    ratio = hi / lo
    measured = f"majority/minority {hi}/{lo} = {ratio:.3g} over {classes.numel()} classes present"
    if ratio > IMBALANCE_INFO:
        severity = "warning" if ratio > IMBALANCE_WARNING else "info"
        counts_by_class = {str(int(c)): int(n) for c, n in zip(classes, counts)}
        report.add(
            finding(
                "class_imbalance", f"in this batch {measured}", severity=severity, ratio=ratio, counts=counts_by_class
            ),
            measured,
        )
    else:
        report.passed("class_imbalance", measured)


# ------------------------------------------------------------------ the first forward


def check_output_finite(report: PreflightReport, first_bad: str | None, loss: float) -> None:
    """non_finite in a module output (first in forward order) or in the loss."""
    if first_bad is not None:
        report.add(
            finding("non_finite", f"the output of {first_bad!r} is the first to hold NaN/Inf", layer=first_bad),
            "NaN/Inf in the forward pass",
        )
    elif not math.isfinite(loss):
        report.add(finding("non_finite", f"the initial loss is {loss}", loss=str(loss)), f"loss {loss}")
    elif not report.by_rule("non_finite"):
        report.passed("non_finite", "input, activations and loss finite")


def num_classes(output: torch.Tensor, y: Any) -> int | None:
    """C for a cross-entropy-like loss: the class dimension of the output, else the targets."""
    if output.dim() >= 2:
        return int(output.shape[1])
    if output.dim() == 1 and isinstance(y, torch.Tensor) and y.dim() == 0:
        return int(output.shape[0])  # one unbatched sample
    if isinstance(y, torch.Tensor) and not y.is_floating_point() and y.numel():
        return int(y.max()) + 1
    return None


def check_loss_at_init(report: PreflightReport, loss0: float, classes: int | None, ce_like: bool) -> None:
    if not ce_like:
        report.skipped("loss_at_init", "not a cross-entropy loss")
        return
    if classes is None or classes < 2 or not math.isfinite(loss0):
        report.skipped("loss_at_init", f"cannot tell C (got {classes})" if math.isfinite(loss0) else "loss not finite")
        return
    expected = math.log(classes)
    measured = f"loss {_fmt(loss0)} vs ln({classes}) = {_fmt(expected)}"
    if abs(loss0 - expected) > LOSS_AT_INIT_TOLERANCE * expected:
        report.add(
            finding(
                "loss_at_init",
                f"initial {measured}: off by more than {LOSS_AT_INIT_TOLERANCE:g} x ln C",
                loss=loss0,
                expected=expected,
                classes=classes,
            ),
            measured,
        )
    else:
        report.passed("loss_at_init", measured)


def check_softmax_before_loss(
    report: PreflightReport, output: torch.Tensor, expects_logits: bool, producer: str | None
) -> None:
    """Rows that are already probabilities, or log-probabilities, going into a loss that takes logits."""
    if not expects_logits:
        report.skipped("softmax_before_loss", "the loss does not take logits")
        return
    if output.dim() == 0 or output.shape[min(1, output.dim() - 1)] < 2:
        report.skipped("softmax_before_loss", "no class dimension")
        return
    dim = 1 if output.dim() >= 2 else 0
    out = output.detach().double()
    probs = bool((out >= 0).all()) and bool(torch.allclose(out.sum(dim), torch.ones(()).double(), atol=PROB_SUM_ATOL))
    logprobs = bool((out <= 0).all()) and bool(
        torch.allclose(out.exp().sum(dim), torch.ones(()).double(), atol=PROB_SUM_ATOL)
    )
    if probs or logprobs:
        what = "probabilities (non-negative, rows sum to 1)" if probs else "log-probabilities (exp rows sum to 1)"
        where = f" from {producer!r}" if producer else ""
        report.add(
            finding(
                "softmax_before_loss",
                f"the model's outputs{where} are already {what}, and the loss applies log_softmax again",
                layer=producer,
                kind="probabilities" if probs else "log-probabilities",
            ),
            f"outputs are {'probabilities' if probs else 'log-probabilities'}",
        )
    else:
        report.passed("softmax_before_loss", "outputs look like logits")


# ------------------------------------------------------------------ gradients and the first step


def _by_module(labels: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for module, param in labels:
        grouped.setdefault(module, []).append(param)
    return grouped


def check_gradients(
    report: PreflightReport, params: list[tuple[str, str, torch.Tensor]], frozen: list[tuple[str, str]]
) -> set[tuple[str, str]]:
    """no_gradient and non-finite gradients after one backward; returns the (module, param) with a usable grad.

    `params` are (module, param name, parameter) of every trainable parameter of the copy.
    """
    missing, zero, bad, usable = [], [], [], set()
    for module, name, p in params:
        if p.grad is None:
            missing.append((module, name))
        elif not bool(torch.isfinite(p.grad).all()):
            bad.append((module, name))
        elif not bool(p.grad.any()):
            zero.append((module, name))
        else:
            usable.add((module, name))
    none_set = set(missing)
    for module, names in _by_module(missing + zero).items():
        how = [f"{n} ({'no gradient' if (module, n) in none_set else 'gradient exactly 0'})" for n in names]
        report.add(
            finding(
                "no_gradient",
                f"after one backward, {module or 'the root module'!s}: {', '.join(how)}",
                layer=module,
                params=names,
            ),
            ", ".join(how),
        )
    for module, names in _by_module(bad).items():
        report.add(
            finding("non_finite", f"NaN/Inf in the gradient of {', '.join(names)}", layer=module, params=names),
            f"NaN/Inf gradient: {', '.join(names)}",
        )
    if not missing and not zero:
        report.passed("no_gradient", f"all {len(params)} trainable tensors got a gradient")
    if frozen:
        names = [f"{m}.{n}" if m else n for m, n in frozen]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        report.add(
            finding("frozen_parameters", f"{len(names)} parameter(s) have requires_grad=False: {shown}", params=names),
            f"{len(names)} frozen: {shown}",
        )
    return usable


def check_updates(
    report: PreflightReport,
    moved: Callable[[str, str], bool],
    usable: set[tuple[str, str]],
    optimizer_name: str,
) -> None:
    """weights_not_updating: a parameter with a non-zero gradient that one optimizer step left unchanged."""
    stuck = sorted(key for key in usable if not moved(*key))
    for module, names in _by_module(stuck).items():
        report.add(
            finding(
                "weights_not_updating",
                f"{', '.join(names)} of {module or 'the root module'!s} had a non-zero gradient but did not change "
                f"after one {optimizer_name} step (not in the optimizer, or lr=0)",
                layer=module,
                params=names,
                optimizer=optimizer_name,
            ),
            f"{', '.join(names)} unchanged after one step",
        )
    if not stuck:
        report.passed("weights_not_updating", f"all {len(usable)} tensors with a gradient moved ({optimizer_name})")


def check_overfit(report: PreflightReport, losses: list[float], floor: float, steps: int, optimizer_name: str) -> None:
    """overfit_one_batch_failed: the loss on one batch must fall below OVERFIT_FRACTION of its start (above floor)."""
    loss0 = losses[0]
    if not all(math.isfinite(v) for v in losses):
        went = next(i for i, v in enumerate(losses) if not math.isfinite(v))
        report.add(
            finding("non_finite", f"the loss became {losses[went]} at overfitting step {went}", step=went),
            f"loss non-finite at step {went}",
        )
        return
    if loss0 - floor <= 0:
        report.skipped("overfit_one_batch_failed", f"initial loss {_fmt(loss0)} is already at its floor")
        return
    best = min(losses)
    fraction = (best - floor) / (loss0 - floor)
    floor_note = f" above the floor {_fmt(floor)}" if floor else ""
    measured = f"loss {_fmt(loss0)} -> {_fmt(best)} ({fraction:.0%}{floor_note}) in {len(losses) - 1} steps"
    if fraction > OVERFIT_FRACTION:
        report.add(
            finding(
                "overfit_one_batch_failed",
                f"{measured} of {optimizer_name} on one batch; expected below {OVERFIT_FRACTION:.0%} within {steps}",
                initial=loss0,
                best=best,
                fraction=fraction,
                steps=steps,
                optimizer=optimizer_name,
            ),
            measured,
        )
    else:
        report.passed("overfit_one_batch_failed", measured)


def check_batch_mixing(
    report: PreflightReport,
    cross: float,
    where: str | None,
    has_batchnorm: bool,
    *,
    own: float = 0.0,
    skipped: str | None = None,
) -> None:
    """batch_mixing: |d out_i / d x_j| (j != i) is non-zero, in eval mode; `own` is |d out_i / d x_i|."""
    note = " (checked in eval mode: BatchNorm mixes samples in train mode by design)" if has_batchnorm else ""
    if skipped is not None:
        report.skipped("batch_mixing", skipped)
    elif cross > 0:
        at = f"; first seen in the output of {where!r}" if where else ""
        size = f"{cross / own:.3g} x its own" if own > 0 else f"{cross:.3g} (its own input: 0)"
        report.add(
            finding(
                "batch_mixing",
                f"the output of one sample depends on the other samples' inputs: the gradient on them is {size}"
                f"{at}{note}",
                layer=where,
                cross_grad_norm=cross,
                own_grad_norm=own,
                batchnorm=has_batchnorm,
            ),
            f"cross-sample gradient {size}",
        )
    else:
        report.passed("batch_mixing", f"samples independent{note}")
