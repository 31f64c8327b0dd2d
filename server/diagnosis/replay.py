"""Read a stored run back in step order and feed it through a RunDiagnosis.

Rows are read in chunks of CHUNK_STEPS steps (`store.read_steps`), so a long
run is replayed in bounded memory. The rows are the stored ones, so a replay
sees exactly what the live engine saw (NaN comes back from SQLite as NULL and
reads as NaN).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from layerwatch.server import store
from layerwatch.server.records import Finding

CHUNK_STEPS = 2000


def replay(
    session: Session, *, run_id: str, before_step: int | None, make: Callable[..., Any]
) -> tuple[Any, list[Finding]]:
    """Feed the stored steps (all, or those before `before_step`) of a run; return the diagnosis and its findings."""
    run = store.stored_run(session, run_id=run_id)
    if run is None:
        raise KeyError(f"no run with id {run_id!r}")
    diagnosis = make(run_id, run.model, run.optimizer, run.config)
    diagnosis.history.wait_for_ranks = False  # each step below comes with every rank's rows
    end = run.last_step + 1 if before_step is None else min(before_step, run.last_step + 1)
    findings: list[Finding] = []
    for start in range(0, end, CHUNK_STEPS):
        steps = store.read_steps(session, run_id=run_id, start=start, stop=min(start + CHUNK_STEPS, end))
        for step in sorted(steps):
            scalars, signals, stats, rank_signals = steps[step]
            # Step by step, as live: the history's window never skips a step unevaluated.
            if scalars:
                diagnosis.history.add_scalars(step, scalars)
            if signals:
                diagnosis.history.add_signals(step, signals)
            if stats:
                diagnosis.history.add_stats(step, stats)
            for rank, fields in rank_signals.items():
                diagnosis.history.add_rank_signals(step, rank, fields)
            findings += diagnosis.evaluate()
    if before_step is None and run.status != "running":
        diagnosis.history.finished = True
        findings += diagnosis.evaluate()
    diagnosis.history.wait_for_ranks = True  # live from here on (a run resumed after a restart)
    return diagnosis, findings
