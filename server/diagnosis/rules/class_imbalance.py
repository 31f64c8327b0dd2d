"""class_imbalance: the cumulative class counts are heavily skewed.

Source: the training-debugging guides on class imbalance (weighted loss,
resampling, output bias at log(pos/neg)). Signal: `target_counts` of the
targets logged with `mon.log(targets=...)`, summed over the run in `state`
(the history keeps only the last steps). Classes never seen are unknown to the
server, so the ratio is over the classes seen; it is judged only once the
rarest of them has MIN_MINORITY samples, so that one early lucky sample does
not make a ratio.
"""

from __future__ import annotations

from client_hook import thresholds
from layerwatch.server.diagnosis.view import RunView, fmt
from layerwatch.server.records import Finding

RULE_ID = "class_imbalance"

RATIO_INFO = thresholds.IMBALANCE_INFO  # majority / minority above this is worth knowing (shared with preflight)
RATIO_WARNING = thresholds.IMBALANCE_WARNING  # above this, a plain loss mostly learns the majority
MIN_MINORITY = 10  # samples of the rarest class before the ratio is trusted (about ±30% at 10)


def check(view: RunView, state: dict) -> list[Finding]:
    counts = view.record.signals.get("target_counts")
    if not counts:
        return []
    totals: dict[str, int] = state.setdefault("totals", {})
    for label, n in counts.items():
        totals[label] = totals.get(label, 0) + n
    if len(totals) < 2:
        return []
    major = max(totals, key=totals.__getitem__)
    minor = min(totals, key=totals.__getitem__)
    if totals[minor] < MIN_MINORITY:
        return []
    ratio = totals[major] / totals[minor]
    if ratio <= RATIO_INFO:
        return []
    severity = "warning" if ratio > RATIO_WARNING else "info"
    if state.get("reported") == severity:
        return []  # said once per level: the counts only drift from here
    state["reported"] = severity
    message = (
        f"class {major!r} has {totals[major]} samples and class {minor!r} {totals[minor]} so far "
        f"(ratio {fmt(ratio)}:1 over {len(totals)} classes, {sum(totals.values())} samples)"
    )
    evidence = {"ratio": ratio, "majority": major, "minority": minor, "counts": dict(totals)}
    return [view.finding(RULE_ID, message, evidence=evidence, severity=severity)]
