"""non_finite: the first step where a NaN/±Inf appears, and the first module it came from.

Source: "37 reasons why your neural network is not working" (NaN: find the
first layer where it appears). Signals: the per-step `output_nonfinite` and
`first_nonfinite` (the client replays the forward to name the module, on the
CPU), `input_nonfinite`, `nonfinite_grads`, the loss; and, on sampled steps,
the per-layer non-finite counts of activations, gradients and weights.

When the previous step's gradients were all finite but its update left weights
non-finite (the per-step `update_ratios` of those tensors are NaN/Inf), the
optimizer step itself made them: the finding says so and names the tensors,
and with float16 parameters under an Adam-family optimizer whose eps is below
float16's smallest number (FP16_TINY: 1e-8 rounds to 0, and an element whose
gradient is 0 becomes 0/0) the remedy is that eps.

In a distributed run every rank's signals and loss are looked at: a NaN in one
rank's batch reaches every rank's gradients through the all-reduce, so the
finding names the rank where it is most upstream (its input, then a module's
output, ..., then the loss; the lowest rank among equals) and lists every rank
that saw a non-finite value at that step.
"""

from __future__ import annotations

import math
from typing import Any

from client_hook import wire
from layerwatch.server.diagnosis.view import RunView
from layerwatch.server.records import Finding

RULE_ID = "non_finite"

FP16_TINY = 2.0**-24  # float16's smallest subnormal (~6e-8): a smaller eps rounds to 0
ADAM_FAMILY = ("Adam", "AdamW", "NAdam", "RAdam", "Adamax", "SparseAdam")


def check(view: RunView, state: dict) -> list[Finding]:
    if state.get("fired"):
        return []  # the first step is what matters; later steps only repeat it
    rec = view.record
    seen = []  # (how far downstream, rank, where, what, loss, signals) of each rank that saw one
    for rank, sig, loss in _ranks(rec):
        loss_bad = loss is not None and not math.isfinite(loss)
        found = _locate(view, sig, loss_bad, with_stats=rank == 0)
        if found is not None:
            seen.append((found[0], rank, found[1], found[2], loss, sig))
    if not seen:
        return []
    state["fired"] = True
    _, rank, where, what, loss, sig = min(seen, key=lambda s: (s[0], s[1]))
    distributed = view.history.world_size > 1 or len(seen) > 1 or rank > 0
    layer = None if where in (None, "input", "") else where
    of = {"NaN/Inf (weight)": "weights", "NaN/Inf (grad)": "gradients"}.get(what, "output")
    place = "in the input batch" if where == "input" else f"in the {of} of {where!r}" if layer else ""
    message = f"{what} first appeared at step {view.step}" + (f" {place}" if place else "")
    if distributed:
        message += f" on rank {rank}"
    if loss is not None:
        message += f"; loss = {loss}"
    evidence: dict[str, Any] = {"step": view.step, "where": where, "signal": what, "loss": loss}
    if distributed:
        evidence["rank"] = rank
        evidence["ranks"] = sorted(s[1] for s in seen)
    if sig.get("nonfinite_grads"):
        evidence["nonfinite_grads"] = sig["nonfinite_grads"][:20]
    broken, step, remedy = _broken_by_a_step(view)
    if broken:
        message += (
            f"; the optimizer step of step {step} turned {', '.join(repr(b) for b in broken[:5])}"
            f"{' and more' if len(broken) > 5 else ''} non-finite although every gradient was finite"
        )
        evidence["broken_by_step"] = broken[:20]
    return [view.finding(RULE_ID, message, layer=layer, evidence=evidence, remedy=remedy)]


def _broken_by_a_step(view: RunView) -> tuple[list[str], int, str | None]:
    """The tensors this step's or the previous step's optimizer step made non-finite from finite
    gradients (weights are read after the update: a sample of this step already shows them), which
    step it was, and the remedy."""
    tensors = view.history.tensor_info()
    for step in (view.step, view.step - 1):
        rec = view.history.records.get(step)
        sig = rec.signals if rec is not None else {}
        ratios, norms = sig.get("update_ratios"), sig.get("grad_norms")
        if not ratios or len(ratios) != len(tensors) or sig.get("nonfinite_grads") or sig.get("skipped"):
            continue
        if norms and any(n is not None and not math.isfinite(n) for n in norms):
            continue
        broken = [t.label for t, r in zip(tensors, ratios) if r is not None and not math.isfinite(r)]
        if broken:
            return broken, step, _remedy(view, tensors, broken)
    return [], -1, None


def _remedy(view: RunView, tensors: list, broken: list[str]) -> str:
    """What to change when the optimizer step itself broke the weights."""
    optimizer = view.optimizer or {}
    half = any(t.description.get("dtype") == "float16" for t in tensors if t.label in broken)
    eps = [g.get("eps") for g in optimizer.get("param_groups") or [] if isinstance(g.get("eps"), (int, float))]
    if half and optimizer.get("type") in ADAM_FAMILY and eps and min(eps) < FP16_TINY:
        return (
            f"Raise the optimizer's eps to 1e-4 (it is {min(eps):g}, below float16's smallest number, so it "
            "rounds to 0 and an element with a zero gradient divides 0 by 0), or keep float32 weights and train "
            "under torch.autocast with a GradScaler."
        )
    return (
        "The optimizer step made the weights NaN/Inf from finite gradients: check its hyperparameters (lr, eps, "
        "weight decay) for values the weights' dtype cannot hold, and any custom update code."
    )


def _ranks(rec: Any) -> list[tuple[int, dict, float | None]]:
    """(rank, signals, loss) of rank 0 and of every other rank with signals or a loss at this step."""
    losses = {}
    for key, value in rec.scalars.items():
        base, rank = wire.key_rank(key)
        if base == "loss":
            losses[rank] = value
    ranks = sorted({0, *rec.rank_signals, *losses})
    return [(r, rec.signals if r == 0 else rec.rank_signals.get(r, {}), losses.get(r)) for r in ranks]


def _locate(view: RunView, sig: dict, loss_bad: bool, *, with_stats: bool) -> tuple[int, str | None, str] | None:
    """(how far downstream, where, what): the module (or "input") and the kind of signal that went
    non-finite; None if nothing did. Layer statistics are rank 0's: read `with_stats` only."""
    if sig.get("input_nonfinite"):
        return 0, "input", "NaN/Inf"
    if sig.get("first_nonfinite"):
        return 1, sig["first_nonfinite"], "NaN/Inf"
    sample = view.sample if with_stats else None
    if sample is not None and sample.stats:
        # Layer statistics of this step: the first module in forward order with a non-finite
        # activation, else gradient, else weight.
        for kind in ("activation", "grad", "weight"):
            bad = [layer for (layer, _, k), row in sample.stats.items() if k == kind and row.get("nonfinite", 0) > 0]
            if bad:
                return 2, min(bad, key=view.order), f"NaN/Inf ({kind})"
    if sig.get("output_nonfinite"):
        return 3, None, "NaN/Inf in the model output"
    if sig.get("nonfinite_grads"):
        first = sig["nonfinite_grads"][0]
        layer = first.rsplit(".", 1)[0] if "." in first else ""
        return 4, layer or None, "NaN/Inf in the gradients"
    if loss_bad:
        return 5, None, "a non-finite loss"
    return None
