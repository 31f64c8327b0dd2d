"""The fast paths give the slow paths' answers.

- The wire's whole-column row checks (`wire._plain_stat_rows`, `_plain_histogram_rows`)
  accept only rows the cell-by-cell checks accept, and rows get the same verdict
  and message either way (valid rows mutated at random, 3000 lists of each kind).
- A real `layerwatch serve` fed over the websocket answers the dashboard's series
  requests from its rollups exactly as the exact rows do (read straight from its
  SQLite file with `use_rollup=False`).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from client_hook import wire
from layerwatch.server import store
from layerwatch.server.db import init_db, make_engine, make_session_factory
from layerwatch.server.store import rollup
from tests.conftest import stat_row
from tests.serving import serve

# ---------------------------------------------------------------- wire

ODD_CELLS = [None, True, False, -1, 0, 7, 2**63, 1.5, -0.0, math.nan, math.inf, "", "x" * 300, "weight", "grad",
             "activation", [], {}, [1] * wire.HIST_BINS, (1,) * wire.HIST_BINS]  # fmt: skip


def _mutated(valid: list[Any], rng: random.Random) -> Any:
    """A copy of a valid row with a cell replaced, a count inside a list replaced, cut, lengthened, or not a row."""
    row = [list(cell) if isinstance(cell, list) else cell for cell in valid]
    for _ in range(rng.choice([0, 1, 1, 2])):
        if not row:
            break
        what = rng.random()
        if what < 0.6:
            row[rng.randrange(len(row))] = rng.choice(ODD_CELLS)
        elif what < 0.8 and isinstance(row[-1], list) and row[-1]:
            row[-1][rng.randrange(len(row[-1]))] = rng.choice(ODD_CELLS)  # inside the histogram counts
        elif what < 0.9:
            row = row[: rng.randrange(len(row))] if rng.random() < 0.5 else [*row, 1]
        else:
            return rng.choice([None, "row", tuple(row)])
    return row


def _slow(columns: tuple[str, ...], cells: dict[str, Any]) -> Any:
    return wire._rows(columns, cells, lambda rows: False)  # the cell-by-cell checks alone


@pytest.mark.parametrize(
    ("kind", "valid", "columns", "cells", "plain"),
    [
        ("layer_stats", stat_row("encoder", "weight", "grad"), wire.LAYER_STAT_COLUMNS, wire._STAT_CELLS,
         wire._plain_stat_rows),
        ("histograms", ["encoder", "weight", "grad", -1.0, 1.0, list(range(wire.HIST_BINS))], wire.HISTOGRAM_COLUMNS,
         wire._HIST_CELLS, wire._plain_histogram_rows),
    ],
)  # fmt: skip
def test_rows_get_the_same_verdict_and_message_from_the_column_checks(
    kind: str, valid: list[Any], columns: tuple[str, ...], cells: dict[str, Any], plain: Any
) -> None:
    rng = random.Random(kind)
    fast, slow = wire._REQUIRED[kind]["rows"], _slow(columns, cells)
    verdicts = set()
    for _ in range(3000):
        rows = [_mutated(valid, rng) for _ in range(rng.randrange(5))]
        expected = slow(rows)
        assert fast(rows) == expected, rows
        assert not plain(rows) or expected is None, rows  # the fast path never passes a bad row
        verdicts.add(expected is None)
    assert verdicts == {True, False}


def test_a_bad_count_deep_in_a_histogram_is_named_as_before() -> None:
    counts = [1] * wire.HIST_BINS
    counts[20] = -3
    frame = wire.frame("histograms", run_id="r", seq=1, step=0, rows=[["a", "weight", "grad", 0.0, 1.0, counts]])
    try:
        wire.validate_batch(wire.batch([frame]))
    except wire.SchemaError as exc:
        assert "row 0: 'counts' must be a list of 32 non-negative integers" in str(exc)
    else:
        raise AssertionError("a negative count was accepted")


# ---------------------------------------------------------------- a real server


# Forward order unlike the names' order, so rows are sorted the model's way on both paths.
MODEL = {"modules": [{"name": f"l{i}", "type": "Linear", "params": ["weight"]} for i in (2, 0, 1)]}


def _frames(run_id: str, steps: int) -> list[dict[str, Any]]:
    rng = random.Random(7)
    model = MODEL
    frames = [wire.frame("run_start", run_id=run_id, seq=0, step=0, name="n", project="p", time=1.0, model=model)]
    for step in range(steps):
        loss = math.nan if step == 77 else 1 / (1 + step) + rng.random() * 0.01
        rows = [stat_row(f"l{i}", "weight", "grad", scale=rng.uniform(0.5, 2)) for i in range(3)]
        hist = [[f"l{i}", "weight", "grad", -1.0, 1.0, [rng.randrange(9) for _ in range(wire.HIST_BINS)]]
                for i in range(3)]  # fmt: skip
        seq = len(frames)
        frames += [
            wire.frame("scalars", run_id=run_id, seq=seq, step=step, values={"loss": loss}, time=1.0),
            wire.frame("layer_stats", run_id=run_id, seq=seq + 1, step=step, rows=rows),
            wire.frame("histograms", run_id=run_id, seq=seq + 2, step=step, rows=hist),
        ]
    return frames


def _send(url: str, frames: list[dict[str, Any]], per_batch: int) -> None:
    with connect(url.replace("http", "ws") + "/ws/ingest", compression=None) as ws:
        for i in range(0, len(frames), per_batch):
            ws.send(json.dumps(wire.batch(frames[i : i + per_batch])))
            while (reply := json.loads(ws.recv()))["kind"] == "alert":
                pass
            assert reply["kind"] == "ack", reply


def _json(value: Any) -> Any:
    """What the REST layer makes of a stored value: NaN and +-Inf become null."""
    return json.loads(json.dumps(value).replace("NaN", "null").replace("-Infinity", "null").replace("Infinity", "null"))


def test_a_real_server_answers_from_its_rollups_as_the_exact_rows_do(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    with serve(db) as url:
        _send(url, _frames("run", steps=600), per_batch=25)
        with httpx.Client(base_url=url) as client:
            answers = {
                (path, tuple(params.items())): client.get(f"/api/runs/run/{path}", params=params).json()
                for path, params in [
                    ("scalars", {"key": "loss", "max_points": 50}),
                    ("scalars", {"key": "loss", "max_points": 13, "start": 40, "end": 555}),
                    ("heatmap", {"kind": "grad", "stat": "norm", "max_points": 30}),
                    ("heatmap", {"kind": "grad", "stat": "min", "max_points": 7, "start": 3}),
                    ("layer_stats", {"layer": "l1", "param": "weight", "kind": "grad", "max_points": 40}),
                    ("histograms", {"layer": "l2", "param": "weight", "kind": "grad", "max_points": 9}),
                ]
            }
    engine = make_engine(f"sqlite:///{db}")
    with make_session_factory(engine)() as session:
        for (path, params), served in answers.items():
            p = dict(params)
            window = {"start": p.pop("start", None), "end": p.pop("end", None), "max_points": p.pop("max_points")}
            if path == "scalars":
                steps, values = store.scalar_series(session, run_id="run", **p, **window, use_rollup=False)
                exact: dict[str, Any] = {"key": p["key"], "steps": steps, "values": values}
            elif path == "heatmap":
                exact = store.heatmap(session, run_id="run", model=MODEL, **p, **window, use_rollup=False)
                assert exact["layers"] == ["l2", "l0", "l1"]
            elif path == "layer_stats":
                exact = store.layer_series(session, run_id="run", **p, **window, use_rollup=False)
            else:
                exact = store.histogram_series(session, run_id="run", **p, **window, use_rollup=False)
            assert len(served["steps"]) > 1
            assert served == _json(exact), (path, params)
    engine.dispose()


def test_one_series_is_read_through_the_rollup_s_series_index(tmp_path: Path) -> None:
    """SQLite's planner, left alone, scans every series' rollup rows in the bucket range."""
    engine = make_engine(f"sqlite:///{tmp_path}/p.db")
    init_db(engine)
    with make_session_factory(engine)() as session:
        for spec in (rollup.LAYER_STATS, rollup.HISTOGRAMS):
            series = {"layer": "l1", "param": "weight", "kind": "grad"}
            piece = (64, 0, 100)
            query = rollup._piece_query(spec, "run", series, [], list(spec.aggregates[:1]), 64, piece)
            index = rollup._index_for(spec, piece, [])
            sql, params = rollup.driver_sql(engine.dialect, query, table=spec.rollup.name, index=index)
            plan = session.connection().exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params).all()
            assert spec.series_index and spec.series_index in str(plan), plan
    engine.dispose()
