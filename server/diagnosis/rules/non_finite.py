"""non_finite: the first step where a NaN/±Inf appears, and the first module it came from.

Source: "37 reasons why your neural network is not working" (NaN: find the
first layer where it appears). Signals: the per-step `output_nonfinite` and
`first_nonfinite` (the client replays the forward to name the module, on the
CPU), `input_nonfinite`, `nonfinite_grads`, the loss; and, on sampled steps,
the per-layer non-finite counts of activations, gradients and weights.

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
    place = "in the input batch" if where == "input" else f"in the output of {where!r}" if layer else ""
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
    return [view.finding(RULE_ID, message, layer=layer, evidence=evidence)]


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
