"""Runs every rule over each run's steps, live after each committed batch and on a stored run.

Live: ingest hands the engine the frames it just committed; the engine adds
them to the run's history and evaluates every step that is complete (all steps
before the newest one; at run_end, all), in step order, so the cost of a batch
depends on its steps and the rules' windows, not on the run's length. A
distributed run's ranks send over connections of their own: a step is
evaluated once every rank has sent a later one (or ended; `RunHistory.complete_upto`),
so a rule sees each rank's data of the step. Findings
become alerts through `store.upsert_alert` (one per run, rule and layer).

Replay (`diagnose`, and rebuilding a run's history after a server restart)
reads the stored rows back in step order and feeds the same history, so a
stored run gets the same findings as it did live, and new ones after a rule
improves.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, defaultdict
from typing import Any

from sqlalchemy.orm import Session

from client_hook import wire
from layerwatch.server import alerting, store
from layerwatch.server.diagnosis import replay
from layerwatch.server.diagnosis.history import RunHistory
from layerwatch.server.diagnosis.rules import RULES
from layerwatch.server.diagnosis.view import RunView
from layerwatch.server.records import Finding

log = logging.getLogger(__name__)

MAX_DONE = 1000  # finished runs remembered, so the ranks' frames that trail a run's end are not re-diagnosed


class RunDiagnosis:
    """One run's history, each rule's state, and how far the rules have looked."""

    def __init__(self, run_id: str, model: Any = None, optimizer: Any = None, config: Any = None) -> None:
        self.history = RunHistory(run_id, model, optimizer, config)
        self.states: dict[str, dict[str, Any]] = {rule.RULE_ID: {} for rule in RULES}
        self.evaluated_upto = -1
        # Per rank, frames at or below it were fed already (a client replaying after a lost ack).
        self.last_seq: dict[int, int] = {}
        self._broken: set[str] = set()

    def evaluate(self) -> list[Finding]:
        """Run every rule on each step not evaluated yet that can no longer receive data."""
        last = self.history.complete_upto()
        steps = [s for s in self.history.records if self.evaluated_upto < s <= last]
        findings: list[Finding] = []
        for step in steps:
            view = RunView(self.history, step)
            for rule in RULES:
                if rule.RULE_ID in self._broken:
                    continue
                try:
                    found = rule.check(view, self.states[rule.RULE_ID]) or []
                    if found:
                        self.history.told.setdefault(rule.RULE_ID, step)
                    findings.extend(found)
                except Exception:  # a rule bug must not stop the others or ingest
                    self._broken.add(rule.RULE_ID)
                    log.exception(
                        "rule %s failed on run %s at step %d; it is off for this run",
                        rule.RULE_ID,
                        self.history.run_id,
                        step,
                    )
        self.evaluated_upto = max(self.evaluated_upto, last)
        return findings


def merge(findings: list[Finding]) -> list[tuple[Finding, int, int]]:
    """One finding per (rule, layer): (the latest, how many times it fired, the first step it fired at)."""
    merged: dict[tuple[str, str | None], tuple[Finding, int]] = {}
    first: dict[tuple[str, str | None], int] = {}
    for f in findings:
        key = (f.rule, f.layer)
        first.setdefault(key, f.step)
        previous = merged.get(key)
        severity = f.severity
        if previous is not None and wire.severity_rank(previous[0].severity) > wire.severity_rank(severity):
            severity = previous[0].severity
        latest = Finding(f.rule, severity, f.layer, f.step, f.message, f.remedy, f.evidence)
        merged[key] = (latest, (previous[1] if previous else 0) + 1)
    return [(f, n, first[key]) for key, (f, n) in merged.items()]


class Engine:
    """The live engine of one server process. Called with ingest's write lock held."""

    def __init__(self) -> None:
        self._runs: dict[str, RunDiagnosis] = {}
        self._done: OrderedDict[str, None] = OrderedDict()  # runs diagnosed to their end, the latest MAX_DONE

    def process(self, session: Session, frames: list[dict[str, Any]]) -> list[tuple[store.AlertInfo, str]]:
        """Feed newly stored frames, evaluate, upsert alerts, commit; return the alerts that changed."""
        by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for frame in frames:
            by_run[frame["run_id"]].append(frame)
        changes: list[tuple[store.AlertInfo, str]] = []
        now = time.time()
        for run_id, run_frames in by_run.items():
            diagnosis = self._runs.get(run_id)
            if diagnosis is None:
                if run_id in self._done and all(f.get("rank") for f in run_frames):
                    continue  # another rank's last frames (its end) after the run was diagnosed to its end
                diagnosis = self._runs[run_id] = self._resume(session, run_id, run_frames)
            for frame in sorted(run_frames, key=lambda f: (f.get("rank") or 0, f["seq"])):
                rank = frame.get("rank") or 0
                if frame["seq"] > diagnosis.last_seq.get(rank, -1):
                    diagnosis.history.add_frame(frame)
                    diagnosis.last_seq[rank] = frame["seq"]
            for finding, _times, first in merge(diagnosis.evaluate()):
                changes.append(alerting.raise_alert(session, run_id=run_id, finding=finding, now=now, first_step=first))
            if diagnosis.history.finished:
                del self._runs[run_id]  # a finished run needs no live state
                self._done[run_id] = None
                while len(self._done) > MAX_DONE:
                    self._done.popitem(last=False)
        session.commit()
        return changes

    def _resume(self, session: Session, run_id: str, frames: list[dict[str, Any]]) -> RunDiagnosis:
        """A run first seen by this process: new, or begun before a restart (then rebuilt from the database)."""
        first_step = min(f["step"] for f in frames)
        if any(f["kind"] == "run_start" for f in frames) and first_step == 0:
            return RunDiagnosis(run_id)
        # Rebuilt quietly: what it found before the restart is stored already.
        diagnosis, _ = replay.replay(session, run_id=run_id, before_step=first_step, make=RunDiagnosis)
        return diagnosis


def diagnose_stored_run(session: Session, *, run_id: str) -> list[tuple[Finding, int, int]]:
    """Every finding of every rule on a stored run, merged per (rule, layer) as alerts would be."""
    _, findings = replay.replay(session, run_id=run_id, before_step=None, make=RunDiagnosis)
    return merge(findings)
