"""Read a stored run back in step order and feed it through a RunDiagnosis.

Rows are read in chunks of CHUNK_STEPS steps, so a long run is replayed in
bounded memory. The rows are the stored ones, so a replay sees exactly what
the live engine saw (NaN comes back from SQLite as NULL and reads as NaN).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from client_hook import wire
from layerwatch.server.records import Finding
from layerwatch.server.tables import LayerStat, Run, Scalar, StepSignal

CHUNK_STEPS = 2000


def replay(
    session: Session, *, run_id: str, before_step: int | None, make: Callable[..., Any]
) -> tuple[Any, list[Finding]]:
    """Feed the stored steps (all, or those before `before_step`) of a run; return the diagnosis and its findings."""
    run = session.get(Run, run_id)
    if run is None:
        raise KeyError(f"no run with id {run_id!r}")
    diagnosis = make(run_id, run.model, run.optimizer, run.config)
    last = session.scalar(select(func.max(Scalar.step)).where(Scalar.run_id == run_id))
    last_signal = session.scalar(select(func.max(StepSignal.step)).where(StepSignal.run_id == run_id))
    last = max(s for s in (last, last_signal, run.last_step, -1) if s is not None)
    end = last + 1 if before_step is None else min(before_step, last + 1)
    findings: list[Finding] = []
    for start in range(0, end, CHUNK_STEPS):
        steps = _read_chunk(session, run_id, start, min(start + CHUNK_STEPS, end))
        for step in sorted(steps):
            scalars, signals, stats = steps[step]
            # Step by step, as live: the history's window never skips a step unevaluated.
            if scalars:
                diagnosis.history.add_scalars(step, scalars)
            if signals:
                diagnosis.history.add_signals(step, signals)
            if stats:
                diagnosis.history.add_stats(step, stats)
            findings += diagnosis.evaluate()
    if before_step is None and run.status != "running":
        diagnosis.history.finished = True
        findings += diagnosis.evaluate()
    return diagnosis, findings


StepData = tuple[dict[str, Any], dict[str, Any], list[tuple[Any, ...]]]  # stat rows in wire.LAYER_STAT_COLUMNS order


def _read_chunk(session: Session, run_id: str, start: int, stop: int) -> dict[int, StepData]:
    """Scalars, signals and layer statistics of steps [start, stop), by step."""
    steps: dict[int, StepData] = {}

    def at(step: int) -> StepData:
        return steps.setdefault(step, ({}, {}, []))

    for key, step, value in session.execute(
        select(Scalar.key, Scalar.step, Scalar.value).where(
            Scalar.run_id == run_id, Scalar.step >= start, Scalar.step < stop
        )
    ):
        at(step)[0][key] = value
    signal_columns = [StepSignal.__table__.c[name] for name in wire.SIGNAL_FIELDS]
    for row in session.execute(
        select(StepSignal.step, *signal_columns).where(
            StepSignal.run_id == run_id, StepSignal.step >= start, StepSignal.step < stop
        )
    ):
        at(row[0])[1].update({k: v for k, v in zip(wire.SIGNAL_FIELDS, row[1:]) if v is not None})
    stat_columns = [LayerStat.__table__.c[name] for name in wire.LAYER_STAT_COLUMNS]
    for row in session.execute(
        select(LayerStat.step, *stat_columns).where(
            LayerStat.run_id == run_id, LayerStat.step >= start, LayerStat.step < stop
        )
    ):
        at(row[0])[2].append(tuple(row[1:]))  # in wire.LAYER_STAT_COLUMNS order, as history.add_stats reads them
    return steps
