"""Series reads, downsampled when the range is longer than `max_points`.

The bucket width is rounded to one the rollups serve (`rollup.plan`: between half and all of
`max_points` buckets), each bucket keeps its extremes (a spike survives), and a window short
enough comes back at full resolution."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from client_hook import wire
from layerwatch.server.store import rollup
from layerwatch.server.store.codec import unpack_counts
from layerwatch.server.store.runs import forward_order
from layerwatch.server.tables import Histogram

HEATMAP_STATS: tuple[str, ...] = rollup.STATS
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
