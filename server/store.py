"""Data functions over the tables: what ingest writes and what the REST routes read.

Keyword-only arguments, no HTTP, no SQL outside this file (and server/rollup.py,
the step rollups it keeps). Writes go through `ingest_batch`, which stores one
client batch in one transaction; reads return plain dataclasses and dicts that
outlive the session. Upserts use the INSERT ... ON CONFLICT form that SQLite and
PostgreSQL share, so the same code runs on both; on SQLite the per-layer rows
(most of a batch) skip SQLAlchemy's per-row work and go to the driver as tuples.

Series reads are downsampled when the range is longer than `max_points`: the
bucket width is rounded to one the rollups serve (`rollup.plan`: between half
and all of `max_points` buckets), each bucket keeps its extremes (a spike
survives), and a window short enough comes back at full resolution.
"""

from __future__ import annotations

import functools
import struct
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Table, func, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from client_hook import wire
from layerwatch.server import rollup
from layerwatch.server.tables import Alert, Histogram, LayerStat, Project, ReceivedFrame, Run, Scalar, StepSignal
from layerwatch.server.webhooks import outbox

SEVERITIES: tuple[str, ...] = wire.SEVERITIES
ALERT_NEW, ALERT_ESCALATED, ALERT_UPDATED = "new", "escalated", "updated"
HEATMAP_STATS: tuple[str, ...] = rollup.STATS
_UINT32_MAX = 0xFFFFFFFF


class UnknownRunError(ValueError):
    """A frame for a run that was never started."""


# ---------------------------------------------------------------- results


@dataclass
class IngestResult:
    """What one committed batch did: the seqs to ack and what the live push should announce."""

    acked: dict[str, list[int]] = field(default_factory=dict)
    changed_runs: list[str] = field(default_factory=list)
    # (run_id, key) -> (steps, values) of the points this batch stored, in arrival order.
    scalar_points: dict[tuple[str, str], tuple[list[int], list[float | None]]] = field(default_factory=dict)
    # run_id -> sorted steps that got new layer statistics or histograms.
    stat_steps: dict[str, list[int]] = field(default_factory=dict)
    stored_frames: int = 0
    replayed_frames: int = 0
    # Alerts this batch created or changed, with what happened to each (ALERT_NEW, ...).
    alerts: list[tuple[AlertInfo, str]] = field(default_factory=list)


@dataclass
class RunInfo:
    id: str
    name: str
    project: str
    status: str
    created_at: float
    updated_at: float
    finished_at: float | None
    last_step: int | None
    last_loss: float | None
    every: int | None
    alert_counts: dict[str, int]
    model: dict[str, Any]
    optimizer: dict[str, Any] | None
    config: dict[str, Any] | None
    dropped: dict[str, int] | None = None


@dataclass
class Finding:
    """One rule's verdict at one step: what an alert row is made from and updated by."""

    rule: str
    severity: str
    layer: str | None
    step: int
    message: str
    remedy: str
    evidence: dict[str, Any] | None = None


@dataclass
class AlertInfo:
    id: int
    run_id: str
    rule: str
    severity: str
    layer: str | None
    first_step: int
    last_step: int
    count: int
    message: str
    remedy: str
    evidence: dict[str, Any] | None
    created_at: float
    updated_at: float


# ---------------------------------------------------------------- encoding


_HIST_ROW = struct.Struct(f"<{wire.HIST_BINS}I")


def pack_counts(counts: Iterable[int]) -> bytes:
    """Histogram counts as little-endian uint32 (a count past 2**32 - 1 saturates)."""
    if isinstance(counts, list) and len(counts) == wire.HIST_BINS:
        try:  # the common case in one C call: ~1 us, where the clamping below costs ~10
            return _HIST_ROW.pack(*counts)
        except struct.error:
            pass  # a count past 2**32 - 1
    values = [min(int(c), _UINT32_MAX) for c in counts]
    return struct.pack(f"<{len(values)}I", *values)


def unpack_counts(blob: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(blob) // 4}I", blob))


# ---------------------------------------------------------------- writes


def ingest_batch(session: Session, *, frames: list[dict[str, Any]], now: float | None = None) -> IngestResult:
    """Store one validated batch in one transaction and commit it.

    A frame whose (run_id, seq) was stored before is skipped but acked again,
    so a client that replays after a lost ack stores nothing twice. Any error
    rolls the whole batch back: nothing partial is stored.
    """
    try:
        result = _ingest(session, frames, time.time() if now is None else now)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return result


def _ingest(session: Session, frames: list[dict[str, Any]], now: float) -> IngestResult:
    result = IngestResult()
    seqs_by_run: dict[str, list[int]] = defaultdict(list)
    for f in frames:
        if f["seq"] not in seqs_by_run[f["run_id"]]:
            seqs_by_run[f["run_id"]].append(f["seq"])
    result.acked = {run_id: list(seqs) for run_id, seqs in seqs_by_run.items()}

    seen: set[tuple[str, int]] = set()
    runs: dict[str, Run | None] = {}
    for run_id, seqs in seqs_by_run.items():
        runs[run_id] = session.get(Run, run_id)
        # A range, not an IN list: no bound-parameter limit however long the batch.
        stored = session.scalars(
            select(ReceivedFrame.seq).where(
                ReceivedFrame.run_id == run_id, ReceivedFrame.seq >= min(seqs), ReceivedFrame.seq <= max(seqs)
            )
        )
        seen.update((run_id, seq) for seq in stored)

    projects: dict[str, Project] = {}
    ledger: list[dict[str, Any]] = []
    scalars: dict[tuple[str, str, int], dict[str, Any]] = {}
    # Rows as tuples in table column order, in arrival order (a later row replaces an earlier one).
    stats: list[tuple[Any, ...]] = []
    hists: list[tuple[Any, ...]] = []
    signals: dict[tuple[str, int], dict[str, Any]] = {}
    findings: list[tuple[str, Finding]] = []
    changed: dict[str, None] = {}  # an ordered set
    stat_steps: dict[str, set[int]] = defaultdict(set)
    # (rollup spec, run_id, partition as (column, value) pairs) -> steps this batch wrote.
    rolled: dict[tuple[rollup.Spec, str, tuple[tuple[str, Any], ...]], set[int]] = defaultdict(set)

    for f in frames:
        run_id, seq, step, kind = f["run_id"], f["seq"], f["step"], f["kind"]
        if (run_id, seq) in seen:
            result.replayed_frames += 1
            continue
        seen.add((run_id, seq))

        if kind == "run_start":
            runs[run_id] = _start_run(session, runs.get(run_id), f, projects, now)
        run = runs.get(run_id)
        if run is None:
            raise UnknownRunError(f"unknown run {run_id!r}: send a 'run_start' frame first")

        if kind == "scalars":
            for key, value in f["values"].items():
                scalars[(run_id, key, step)] = {"run_id": run_id, "key": key, "step": step, "value": value}
                steps, values = result.scalar_points.setdefault((run_id, key), ([], []))
                steps.append(step)
                values.append(value)
                rolled[(rollup.SCALARS, run_id, (("key", key),))].add(step)
            if "loss" in f["values"]:
                run.last_loss = f["values"]["loss"]
            _advance(run, step)
        elif kind == "signals":
            row = signals.setdefault((run_id, step), {"run_id": run_id, "step": step})
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
            run.status = f["status"]
            run.finished_at = f["time"]
        if f.get("dropped"):  # heartbeat, run_end: the client's running totals
            run.dropped = dict(f["dropped"])
        if kind != "run_end" and run.status == "crashed":
            run.status = "running"  # it was only silent (a long stall, a network outage)

        run.updated_at = now
        changed[run_id] = None
        ledger.append({"run_id": run_id, "seq": seq})
        result.stored_frames += 1

    # The run rows must exist before rows that reference them.
    session.flush()
    # Each rollup needs the newest step stored before this batch (one index lookup each).
    previous = {key: rollup.newest_step(session, key[0], key[1], dict(key[2])) for key in rolled}
    if ledger:
        session.execute(insert(ReceivedFrame.__table__), ledger)
    _upsert(session, Scalar.__table__, list(scalars.values()))
    _upsert_tuples(session, LayerStat.__table__, stats)
    _upsert_tuples(session, Histogram.__table__, hists)
    _upsert(session, StepSignal.__table__, _full_rows(signals.values(), wire.SIGNAL_FIELDS))
    for (spec, run_id, part), steps in rolled.items():
        previous_step = previous[(spec, run_id, part)]
        rollup.roll_up(session, spec, run_id=run_id, partition=dict(part), steps=steps, previous=previous_step)
    result.alerts = [upsert_alert(session, run_id=run_id, finding=finding, now=now) for run_id, finding in findings]

    result.changed_runs = list(changed)
    result.stat_steps = {run_id: sorted(steps) for run_id, steps in stat_steps.items()}
    return result


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


def _upsert(session: Session, table: Table, rows: list[dict[str, Any]]) -> None:
    """Insert rows; a row whose primary key exists replaces the stored values."""
    if not rows:
        return
    keys = [c.name for c in table.primary_key.columns]
    dialect = session.get_bind().dialect.name
    if dialect in ("sqlite", "postgresql"):
        stmt = (sqlite.insert if dialect == "sqlite" else postgresql.insert)(table)
        stmt = stmt.on_conflict_do_update(
            index_elements=keys, set_={c.name: stmt.excluded[c.name] for c in table.columns if c.name not in keys}
        )
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
                    .values({k: v for k, v in row.items() if k not in keys})
                )


# ---------------------------------------------------------------- runs


def _alert_counts(session: Session, run_ids: Any) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(SEVERITIES, 0))
    rows = session.execute(
        select(Alert.run_id, Alert.severity, func.count())
        .where(Alert.run_id.in_(run_ids))
        .group_by(Alert.run_id, Alert.severity)
    )
    for run_id, severity, n in rows:
        counts[run_id][severity] = n
    return counts


def _run_info(run: Run, project: str, alert_counts: dict[str, int]) -> RunInfo:
    return RunInfo(
        id=run.id,
        name=run.name,
        project=project,
        status=run.status,
        created_at=run.created_at,
        updated_at=run.updated_at,
        finished_at=run.finished_at,
        last_step=run.last_step,
        last_loss=run.last_loss,
        every=run.every,
        alert_counts=alert_counts,
        model=run.model,
        optimizer=run.optimizer,
        config=run.config,
        dropped=run.dropped,
    )


def list_runs(session: Session, *, project: str | None = None, name: str | None = None) -> list[RunInfo]:
    """Runs, newest first, optionally only those of one project and/or with one name."""
    query = select(Run, Project.name).join(Project, Run.project_id == Project.id)
    if project is not None:
        query = query.where(Project.name == project)
    if name is not None:
        query = query.where(Run.name == name)
    rows = session.execute(query.order_by(Run.created_at.desc(), Run.id)).all()
    counts = _alert_counts(session, [run.id for run, _ in rows]) if rows else {}
    none = dict.fromkeys(SEVERITIES, 0)
    return [_run_info(run, project_name, counts.get(run.id, none)) for run, project_name in rows]


def get_run(session: Session, *, run_id: str) -> RunInfo | None:
    row = session.execute(
        select(Run, Project.name).join(Project, Run.project_id == Project.id).where(Run.id == run_id)
    ).first()
    if row is None:
        return None
    run, project_name = row
    counts = _alert_counts(session, [run_id])
    return _run_info(run, project_name, counts.get(run_id, dict.fromkeys(SEVERITIES, 0)))


def run_projects(session: Session, run_ids: list[str]) -> dict[str, str]:
    """{run id: project name} of those of `run_ids` that are stored (one query)."""
    if not run_ids:
        return {}
    rows = session.execute(
        select(Run.id, Project.name).join(Project, Run.project_id == Project.id).where(Run.id.in_(run_ids))
    )
    return {run_id: project for run_id, project in rows}


def find_run(session: Session, *, id_or_name: str) -> RunInfo | None:
    """The run with this id, else the newest run with this name, else None."""
    run = get_run(session, run_id=id_or_name)
    if run is not None:
        return run
    newest = session.scalar(
        select(Run.id).where(Run.name == id_or_name).order_by(Run.created_at.desc(), Run.id).limit(1)
    )
    return None if newest is None else get_run(session, run_id=newest)


def scalar_keys(session: Session, *, run_id: str) -> list[str]:
    return list(session.scalars(select(Scalar.key).where(Scalar.run_id == run_id).distinct().order_by(Scalar.key)))


def forward_order(model: dict[str, Any] | None) -> Any:
    """A sort key for (layer, param, kind): the model's module order (forward order),
    then the module's own parameter order, then the wire's kind order. Names the
    model does not list go last, alphabetically."""
    modules = (model or {}).get("modules") or []
    layer_index: dict[str, int] = {}
    param_index: dict[str, dict[str, int]] = {}
    for i, module in enumerate(modules):
        name = module.get("name")
        layer_index.setdefault(name, i)
        params = [p.get("name") if isinstance(p, dict) else p for p in module.get("params") or []]
        param_index.setdefault(name, {p: j for j, p in enumerate(params)})
    last = len(modules)
    kinds = {k: i for i, k in enumerate(wire.TENSOR_KINDS)}

    def key(series: tuple[str, str, str]) -> tuple[Any, ...]:
        layer, param, kind = series
        params = param_index.get(layer, {})
        return (
            layer_index.get(layer, last),
            layer,
            params.get(param, len(params)),
            param,
            kinds.get(kind, len(kinds)),
            kind,
        )

    return key


def run_series(session: Session, *, run_id: str, model: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    """The (layer, param, kind) series that have layer statistics, in forward order.

    Read as one bucket spanning the whole run, so from the coarsest rollups and
    a few exact steps at the end: a DISTINCT over a long run's rows takes seconds.
    """
    newest = rollup.newest_step(session, rollup.LAYER_STATS, run_id, {})
    if newest is None:
        return []
    top = rollup.LEVELS[-1]
    rows = rollup.cells(
        session, rollup.LAYER_STATS, run_id=run_id, where={}, aggregates=("first_step",), first=0, last=newest,
        width=top * (newest // top + 1), level=top,
    )  # fmt: skip
    return sorted({(layer, param, kind) for _, kind, layer, param, _ in rows}, key=forward_order(model))


# ---------------------------------------------------------------- series


DEFAULT_MAX_POINTS = 2000  # per trace: about a screen's width of pixels
_LAST_STEP = 2**62  # an open-ended step range's end: past any step


def _series_where(table: Any, *, run_id: str, start: int | None, end: int | None, columns: dict[str, Any]) -> list[Any]:
    """The where-clause of one run's rows in steps [start, end] whose `columns` have these values."""
    return [
        table.c.run_id == run_id,
        *(table.c[name] == value for name, value in columns.items()),
        *_step_range(table.c.step, start, end),
    ]


def _bucket_width(
    session: Session, table: Any, where: list[Any], start: int | None, end: int | None, max_points: int | None
) -> int:
    """Steps per bucket for a step range so that it has at most `max_points` buckets; 1 is full resolution.

    The range defaults to the stored one, found at the ends of the primary key
    (ORDER BY step LIMIT 1 each way; one query with both MIN and MAX would scan).
    """
    if max_points is None or (start is not None and end is not None and end - start + 1 <= max_points):
        return 1
    steps = select(table.c.step).where(*where)
    lo = session.scalar(steps.order_by(table.c.step).limit(1))
    if lo is None:
        return 1
    hi = session.scalar(steps.order_by(table.c.step.desc()).limit(1))
    lo = lo if start is None else max(lo, start)
    hi = hi if end is None else min(hi, end)
    return max(1, -(-(hi - lo + 1) // max_points))  # ceiling division


def _step_range(column: Any, start: int | None, end: int | None) -> list[Any]:
    return ([column >= start] if start is not None else []) + ([column <= end] if end is not None else [])


def _bucketed(
    session: Session,
    spec: rollup.Spec,
    *,
    run_id: str,
    columns: dict[str, Any],
    aggregates: tuple[str, ...],
    start: int | None,
    end: int | None,
    max_points: int | None,
    use_rollup: bool,
) -> list[tuple[Any, ...]]:
    """Rows (bucket, *series, *aggregates) of one series query; see `rollup.cells`.

    Past `max_points`, the width is rounded to one a rollup level serves (between
    half and all of `max_points` buckets); `use_rollup=False` computes the same
    buckets from the exact rows only (the reference the rollup is tested against).
    """
    where = _series_where(spec.source, run_id=run_id, start=start, end=end, columns=columns)
    width, level = rollup.plan(_bucket_width(session, spec.source, where, start, end, max_points))
    return rollup.cells(
        session,
        spec,
        run_id=run_id,
        where=columns,
        aggregates=aggregates,
        first=0 if start is None else start,
        last=_LAST_STEP if end is None else min(end, _LAST_STEP),  # bucket arithmetic stays in 64 bits
        width=width,
        level=level if use_rollup else None,
    )


def scalar_series(
    session: Session,
    *,
    run_id: str,
    key: str,
    start: int | None = None,
    end: int | None = None,
    max_points: int | None = None,
    use_rollup: bool = True,
) -> tuple[list[int], list[float | None]]:
    """(steps, values) of one scalar, ascending steps; NULL (a NaN in SQLite) reads as None.

    Steps in [start, end]; with `max_points`, ranges longer than that are cut into
    buckets and each keeps its minimum and maximum (at the bucket's first and last
    step), so a spike survives any zoom level. A NaN inside a bucket is dropped then.
    """
    window = {"start": start, "end": end, "max_points": max_points, "use_rollup": use_rollup}
    aggregates = ("first_step", "last_step", "low", "high")
    found = _bucketed(session, rollup.SCALARS, run_id=run_id, columns={"key": key}, aggregates=aggregates, **window)
    steps: list[int] = []
    values: list[float | None] = []
    for _, first, last, low, high in sorted(found):
        steps.append(first)
        values.append(low)
        if last != first:
            steps.append(last)
            values.append(high)
    return steps, values


def heatmap(
    session: Session,
    *,
    run_id: str,
    kind: str,
    stat: str,
    param: str | None = None,
    model: dict[str, Any] | None,
    start: int | None = None,
    end: int | None = None,
    max_points: int | None = None,
    use_rollup: bool = True,
) -> dict[str, Any]:
    """One statistic of every (layer, param) of one kind, as a rows x steps matrix.

    Rows follow the model's forward order; a step where a row has no value is None.
    Columns are the steps in [start, end]; with `max_points`, a longer range is cut
    into buckets, each column labelled with its first step (the earliest of any
    row's) and holding the bucket's extreme (MIN for `min`, MAX otherwise) so a
    spike survives.
    """
    if kind not in wire.TENSOR_KINDS:
        raise ValueError(f"kind must be one of {list(wire.TENSOR_KINDS)}, but got {kind!r}")
    if stat not in HEATMAP_STATS:
        raise ValueError(f"stat must be one of {list(HEATMAP_STATS)}, but got {stat!r}")
    columns = {"kind": kind} if param is None else {"kind": kind, "param": param}
    window = {"start": start, "end": end, "max_points": max_points, "use_rollup": use_rollup}
    found = _bucketed(
        session, rollup.LAYER_STATS, run_id=run_id, columns=columns, aggregates=("first_step", stat), **window
    )
    if param is not None:  # rows come without the param they were asked for
        found = [(bucket, layer, param, first, value) for bucket, layer, first, value in found]
    first_steps: dict[int, int] = {}  # bucket -> its first step over all rows
    cells: dict[tuple[str, str], dict[int, Any]] = defaultdict(dict)
    for bucket, layer, row_param, first, value in found:  # ~80k cells for a whole run: keep this loop plain
        if first_steps.get(bucket, first) >= first:
            first_steps[bucket] = first
        cells[(layer, row_param)][bucket] = value
    buckets = sorted(first_steps)
    order = forward_order(model)
    series = sorted(cells, key=lambda lp: order((lp[0], lp[1], kind)))
    # An activation row is the module's output: its label is the module alone.
    labels = [layer if kind == "activation" and p == wire.ACTIVATION_PARAM else f"{layer}.{p}" for layer, p in series]
    return {
        "kind": kind,
        "stat": stat,
        "rows": labels,
        "layers": [layer for layer, _ in series],
        "params": [p for _, p in series],
        "steps": [first_steps[b] for b in buckets],
        "z": [[cells[lp].get(b) for b in buckets] for lp in series],
    }


def layer_series(
    session: Session,
    *,
    run_id: str,
    layer: str,
    param: str,
    kind: str,
    start: int | None = None,
    end: int | None = None,
    max_points: int | None = None,
    use_rollup: bool = True,
) -> dict[str, Any]:
    """Every statistic of one (layer, param, kind) over steps: {"steps": [...], "<stat>": [...], ...}.

    With `max_points`, a longer [start, end] is cut into buckets; each point is the
    bucket's first step with each statistic's extreme in it (MIN for `min`, MAX otherwise).
    """
    window = {"start": start, "end": end, "max_points": max_points, "use_rollup": use_rollup}
    columns = {"layer": layer, "param": param, "kind": kind}
    aggregates = ("first_step", *HEATMAP_STATS)
    rows = sorted(
        _bucketed(session, rollup.LAYER_STATS, run_id=run_id, columns=columns, aggregates=aggregates, **window)
    )
    # rows: (bucket, first_step, *stats), by bucket
    out: dict[str, Any] = {"layer": layer, "param": param, "kind": kind, "steps": [r[1] for r in rows]}
    for i, name in enumerate(HEATMAP_STATS, start=2):
        out[name] = [r[i] for r in rows]
    return out


_IN_CHUNK = 500  # steps per IN list: far below any database's bound-parameter limit


def histogram_series(
    session: Session,
    *,
    run_id: str,
    layer: str,
    param: str,
    kind: str,
    start: int | None = None,
    end: int | None = None,
    max_points: int | None = None,
    use_rollup: bool = True,
) -> dict[str, Any]:
    """The histograms of one (layer, param, kind) over steps, counts unpacked to lists.

    With `max_points`, a longer [start, end] is cut into buckets and each keeps
    its last stored histogram (counts cannot be merged across different ranges).
    """
    table = Histogram.__table__
    columns = {"layer": layer, "param": param, "kind": kind}
    window = {"start": start, "end": end, "max_points": max_points, "use_rollup": use_rollup}
    found = _bucketed(session, rollup.HISTOGRAMS, run_id=run_id, columns=columns, aggregates=("last_step",), **window)
    steps = sorted(last for _, last in found)
    rows = []
    for i in range(0, len(steps), _IN_CHUNK):  # point lookups on the primary key
        chunk = steps[i : i + _IN_CHUNK]
        # No step range beside the IN list: with one, SQLite scans the range (every layer) instead.
        where = _series_where(table, run_id=run_id, start=None, end=None, columns=columns)
        query = select(table.c.step, table.c.lo, table.c.hi, table.c.counts).where(*where, table.c.step.in_(chunk))
        rows += session.execute(query.order_by(table.c.step)).all()
    return {
        "layer": layer,
        "param": param,
        "kind": kind,
        "bins": wire.HIST_BINS,
        "steps": [r.step for r in rows],
        "lo": [r.lo for r in rows],
        "hi": [r.hi for r in rows],
        "counts": [unpack_counts(r.counts) for r in rows],
    }


# ---------------------------------------------------------------- alerts


def list_alerts(session: Session, *, run_id: str) -> list[AlertInfo]:
    """A run's alerts in the order they first fired."""
    alerts = session.scalars(select(Alert).where(Alert.run_id == run_id).order_by(Alert.first_step, Alert.id))
    return [_alert_info(a) for a in alerts]


def _alert_info(a: Alert) -> AlertInfo:
    return AlertInfo(
        id=a.id,
        run_id=a.run_id,
        rule=a.rule,
        severity=a.severity,
        layer=a.layer,
        first_step=a.first_step,
        last_step=a.last_step,
        count=a.count,
        message=a.message,
        remedy=a.remedy,
        evidence=a.evidence,
        created_at=a.created_at,
        updated_at=a.updated_at,
    )


def upsert_alert(
    session: Session, *, run_id: str, finding: Finding, now: float, first_step: int | None = None
) -> tuple[AlertInfo, str]:
    """One alert per (run, rule, layer): create it, or update it with the latest finding.

    An update keeps the first step, extends the last, counts, and takes the
    newest message and evidence; severity only ever rises (a rise is
    ALERT_ESCALATED, which webhooks send again). `first_step` (default: the
    finding's step) is where a finding merged over several steps began. A new or
    escalated alert's webhook deliveries are queued here, in the same
    transaction, so they commit with it. Not committed here: callers
    commit with the data that raised it.
    """
    layer_match = Alert.layer.is_(None) if finding.layer is None else Alert.layer == finding.layer
    alert = session.scalar(select(Alert).where(Alert.run_id == run_id, Alert.rule == finding.rule, layer_match))
    if alert is None:
        alert = Alert(
            run_id=run_id,
            rule=finding.rule,
            severity=finding.severity,
            layer=finding.layer,
            first_step=finding.step if first_step is None else first_step,
            last_step=finding.step,
            count=1,
            message=finding.message,
            remedy=finding.remedy,
            evidence=finding.evidence,
            created_at=now,
            updated_at=now,
        )
        session.add(alert)
        change = ALERT_NEW
    else:
        escalated = SEVERITIES.index(finding.severity) > SEVERITIES.index(alert.severity)
        alert.severity = finding.severity if escalated else alert.severity
        alert.first_step = min(alert.first_step, finding.step if first_step is None else first_step)
        alert.last_step = max(alert.last_step, finding.step)
        alert.count += 1
        alert.message, alert.remedy, alert.evidence = finding.message, finding.remedy, finding.evidence
        alert.updated_at = now
        change = ALERT_ESCALATED if escalated else ALERT_UPDATED
    session.flush()  # for the id
    info = _alert_info(alert)
    outbox.enqueue(session, alert=info, change=change, now=now)  # sends only on new or escalated
    return info, change
