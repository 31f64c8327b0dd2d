"""Step-bucket rollups: how a whole-run query on a 100k-step run reads thousands of rows, not millions.

A rollup row summarizes one series (a scalar key; a layer's param and kind)
over one bucket of `level` steps, bucket b holding steps [b * level, (b + 1) *
level), for each level of LEVELS. What a row keeps is what the downsampled
queries show, and composes across buckets: a MIN, a MAX, a first or last step.

Ingest keeps them current (`roll_up`, in the batch's transaction): a bucket is
written once it is *complete*, i.e. once a later step of the run (of the key,
for scalars) is stored, and written again if a late or re-sent value lands in
a complete bucket. Each level is computed in SQL from the level below (level 4
from the exact rows), so a step costs about one extra row read per series and
a third of a row written, however long the run.

Queries (`cells`) cover a step range with whole complete buckets of the
coarsest level that fits, the ragged edges and the incomplete tail with finer
levels, and what no level covers with the exact rows; every piece is grouped
by the same output bucket and merged. The answer is the one a GROUP BY over
the exact rows gives (tests/test_rollup.py checks it on random data), because
the same SQL aggregates build it. `plan` rounds a wanted bucket width to one
the levels serve: between half and all of the points asked for.

A database from before the rollups gets them when it is opened: `init_db` asks
`runs_missing_rollups` and `rebuild`s each of those runs.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, Integer, String, Table, and_, bindparam, func, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from client_hook import wire
from layerwatch.server.tables import (
    Histogram,
    HistogramRollup,
    LayerStat,
    LayerStatRollup,
    Run,
    Scalar,
    ScalarRollup,
)

# Powers of 4: a wanted width w is served by a level within 2x of it (see `plan`), so a
# query reads at most ~2 rollup rows per point it returns. 65536 covers 100M-step runs
# at ~1,500 points; levels are cheap (level L writes a row per series every L steps).
FANOUT = 4
LEVELS: tuple[int, ...] = tuple(FANOUT**i for i in range(1, 9))


@dataclass(frozen=True)
class Spec:
    """One rolled-up table: its exact rows, its rollup, and what a rollup row keeps.

    `aggregates` are (rollup column, exact column, "min" | "max"); `series` the
    columns that name a series; `partition` the series columns whose newest step
    decides completeness (none: the run's newest step); `series_index` the
    rollup's index for reading one series (SQLite's planner, without statistics,
    would rather scan every series' rows in the bucket range: 3x slower at 50
    series, 30x at 600).
    """

    source: Table
    rollup: Table
    series: tuple[str, ...]
    partition: tuple[str, ...]
    aggregates: tuple[tuple[str, str, str], ...]
    series_index: str | None = None


# The layer statistics a rollup keeps the extreme of: all the heatmap can show.
STATS: tuple[str, ...] = wire.LAYER_STATS


def _extremes(names: Iterable[str]) -> tuple[tuple[str, str, str], ...]:
    return tuple((name, name, "min" if name == "min" else "max") for name in names)


LAYER_STATS = Spec(
    source=LayerStat.__table__,
    rollup=LayerStatRollup.__table__,
    series=("kind", "layer", "param"),
    partition=(),
    aggregates=(("first_step", "step", "min"), *_extremes(STATS)),
    series_index="ix_layer_stat_rollups_series",
)
HISTOGRAMS = Spec(
    source=Histogram.__table__,
    rollup=HistogramRollup.__table__,
    series=("layer", "param", "kind"),
    partition=(),
    aggregates=(("last_step", "step", "max"),),
    series_index="ix_histogram_rollups_series",
)
SCALARS = Spec(
    source=Scalar.__table__,
    rollup=ScalarRollup.__table__,
    series=("key",),
    partition=("key",),
    aggregates=(("first_step", "step", "min"), ("last_step", "step", "max"), ("low", "value", "min"),
                ("high", "value", "max")),
)  # fmt: skip
SPECS: tuple[Spec, ...] = (LAYER_STATS, HISTOGRAMS, SCALARS)

_FUNCTIONS = {"min": func.min, "max": func.max}


# ---------------------------------------------------------------- planning


def plan(width: int) -> tuple[int, int | None]:
    """(bucket width, rollup level) for a wanted width: the level's own width when it is
    at most 2x the wanted one, else the wanted width rounded up to a multiple of the
    largest level below it. Width 1 (full resolution) reads exact rows: level None."""
    if width <= 1:
        return 1, None
    above = [level for level in LEVELS if level >= width]
    if above and above[0] <= 2 * width:
        return above[0], above[0]
    level = max(level for level in LEVELS if level <= width)
    return level * -(-width // level), level


def newest_step(session: Session, spec: Spec, run_id: str, partition: dict[str, Any]) -> int | None:
    """The newest stored step of a run (of one key, for scalars): MAX on the primary key, no scan."""
    table = spec.source
    where = [table.c.run_id == run_id, *(table.c[name] == partition[name] for name in spec.partition)]
    return session.scalar(select(func.max(table.c.step)).where(*where))


# ---------------------------------------------------------------- ingest


def roll_up(
    session: Session, spec: Spec, *, run_id: str, partition: dict[str, Any], steps: set[int], previous: int | None
) -> None:
    """Bring the rollup of one run (one key) up to date after a batch stored `steps`.

    `previous` is the newest step stored before the batch. Buckets that became
    complete, and complete buckets the batch wrote into, are (re)computed, each
    level from the one below, lowest first.
    """
    if not steps:
        return
    newest = max(steps) if previous is None else max(previous, max(steps))
    for level in LEVELS:
        complete = newest // level  # buckets [0, complete) are complete
        if complete == 0:
            return  # and no higher level has a complete bucket either
        start = min(steps) // level if previous is None else previous // level
        # Newly complete buckets are one range (kept as bounds: a jump of a billion steps is
        # one statement, not a billion buckets); complete ones the batch wrote into come singly.
        written = _runs({s // level for s in steps if s // level < start})
        for first, last in [*written, *([(start, complete)] if start < complete else [])]:
            _compute(session, spec, run_id=run_id, partition=partition, level=level, first=first, last=last)


def missing(session: Session, *, run_id: str) -> bool:
    """Whether a run has a complete bucket in some table but no rollup row (two short index
    reads a table): a run stored before the rollups existed. (`rebuild` is one transaction
    per run, so a run it did is done whole.)"""
    for spec in SPECS:
        exact, rolled = spec.source.c, spec.rollup.c
        past_first_bucket = select(exact.step).where(exact.run_id == run_id, exact.step >= LEVELS[0]).limit(1)
        first_level = select(rolled.level).where(rolled.run_id == run_id, rolled.level == LEVELS[0]).limit(1)
        if session.scalar(past_first_bucket) is not None and session.scalar(first_level) is None:
            return True
    return False


def runs_missing_rollups(session: Session) -> list[str]:
    """The ids of the stored runs that lack rollup rows (see `missing`), for `init_db` to `rebuild`."""
    return [run_id for run_id in session.scalars(select(Run.id)) if missing(session, run_id=run_id)]


def rebuild(session: Session, *, run_id: str) -> None:
    """Every complete bucket of one run, from its exact rows (a database from before the rollups)."""
    for spec in SPECS:
        partitions = [()] if not spec.partition else session.execute(
            select(*(spec.source.c[name] for name in spec.partition)).where(spec.source.c.run_id == run_id).distinct()
        ).all()  # fmt: skip
        for values in partitions:
            partition = dict(zip(spec.partition, values, strict=True))
            newest = newest_step(session, spec, run_id, partition)
            if newest is None:
                continue
            for level in LEVELS:
                if newest // level:
                    _compute(session, spec, run_id=run_id, partition=partition, level=level, first=0,
                             last=newest // level)  # fmt: skip


def _runs(buckets: set[int]) -> list[tuple[int, int]]:
    """Sorted bucket numbers as half-open [first, last) runs of consecutive ones."""
    out: list[tuple[int, int]] = []
    for b in sorted(buckets):
        if out and out[-1][1] == b:
            out[-1] = (out[-1][0], b + 1)
        else:
            out.append((b, b + 1))
    return out


def _compute(
    session: Session, spec: Spec, *, run_id: str, partition: dict[str, Any], level: int, first: int, last: int
) -> None:
    """Write buckets [first, last) of one level, replacing what was there: one INSERT ... SELECT."""
    base = level == LEVELS[0]
    # In the exact table's steps or the child level's buckets, as the statement's SELECT reads them.
    scale = level if base else FANOUT
    params = {"run_id": run_id, "level": level, "child": level // FANOUT, "lo": first * scale, "hi": last * scale}
    params.update({f"p_{name}": value for name, value in partition.items()})
    dialect = session.get_bind().dialect.name
    select_, upsert = _compute_statements(spec, base, dialect)
    if upsert is not None:
        session.execute(upsert, params)
        return
    # Other databases: fetch, then replace row by row (slower, the same result).
    table = spec.rollup
    keys = [c.name for c in table.primary_key.columns]
    for row in session.execute(select_, params).mappings().all():
        session.execute(table.delete().where(and_(*(table.c[k] == row[k] for k in keys))))
        session.execute(insert(table).values(dict(row)))


@functools.cache
def _compute_statements(spec: Spec, base: bool, dialect: str) -> tuple[Any, Any]:
    """(SELECT, INSERT ... SELECT upsert or None) computing rollup rows, with bound parameters
    run_id, level, child, lo, hi, p_<partition column>. Built once: building it per batch cost
    more than running it on small batches."""
    lo, hi = bindparam("lo", type_=BigInteger), bindparam("hi", type_=BigInteger)
    level = bindparam("level", type_=Integer)
    if base:  # from the exact rows
        table = spec.source
        where = [table.c.step >= lo, table.c.step < hi]
        bucket = table.c.step // level  # integer division on both dialects (both sides are integers)
        values = [_FUNCTIONS[fn](table.c[exact]).label(name) for name, exact, fn in spec.aggregates]
    else:  # from the level below: FANOUT of its buckets make one of these
        table = spec.rollup
        where = [table.c.level == bindparam("child", type_=Integer), table.c.bucket >= lo, table.c.bucket < hi]
        bucket = table.c.bucket // FANOUT
        values = [_FUNCTIONS[fn](table.c[name]).label(name) for name, _, fn in spec.aggregates]
    where.append(table.c.run_id == bindparam("run_id", type_=String))
    where += [table.c[name] == bindparam(f"p_{name}", type_=table.c[name].type) for name in spec.partition]
    series = [table.c[name] for name in spec.series]
    names = ["run_id", "level", "bucket", *spec.series, *(name for name, _, _ in spec.aggregates)]
    run = bindparam("run_id", type_=String)
    query = select(run.label("run_id"), level.label("level"), bucket.label("bucket"), *series, *values)
    query = query.where(*where).group_by(bucket, *series)
    if dialect not in ("sqlite", "postgresql"):
        return query, None
    table = spec.rollup
    keys = [c.name for c in table.primary_key.columns]
    stmt = (sqlite.insert if dialect == "sqlite" else postgresql.insert)(table).from_select(names, query)
    # (SQLite parses an upsert after INSERT ... SELECT only when the SELECT has a WHERE; ours always has.)
    stmt = stmt.on_conflict_do_update(
        index_elements=keys, set_={name: stmt.excluded[name] for name in names if name not in keys}
    )
    return query, stmt


# ---------------------------------------------------------------- queries


def cells(
    session: Session,
    spec: Spec,
    *,
    run_id: str,
    where: dict[str, Any],
    aggregates: tuple[str, ...],
    first: int,
    last: int,
    width: int,
    level: int | None,
) -> list[tuple[Any, ...]]:
    """Rows (output bucket, *series, *aggregates) over steps [first, last] in buckets of `width`
    steps, one per bucket and series, in no particular order.

    `where` pins series columns (e.g. kind, or layer/param/kind); a row holds
    the other series columns, in `spec.series` order, then the `aggregates`
    (rollup column names of `spec`) in `spec.aggregates` order. With `level`
    None only exact rows are read (the reference answer, and full resolution);
    otherwise whole complete buckets of `level` and below come from the rollup.
    """
    chosen = [a for a in spec.aggregates if a[0] in aggregates]
    newest = None
    if level is not None:
        newest = newest_step(session, spec, run_id, {name: where[name] for name in spec.partition})
    levels = [] if level is None or newest is None else [x for x in LEVELS if x <= level][::-1]
    free = [name for name in spec.series if name not in where]  # pinned columns are not read back
    pieces = _pieces(first, last + 1, levels, newest)
    # Pieces are disjoint step ranges, so only an output bucket a piece edge cuts can have
    # rows from two pieces: those are merged; every other row passes through untouched.
    spans = [(a, b) if lvl is None else (a * lvl, b * lvl) for lvl, a, b in pieces]  # as steps [a, b)
    cut = {step // width for a, b in spans for step in (a, b - 1)} if len(pieces) > 1 else set()
    out: list[tuple[Any, ...]] = []
    edges: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    n = 1 + len(free)
    for piece in pieces:
        query = _piece_query(spec, run_id, where, free, chosen, width, piece)
        rows = _fetch_tuples(session, query, table=spec.rollup.name, index=_index_for(spec, piece, free))
        if not cut:
            out += rows
            continue
        for row in rows:
            if row[0] not in cut:
                out.append(row)
                continue
            key, values = row[:n], row[n:]
            seen = edges.get(key)
            edges[key] = values if seen is None else tuple(
                _merge(fn, a, b) for (*_, fn), a, b in zip(chosen, seen, values, strict=True)
            )  # fmt: skip
    return out + [key + values for key, values in edges.items()]


def _fetch_tuples(session: Session, query: Any, *, table: str = "", index: str | None = None) -> list[tuple[Any, ...]]:
    """A query's rows as the driver's plain tuples, all at once (see `driver_sql`).

    A whole-run heatmap is ~80k rows: SQLAlchemy Row objects (built and iterated
    one by one) cost ~3 us a row, plain tuples transposed with zip() in C ~0.3.
    Safe here because these queries bind and return only ints, strings and floats,
    which no SQLAlchemy type processes on the way in or out.
    """
    connection = session.connection()
    sql, params = driver_sql(connection.dialect, query, table=table, index=index)
    cursor = connection.connection.dbapi_connection.cursor()
    try:
        cursor.execute(sql, params)
        return cursor.fetchall()
    finally:
        cursor.close()


def driver_sql(dialect: Any, query: Any, *, table: str = "", index: str | None = None) -> tuple[str, Any]:
    """(SQL text, parameters) of a query for the driver; on SQLite, reading `table` through
    `index` if given (SQLAlchemy renders no table hints for SQLite, so the text gets it)."""
    compiled = query.compile(dialect=dialect)
    params: Any = compiled.construct_params()
    if compiled.positional:
        params = tuple(params[name] for name in compiled.positiontup or ())
    sql = str(compiled)
    if index and dialect.name == "sqlite":
        sql = re.sub(rf"\bFROM {table}\b", f"FROM {table} INDEXED BY {index}", sql, count=1)
    return sql, params


def _merge(fn: str, a: Any, b: Any) -> Any:
    """MIN/MAX of two partial aggregates as SQL has them: NULL only when both are NULL, and
    NaN (which PostgreSQL keeps; SQLite stores it as NULL) above every number."""
    if a is None or b is None:
        return b if a is None else a
    if a != a or b != b:  # NaN
        nan, other = (a, b) if a != a else (b, a)
        return nan if fn == "max" else other
    return min(a, b) if fn == "min" else max(a, b)


def _pieces(lo: int, hi: int, levels: list[int], newest: int | None) -> list[tuple[int | None, int, int]]:
    """Steps [lo, hi) as pieces: (level, first bucket, last bucket) of whole complete buckets
    (coarsest first), and (None, first step, end step) for the exact rows left over."""
    pieces: list[tuple[int | None, int, int]] = []
    todo = [(lo, hi, 0)]
    while todo:
        a, b, i = todo.pop()
        if a >= b:
            continue
        if i == len(levels) or newest is None:
            pieces.append((None, a, b))
            continue
        level = levels[i]
        first = -(-a // level)
        last = min(b, (newest // level) * level) // level  # complete buckets only
        if first >= last:
            todo.append((a, b, i + 1))
            continue
        pieces.append((level, first, last))
        todo += [(a, first * level, i + 1), (last * level, b, i + 1)]
    return pieces


def _piece_query(
    spec: Spec,
    run_id: str,
    where: dict[str, Any],
    free: list[str],
    aggregates: list[tuple[str, str, str]],
    width: int,
    piece: tuple[int | None, int, int],
) -> Any:
    level, first, last = piece
    if level is None:
        table, own = spec.source, 1
        position = table.c.step
        bounds = [table.c.step >= first, table.c.step < last]
        columns = [table.c[exact] for _, exact, _ in aggregates]
    else:
        table, own = spec.rollup, level
        position = table.c.bucket
        bounds = [table.c.level == level, table.c.bucket >= first, table.c.bucket < last]
        columns = [table.c[name] for name, _, _ in aggregates]
    series = [table.c[name] for name in free]
    filters = [table.c.run_id == run_id, *(table.c[name] == value for name, value in where.items()), *bounds]
    if width == own:  # one stored row per output bucket and series: nothing to group (no sort)
        query = select(position, *series, *columns).where(*filters)
    else:
        bucket = position // (width // own)  # width is a multiple of every level at or below the plan's
        values = [_FUNCTIONS[fn](column) for column, (*_, fn) in zip(columns, aggregates, strict=True)]
        query = select(bucket, *series, *values).where(*filters).group_by(bucket, *series)
    return query


def _index_for(spec: Spec, piece: tuple[int | None, int, int], free: list[str]) -> str | None:
    """The index a piece's query should read through: the series index when it reads one series' rollup rows."""
    return spec.series_index if piece[0] is not None and not free else None
