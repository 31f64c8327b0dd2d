"""single_class_batch: most recent batches hold a single class — the data is sorted, not shuffled.

Source: "37 reasons why your neural network is not working" (shuffle the
dataset). Signal: `target_counts`, the class counts of the targets the user
logs with `mon.log(targets=...)`.

A single-class batch is only suspicious when shuffling would rarely produce
one: with 200:1 imbalance most shuffled batches of 32 are all-majority. So the
rule compares the observed share of single-class batches with the share a
shuffled stream would give, sum_c p_c^n for the class frequencies p_c seen so
far and the batch size n, and fires only when the latter is small.
"""

from __future__ import annotations

from collections import deque

from client_hook import thresholds
from layerwatch.server.diagnosis.view import RunView, fmt
from layerwatch.server.records import Finding

RULE_ID = "single_class_batch"

MIN_BATCH = thresholds.SINGLE_CLASS_MIN_BATCH  # smaller batches are single-class by chance too often
WINDOW = 20  # recent batches (of size >= MIN_BATCH) the share is taken over
MIN_BATCHES = 10  # judge only once this many batches are in the window
SINGLE_SHARE = 0.5  # DIAGNOSTICS.md: >= 50% of recent batches hold one class
EXPECTED_MAX = 0.1  # ...while a shuffled stream of these classes would give at most 10% such batches


def check(view: RunView, state: dict) -> list[Finding]:
    counts = view.record.signals.get("target_counts")
    if not counts:
        return []
    totals: dict[str, int] = state.setdefault("totals", {})
    for label, n in counts.items():
        totals[label] = totals.get(label, 0) + n
    size = sum(counts.values())
    if size < MIN_BATCH:
        return []
    recent: deque = state.setdefault("recent", deque(maxlen=WINDOW))
    recent.append((size, len(counts) == 1))
    if len(recent) < MIN_BATCHES:
        return []
    single = sum(1 for _, one in recent if one)
    share = single / len(recent)
    if share < SINGLE_SHARE:
        return []
    # Share of single-class batches a shuffled stream would give, for the typical batch size.
    total = sum(totals.values())
    batch = sorted(n for n, _ in recent)[len(recent) // 2]
    expected = sum((c / total) ** batch for c in totals.values())
    if expected > EXPECTED_MAX:
        return []  # imbalance alone explains it (class_imbalance's business)
    message = (
        f"{single} of the last {len(recent)} batches (size ~{batch}) hold a single class; shuffled batches "
        f"of these {len(totals)} classes would hold one class {fmt(100 * expected)}% of the time: "
        "the dataset looks sorted by label and not shuffled"
    )
    evidence = {"single_class_batches": single, "batches": len(recent), "batch_size": batch, "expected": expected}
    return [view.finding(RULE_ID, message, evidence=evidence)]
