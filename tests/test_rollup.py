"""The step rollups give the exact rows' answer, on SQLite and on a real PostgreSQL.

Random runs (gaps in sampling, NaN, +-Inf and null values, batches stored out of
order, values re-sent under new seqs with smaller and larger values) are
ingested through `store.ingest_batch`; every downsampled query is then asked
with the rollup and from the exact rows only (`use_rollup=False`), over random
step windows and point budgets, and must agree.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from client_hook import wire
from layerwatch.server import store
from layerwatch.server.db import init_db, make_engine, make_session_factory
from layerwatch.server.store import rollup
from layerwatch.server.tables import LayerStatRollup

LAYERS = ("embed", "block.0", "block.1", "head")
PARAMS = ("weight", "bias")
STEPS = 700  # enough for complete buckets at levels 4, 16, 64 and 256


@pytest.fixture
def db_url(any_db_url: str) -> str:
    return any_db_url


@pytest.fixture
def session(db_url: str) -> Iterator[Session]:
    engine = make_engine(db_url)
    init_db(engine)
    with make_session_factory(engine)() as session:
        yield session
    engine.dispose()


def _value(rng: random.Random) -> float | None:
    roll = rng.random()
    if roll < 0.03:
        return math.nan
    if roll < 0.05:
        return rng.choice([math.inf, -math.inf])
    if roll < 0.08:
        return None
    return rng.uniform(-5, 5)


def _stat_rows(rng: random.Random) -> list[list[Any]]:
    keys = [(layer, param, kind) for layer in LAYERS for param in PARAMS for kind in ("weight", "grad")]
    keys += [(layer, wire.ACTIVATION_PARAM, "activation") for layer in LAYERS]
    rows = []
    for key in keys:
        cells = {name: _value(rng) for name in wire.LAYER_STAT_COLUMNS[3:]}
        cells.update(nonfinite=rng.randrange(3), numel=rng.randrange(1, 100))
        rows.append([*key, *(cells[name] for name in wire.LAYER_STAT_COLUMNS[3:])])
    return rows


def _hist_rows(rng: random.Random) -> list[list[Any]]:
    return [
        [layer, "weight", "grad", _value(rng), _value(rng), [rng.randrange(50) for _ in range(wire.HIST_BINS)]]
        for layer in LAYERS
    ]


def _random_run(rng: random.Random, run_id: str = "r") -> list[list[dict[str, Any]]]:
    """Batches of one run: steps with gaps, some batches delayed, then values re-sent under new seqs."""
    seq = iter(range(1, 1_000_000))
    frames: list[dict[str, Any]] = []
    for step in range(STEPS):
        if rng.random() < 0.15:
            continue  # a step nothing was sampled at
        values = {"loss": _value(rng)}
        if step % 7 == 0:
            values["val_loss"] = _value(rng)
        frames.append(wire.frame("scalars", run_id=run_id, seq=next(seq), step=step, values=values, time=1.0))
        frames.append(wire.frame("layer_stats", run_id=run_id, seq=next(seq), step=step, rows=_stat_rows(rng)))
        if step % 3 == 0:
            frames.append(wire.frame("histograms", run_id=run_id, seq=next(seq), step=step, rows=_hist_rows(rng)))
    spike = rng.randrange(STEPS)
    frames.append(wire.frame("scalars", run_id=run_id, seq=next(seq), step=spike, values={"loss": 1e6}, time=1.0))
    batches = []
    while frames:
        size = rng.randint(1, 40)
        batches.append(frames[:size])
        frames = frames[size:]
    # A few batches arrive late (after later steps were stored): their buckets are complete by then.
    for _ in range(5):
        i = rng.randrange(len(batches) - 1)
        batches.append(batches.pop(i))
    # Values re-sent under new seqs replace the stored ones, smaller or larger.
    resent = []
    for step in rng.sample(range(0, STEPS, 3), 12):
        resent.append(wire.frame("layer_stats", run_id=run_id, seq=next(seq), step=step, rows=_stat_rows(rng)))
        resent.append(wire.frame("histograms", run_id=run_id, seq=next(seq), step=step, rows=_hist_rows(rng)))
        resent.append(wire.frame("scalars", run_id=run_id, seq=next(seq), step=step, values={"loss": _value(rng)},
                                 time=1.0))  # fmt: skip
    batches.append(resent)
    model = {"modules": []}
    start = wire.frame("run_start", run_id=run_id, seq=0, step=0, name="n", project="p", time=1.0, model=model)
    return [[start], *batches]


def _same(a: Any) -> Any:
    """A comparable form: NaN (as PostgreSQL keeps it) equal to itself."""
    if isinstance(a, float) and math.isnan(a):
        return "nan"
    if isinstance(a, dict):
        return {k: _same(v) for k, v in a.items()}
    if isinstance(a, (list, tuple)):
        return [_same(v) for v in a]
    return a


def _windows(rng: random.Random) -> list[tuple[int | None, int | None, int]]:
    fixed = [(None, None, 2000), (None, None, 40), (None, None, 7), (None, None, 1), (0, STEPS - 1, 3)]
    randoms = []
    for _ in range(25):
        start = rng.choice([None, rng.randrange(STEPS)])
        end = rng.choice([None, rng.randrange(start or 0, STEPS + 50)])
        randoms.append((start, end, rng.choice([1, 2, 3, 5, 9, 17, 40, 100])))
    return fixed + randoms


def _ingest(session: Session, batches: list[list[dict[str, Any]]]) -> None:
    for frames in batches:
        store.ingest_batch(session, frames=frames)


@pytest.mark.parametrize("seed", [0, 1])
def test_every_downsampled_query_is_the_same_with_and_without_the_rollup(session: Session, seed: int) -> None:
    rng = random.Random(seed)
    _ingest(session, _random_run(rng))
    assert session.query(LayerStatRollup).filter_by(level=256).count() > 0  # the run is long enough to need it

    for start, end, max_points in _windows(rng):
        window = {"start": start, "end": end, "max_points": max_points}
        for key in ("loss", "val_loss"):
            fast = store.scalar_series(session, run_id="r", key=key, **window)
            exact = store.scalar_series(session, run_id="r", key=key, use_rollup=False, **window)
            assert _same(fast) == _same(exact), (key, window)
        for kind in wire.TENSOR_KINDS:
            for stat in ("min", "norm", "nonfinite", "update_ratio"):
                fast = store.heatmap(session, run_id="r", kind=kind, stat=stat, model=None, **window)
                exact = store.heatmap(session, run_id="r", kind=kind, stat=stat, model=None, use_rollup=False, **window)
                assert _same(fast) == _same(exact), (kind, stat, window)
        series = {"run_id": "r", "layer": "block.0", "param": "weight", "kind": "grad"}
        fast = store.layer_series(session, **series, **window)
        assert _same(fast) == _same(store.layer_series(session, **series, use_rollup=False, **window)), window
        fast = store.histogram_series(session, **series, **window)
        assert _same(fast) == _same(store.histogram_series(session, **series, use_rollup=False, **window)), window


def test_the_run_s_series_are_found_from_the_rollup(session: Session) -> None:
    _ingest(session, _random_run(random.Random(5)))
    exact = session.execute(text("SELECT DISTINCT layer, param, kind FROM layer_stats WHERE run_id = 'r'")).all()
    assert sorted(store.run_series(session, run_id="r", model=None)) == sorted(tuple(r) for r in exact)
    assert len(exact) == len(LAYERS) * (len(PARAMS) * 2 + 1)


def test_a_whole_run_answer_keeps_the_spike_within_the_point_budget(session: Session) -> None:
    rng = random.Random(2)
    batches = _random_run(rng)
    # A clean series beside the random one, whose +-Inf would outdo any spike.
    smooth = [
        wire.frame("scalars", run_id="r", seq=10**6 + step, step=step, values={"smooth": 1 / (1 + step)}, time=1.0)
        for step in range(STEPS)
    ]
    smooth[333]["values"]["smooth"] = 50.0
    _ingest(session, [*batches, smooth])
    steps, values = store.scalar_series(session, run_id="r", key="smooth", max_points=20)
    at = values.index(50.0)  # drawn at its bucket's last step, after the bucket's first (its low)
    assert max(values) == 50.0 and steps[at - 1] <= 333 <= steps[at]
    assert len(steps) <= 2 * 20 + 2  # a bucket's min and max; the ends may cut a bucket
    heat = store.heatmap(session, run_id="r", kind="grad", stat="norm", model=None, max_points=20)
    assert 10 <= len(heat["steps"]) <= 21  # between half and all of the budget (+1: ranges cut buckets)


def test_the_answer_is_read_from_the_rollup(session: Session) -> None:
    """With the exact rows of complete buckets gone, the rollup still answers for them."""
    rng = random.Random(3)
    _ingest(session, _random_run(rng))
    session.execute(text("DELETE FROM layer_stats WHERE run_id = 'r' AND step < 256"))
    session.commit()
    window = {"run_id": "r", "kind": "weight", "stat": "max", "model": None, "max_points": 10}
    fast = store.heatmap(session, **window)
    exact = store.heatmap(session, **window, use_rollup=False)
    assert fast["steps"][0] < 256 <= exact["steps"][0]


def test_runs_stored_before_the_rollups_get_them_filled_when_the_database_opens(db_url: str) -> None:
    engine = make_engine(db_url)
    init_db(engine)
    sessions = make_session_factory(engine)
    with sessions() as session:
        _ingest(session, _random_run(random.Random(4)))
        before = store.heatmap(session, run_id="r", kind="grad", stat="norm", model=None, max_points=30)
        for spec in rollup.SPECS:
            session.execute(text(f"DROP TABLE {spec.rollup.name}"))
        session.commit()
    init_db(engine)  # as `layerwatch serve` does at start
    with sessions() as session:
        assert session.query(LayerStatRollup).filter_by(level=64).count() > 0
        after = store.heatmap(session, run_id="r", kind="grad", stat="norm", model=None, max_points=30)
        assert _same(after) == _same(before)
        # Tables there but a run's rows not (a fill cut short before its commit): filled too.
        for spec in rollup.SPECS:
            session.execute(text(f"DELETE FROM {spec.rollup.name}"))
        session.commit()
    init_db(engine)
    with sessions() as session:
        after = store.heatmap(session, run_id="r", kind="grad", stat="norm", model=None, max_points=30)
        assert _same(after) == _same(before) and not rollup.missing(session, run_id="r")
    engine.dispose()


@pytest.mark.parametrize("wanted", [2, 3, 4, 5, 15, 16, 17, 33, 50, 64, 65, 100, 129, 1000, 4097, 70_000, 10**7])
def test_a_planned_width_is_within_2x_of_the_wanted_one_and_served_by_a_level(wanted: int) -> None:
    width, level = rollup.plan(wanted)
    assert level is not None and wanted <= width <= 2 * wanted and width % level == 0 and level in rollup.LEVELS
    assert rollup.plan(1) == (1, None)
