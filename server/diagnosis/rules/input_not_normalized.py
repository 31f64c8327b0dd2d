"""input_not_normalized: the input batch is far from standardized, step after step.

Sources: "37 reasons why your neural network is not working" (normalize the
features); UMLAUT (CHI'21) and DeepDiagnosis (ICSE'22) flag inputs outside
[-1, 1], which is too eager for standardized data (a standard normal batch
has values beyond ±3): we use 10, as DIAGNOSTICS.md does. Signals:
`input_mean` and `input_std` of the first *floating* tensor argument of the
model's forward, every step; integer inputs (token ids for an embedding) are
not measured by the client, so they never trip this rule.
"""

from __future__ import annotations

from client_hook import thresholds
from layerwatch.server.diagnosis.view import RunView, fmt
from layerwatch.server.records import Finding

RULE_ID = "input_not_normalized"

MEAN_MAX = thresholds.INPUT_MEAN_MAX  # |mean| above this (shared with preflight, sourced there)
STD_MAX = thresholds.INPUT_STD_MAX  # std above this
STD_MIN = thresholds.INPUT_STD_MIN  # std below this: the batch is (nearly) constant, the model sees no signal
SUSTAIN_STEPS = 5  # consecutive steps: one odd batch (an outlier, a padding batch) is not a habit


def check(view: RunView, state: dict) -> list[Finding]:
    sig = view.record.signals
    mean, std = sig.get("input_mean"), sig.get("input_std")
    if mean is None or std is None:
        return []  # no floating input at this step (or its statistics were not finite)
    problems = []
    if abs(mean) > MEAN_MAX:
        problems.append(f"|mean| > {fmt(MEAN_MAX)}")
    if std > STD_MAX:
        problems.append(f"std > {fmt(STD_MAX)}")
    elif std < STD_MIN:
        problems.append(f"std < {fmt(STD_MIN)}")
    if not problems:
        state["since"], state["count"] = None, 0
        return []
    if not state.get("count"):
        state["since"] = view.step
    state["count"] = state.get("count", 0) + 1
    if state["count"] < SUSTAIN_STEPS:
        return []
    message = (
        f"the input batch has mean {fmt(mean)} and std {fmt(std)} ({', '.join(problems)}) "
        f"for {state['count']} consecutive steps (since step {state['since']}); standardized inputs have "
        "mean ~0 and std ~1"
    )
    evidence = {"input_mean": mean, "input_std": std, "since_step": state["since"], "steps": state["count"]}
    return [view.finding(RULE_ID, message, evidence=evidence)]
