"""The write path: `ingest_batch` stores one client batch in one transaction (idempotent per (run, rank, seq)).

A distributed run has one sender per rank, each numbering its frames from 0: rank 0's (and a
process's outside any process group) are keyed (run, seq) in `received_frames`, a rank r > 0's
(run, rank, seq) in `received_rank_frames`. A rank r > 0 stores what differs per rank: its
scalars under `wire.rank_key` ("loss/rank1"), its signals in `rank_step_signals`; its run_start
creates the run if rank 0's has not come yet (rank 0's then replaces that description) and
otherwise changes nothing, and its run_end leaves the run's status to rank 0.

Upserts use the INSERT ... ON CONFLICT form that SQLite and PostgreSQL share, so the same code
runs on both; on SQLite the per-layer rows (most of a batch) skip SQLAlchemy's per-row work and
go to the driver as tuples. Findings a client sent (preflight) become alerts through the
`raise_alert` the caller passes (the ingest route's queues their webhooks too).
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, Protocol

from sqlalchemy import Table, func, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from client_hook import wire
from layerwatch.server.records import (
    AlertInfo,
    Finding,
    IngestResult,
    UnknownRunError,
)
from layerwatch.server.store import rollup
from layerwatch.server.store.alerts import upsert_alert
from layerwatch.server.store.codec import pack_counts
from layerwatch.server.store.runs import secret_hash
from layerwatch.server.tables import (
    Histogram,
    LayerStat,
    Project,
    RankStepSignal,
    ReceivedFrame,
    ReceivedRankFrame,
    Run,
    Scalar,
    StepSignal,
)


class RaiseAlert(Protocol):
    """Turns a finding into an alert in the caller's transaction (`alerting.raise_alert`)."""

    def __call__(
        self, session: Session, *, run_id: str, finding: Finding, now: float, first_step: int | None = None
    ) -> tuple[AlertInfo, str]: ...


def ingest_batch(
    session: Session,
    *,
    frames: list[dict[str, Any]],
    now: float | None = None,
    raise_alert: RaiseAlert = upsert_alert,
) -> IngestResult:
    """Store one validated batch in one transaction and commit it.

    A `findings` frame (what a client's preflight found) becomes an alert through
    `raise_alert`, in the batch's transaction: the ingest route passes
    `alerting.raise_alert`, which also queues the webhooks; the default writes the
    alert row only.

    A frame whose (run_id, rank, seq) was stored before is skipped but acked again,
    so a client that replays after a lost ack stores nothing twice. Any error
    rolls the whole batch back: nothing partial is stored.
    """
    try:
        result = _ingest(session, frames, time.time() if now is None else now, raise_alert)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return result


def _ingest(session: Session, frames: list[dict[str, Any]], now: float, raise_alert: RaiseAlert) -> IngestResult:
    result = IngestResult()
    # Per sender: (run_id, rank), rank 0 for a frame without one.
    seqs_by_sender: dict[tuple[str, int], list[int]] = defaultdict(list)
    for f in frames:
        sender = (f["run_id"], f.get("rank") or 0)
        if f["seq"] not in seqs_by_sender[sender]:
            seqs_by_sender[sender].append(f["seq"])
    for (run_id, rank), seqs in seqs_by_sender.items():
        if rank == 0:
            result.acked[run_id] = list(seqs)
        else:
            result.acked_ranks.setdefault(run_id, {})[str(rank)] = list(seqs)

    seen: set[tuple[str, int, int]] = set()
    runs: dict[str, Run | None] = {}
    for (run_id, rank), seqs in seqs_by_sender.items():
        if run_id not in runs:
            runs[run_id] = session.get(Run, run_id)
        seen.update((run_id, rank, seq) for seq in _stored_seqs(session, run_id, rank, min(seqs), max(seqs)))

    projects: dict[str, Project] = {}
    ledger: list[dict[str, Any]] = []
    rank_ledger: list[dict[str, Any]] = []
    scalars: dict[tuple[str, str, int], dict[str, Any]] = {}
    # Rows as tuples in table column order, in arrival order (a later row replaces an earlier one).
    stats: list[tuple[Any, ...]] = []
    hists: list[tuple[Any, ...]] = []
    signals: dict[tuple[str, int], dict[str, Any]] = {}
    rank_signals: dict[tuple[str, int, int], dict[str, Any]] = {}
    findings: list[tuple[str, Finding]] = []
    changed: dict[str, None] = {}  # an ordered set
    stat_steps: dict[str, set[int]] = defaultdict(set)
    # (rollup spec, run_id, partition as (column, value) pairs) -> steps this batch wrote.
    rolled: dict[tuple[rollup.Spec, str, tuple[tuple[str, Any], ...]], set[int]] = defaultdict(set)

    for f in frames:
        run_id, seq, step, kind = f["run_id"], f["seq"], f["step"], f["kind"]
        rank = f.get("rank") or 0
        if (run_id, rank, seq) in seen:
            result.replayed_frames += 1
            continue
        seen.add((run_id, rank, seq))

        # A rank r > 0's run_start joins the run: it describes the run only until rank 0's comes.
        if kind == "run_start" and (rank == 0 or runs.get(run_id) is None):
            runs[run_id] = _start_run(session, runs.get(run_id), f, projects, now)
        run = runs.get(run_id)
        if run is None:
            raise UnknownRunError(f"unknown run {run_id!r}: send a 'run_start' frame first")

        if kind == "scalars":
            for key, value in f["values"].items():
                key = wire.rank_key(key, rank)
                scalars[(run_id, key, step)] = {"run_id": run_id, "key": key, "step": step, "value": value}
                steps, values = result.scalar_points.setdefault((run_id, key), ([], []))
                steps.append(step)
                values.append(value)
                rolled[(rollup.SCALARS, run_id, (("key", key),))].add(step)
            if "loss" in f["values"] and rank == 0:
                run.last_loss = f["values"]["loss"]
            _advance(run, step)
        elif kind == "signals":
            if rank == 0:
                row = signals.setdefault((run_id, step), {"run_id": run_id, "step": step})
            else:
                row = rank_signals.setdefault((run_id, rank, step), {"run_id": run_id, "rank": rank, "step": step})
            row.update({name: f[name] for name in wire.SIGNAL_FIELDS if name in f})
            _advance(run, step)
        elif kind == "findings":
            findings += [
                (run_id, Finding(step=step, **{k: x.get(k) for k in wire.FINDING_FIELDS})) for x in f["findings"]
            ]
        elif kind == "layer_stats":
            # Rows arrive in wire.LAYER_STAT_COLUMNS order, which is the table's after (run_id, step).
            stats += [(run_id, step, *row) for row in f["rows"]]
            rolled[(rollup.LAYER_STATS, run_id, ())].add(step)
            if "every" in f:
                run.every = f["every"]
            stat_steps[run_id].add(step)
            _advance(run, step)
        elif kind == "histograms":
            hists += [(run_id, step, *row[:5], pack_counts(row[5])) for row in f["rows"]]
            rolled[(rollup.HISTOGRAMS, run_id, ())].add(step)
            stat_steps[run_id].add(step)
            _advance(run, step)
        elif kind == "run_end":
            if rank == 0:  # the run ends with rank 0; another rank's end is its own
                run.status = f["status"]
                run.finished_at = f["time"]
        elif kind not in ("run_start", "heartbeat"):  # those two only touch the run row
            # A kind wire.py accepts but nothing here stores (see wire's checklist for a new kind).
            raise ValueError(f"the store has no rows for frame kind {kind!r}")
        if f.get("dropped"):  # heartbeat, run_end: the client's running totals
            run.dropped = _merge_drops(run.dropped, f["dropped"], rank)
        if kind != "run_end" and run.status == "crashed":
            run.status = "running"  # it was only silent (a long stall, a network outage)

        run.updated_at = now
        changed[run_id] = None
        if rank == 0:
            ledger.append({"run_id": run_id, "seq": seq})
        else:
            rank_ledger.append({"run_id": run_id, "rank": rank, "seq": seq})
        result.stored_frames += 1

    # The run rows must exist before rows that reference them.
    session.flush()
    # Each rollup needs the newest step stored before this batch (one index lookup each).
    previous = {key: rollup.newest_step(session, key[0], key[1], dict(key[2])) for key in rolled}
    if ledger:
        session.execute(insert(ReceivedFrame.__table__), ledger)
    if rank_ledger:
        session.execute(insert(ReceivedRankFrame.__table__), rank_ledger)
    _upsert(session, Scalar.__table__, list(scalars.values()))
    _upsert_tuples(session, LayerStat.__table__, stats)
    _upsert_tuples(session, Histogram.__table__, hists)
    _upsert(session, StepSignal.__table__, _full_rows(signals.values(), wire.SIGNAL_FIELDS), merge=True)
    _upsert(session, RankStepSignal.__table__, _full_rows(rank_signals.values(), wire.SIGNAL_FIELDS), merge=True)
    for (spec, run_id, part), steps in rolled.items():
        previous_step = previous[(spec, run_id, part)]
        rollup.roll_up(session, spec, run_id=run_id, partition=dict(part), steps=steps, previous=previous_step)
    result.alerts = [raise_alert(session, run_id=run_id, finding=finding, now=now) for run_id, finding in findings]

    result.changed_runs = list(changed)
    result.stat_steps = {run_id: sorted(steps) for run_id, steps in stat_steps.items()}
    return result


def _stored_seqs(session: Session, run_id: str, rank: int, low: int, high: int) -> Iterable[int]:
    """The seqs in [low, high] of one sender of `run_id` stored before: rank 0's ledger, or a rank's own."""
    # A range, not an IN list: no bound-parameter limit however long the batch.
    if rank == 0:
        return session.scalars(
            select(ReceivedFrame.seq).where(
                ReceivedFrame.run_id == run_id, ReceivedFrame.seq >= low, ReceivedFrame.seq <= high
            )
        )
    return session.scalars(
        select(ReceivedRankFrame.seq).where(
            ReceivedRankFrame.run_id == run_id,
            ReceivedRankFrame.rank == rank,
            ReceivedRankFrame.seq >= low,
            ReceivedRankFrame.seq <= high,
        )
    )


def _merge_drops(stored: dict[str, int] | None, counts: dict[str, int], rank: int) -> dict[str, int]:
    """The run's drop counts with one rank's running totals replaced: rank 0's by reason, a rank r > 0's
    as "reason/rank<r>" (`wire.rank_key`), so each rank's totals stand beside the others'."""
    kept = {key: n for key, n in (stored or {}).items() if wire.key_rank(key)[1] != rank}
    kept.update({wire.rank_key(key, rank): n for key, n in counts.items()})
    return kept


def _full_rows(rows: Iterable[dict[str, Any]], fields: tuple[str, ...]) -> list[dict[str, Any]]:
    """Rows with every field present (None where a frame left it out): one executemany shape."""
    return [{**dict.fromkeys(fields), **row} for row in rows]


def _start_run(session: Session, run: Run | None, f: dict[str, Any], projects: dict[str, Project], now: float) -> Run:
    project = projects.get(f["project"])
    if project is None:
        project = session.scalar(select(Project).where(Project.name == f["project"]))
        if project is None:
            project = Project(name=f["project"])
            session.add(project)
            session.flush()  # for its id
        projects[f["project"]] = project
    if run is None:
        run = Run(id=f["run_id"], status="running", created_at=f["time"], updated_at=now)
        # The first run_start's secret decides who may write the run (routes/ingest.py checks it).
        run.secret_hash = secret_hash(f["secret"]) if f.get("secret") else None
        session.add(run)
    # A run_start for a run we know (a client re-attaching) only refreshes its description.
    run.project_id = project.id
    run.name = f["name"]
    run.model = f["model"]
    run.optimizer = f.get("optimizer")
    run.config = f.get("config")
    return run


def _advance(run: Run, step: int) -> None:
    if run.last_step is None or step > run.last_step:
        run.last_step = step


@functools.cache
def _upsert_sql(table: Table) -> str:
    """INSERT ... ON CONFLICT (primary key) DO UPDATE of every other column, with qmark parameters."""
    columns = list(table.columns.keys())
    keys = [c.name for c in table.primary_key.columns]
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in keys)
    return (
        f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
        f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {updates}"
    )


def _upsert_tuples(session: Session, table: Table, rows: list[tuple[Any, ...]]) -> None:
    """`_upsert` for rows given as tuples in table column order: the bulk path of the per-layer tables.

    On SQLite the rows go straight to the driver's executemany with one SQL text:
    about 4x cheaper than a Core executemany of dicts, which binds each row by name.
    Rows run one by one in order, so a later row with the same key replaces an
    earlier one. Other databases take the dialect-neutral `_upsert`, after the
    same last-one-wins dedup (PostgreSQL refuses a key twice in one statement).
    """
    if not rows:
        return
    if session.get_bind().dialect.name == "sqlite":
        session.connection().exec_driver_sql(_upsert_sql(table), rows)
    else:
        names = table.columns.keys()
        width = len(table.primary_key.columns)  # the key columns come first in these tables
        latest = {row[:width]: row for row in rows}
        _upsert(session, table, [dict(zip(names, row, strict=True)) for row in latest.values()])


def _upsert(session: Session, table: Table, rows: list[dict[str, Any]], *, merge: bool = False) -> None:
    """Insert rows; a row whose primary key exists replaces the stored values.

    `merge`: a NULL in the new row keeps the stored value (COALESCE): a step's signals come in
    more than one frame (the step's own, then `log(targets=...)`'s), maybe in different batches,
    and a later frame must not erase what an earlier one stored."""
    if not rows:
        return
    keys = [c.name for c in table.primary_key.columns]
    dialect = session.get_bind().dialect.name
    if dialect in ("sqlite", "postgresql"):
        stmt = (sqlite.insert if dialect == "sqlite" else postgresql.insert)(table)
        values = {
            c.name: func.coalesce(stmt.excluded[c.name], c) if merge else stmt.excluded[c.name]
            for c in table.columns
            if c.name not in keys
        }
        stmt = stmt.on_conflict_do_update(index_elements=keys, set_=values)
        session.execute(stmt, rows)
    else:  # other databases: slower, but the same result
        for row in rows:
            existing = session.execute(select(table).where(*(table.c[k] == row[k] for k in keys))).first()
            if existing is None:
                session.execute(insert(table), [row])
            else:
                session.execute(
                    table.update()
                    .where(*(table.c[k] == row[k] for k in keys))
                    .values({k: v for k, v in row.items() if k not in keys and not (merge and v is None)})
                )


# ---------------------------------------------------------------- runs
