"""A stored run read back by step, for the diagnosis replay: where it ends, then its steps in chunks.

The rows are the stored ones, so a replay sees exactly what the live engine saw
(NaN comes back from SQLite as NULL; the history reads it as NaN).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from client_hook import wire
from layerwatch.server.records import StoredRun
from layerwatch.server.tables import LayerStat, RankStepSignal, Run, Scalar, StepSignal

# One step's (scalars by key, signals by field, layer-statistics rows in wire.LAYER_STAT_COLUMNS order,
# and the signals of the ranks r > 0 of a distributed run by rank, then field).
StepData = tuple[dict[str, Any], dict[str, Any], list[tuple[Any, ...]], dict[int, dict[str, Any]]]


def stored_run(session: Session, *, run_id: str) -> StoredRun | None:
    """How a stored run describes itself, its status, and the newest step it has anything stored at; None if unknown."""
    run = session.get(Run, run_id)
    if run is None:
        return None
    last = session.scalar(select(func.max(Scalar.step)).where(Scalar.run_id == run_id))
    last_signal = session.scalar(select(func.max(StepSignal.step)).where(StepSignal.run_id == run_id))
    last_rank = session.scalar(select(func.max(RankStepSignal.step)).where(RankStepSignal.run_id == run_id))
    return StoredRun(
        model=run.model,
        optimizer=run.optimizer,
        config=run.config,
        status=run.status,
        last_step=max(s for s in (last, last_signal, last_rank, run.last_step, -1) if s is not None),
    )


def read_steps(session: Session, *, run_id: str, start: int, stop: int) -> dict[int, StepData]:
    """Scalars, signals, layer statistics and other ranks' signals of steps [start, stop), by step (in no
    particular order)."""
    steps: dict[int, StepData] = {}

    def at(step: int) -> StepData:
        return steps.setdefault(step, ({}, {}, [], {}))

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
    rank_columns = [RankStepSignal.__table__.c[name] for name in wire.SIGNAL_FIELDS]
    for row in session.execute(
        select(RankStepSignal.step, RankStepSignal.rank, *rank_columns).where(
            RankStepSignal.run_id == run_id, RankStepSignal.step >= start, RankStepSignal.step < stop
        )
    ):
        signals = at(row[0])[3].setdefault(row[1], {})
        signals.update({k: v for k, v in zip(wire.SIGNAL_FIELDS, row[2:]) if v is not None})
    stat_columns = [LayerStat.__table__.c[name] for name in wire.LAYER_STAT_COLUMNS]
    for row in session.execute(
        select(LayerStat.step, *stat_columns).where(
            LayerStat.run_id == run_id, LayerStat.step >= start, LayerStat.step < stop
        )
    ):
        at(row[0])[2].append(tuple(row[1:]))  # in wire.LAYER_STAT_COLUMNS order, as history.add_stats reads them
    return steps
