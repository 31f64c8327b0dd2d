"""server.store directly, on a SQLite file and on a real PostgreSQL: idempotent batches, binary
histograms, run lookups, NaN where it is data; WAL mode on SQLite."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from client_hook import wire
from layerwatch.server import store
from layerwatch.server.db import init_db, make_engine, make_session_factory
from layerwatch.server.tables import Alert, LayerStat, ReceivedFrame, Run, Scalar
from tests.conftest import stat_row


@pytest.fixture
def db_url(any_db_url: str) -> str:
    return any_db_url  # every test here runs on SQLite and on PostgreSQL


def _session(db_url: str) -> Iterator[Session]:
    engine = make_engine(db_url)
    init_db(engine)
    with make_session_factory(engine)() as session:
        yield session
    engine.dispose()


@pytest.fixture
def session(db_url: str) -> Iterator[Session]:
    yield from _session(db_url)


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path: Any) -> None:
    for session in _session(f"sqlite:///{tmp_path}/wal.db"):
        assert session.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert session.execute(text("PRAGMA foreign_keys")).scalar() == 1
    assert session.execute(text("PRAGMA busy_timeout")).scalar() == 10000


def test_layer_stat_columns_are_the_wire_names() -> None:
    assert tuple(LayerStat.__table__.columns.keys())[2:] == wire.LAYER_STAT_COLUMNS


def test_histogram_counts_round_trip_through_the_binary_column(session: Session, run_frames: Any) -> None:
    frames = run_frames(steps=1, end=False)
    counts = [0, 1, 2**31, 2**32 - 1] + list(range(wire.HIST_BINS - 4))
    frames.append(
        wire.frame(
            "histograms",
            run_id="run-1",
            seq=len(frames),
            step=7,
            rows=[["encoder", "bias", "weight", -0.5, math.inf, counts]],
        )
    )
    store.ingest_batch(session, frames=frames)
    blob = session.execute(text("SELECT counts FROM histograms WHERE param = 'bias'")).scalar()
    assert isinstance(blob, bytes) and len(blob) == 4 * wire.HIST_BINS
    series = store.histogram_series(session, run_id="run-1", layer="encoder", param="bias", kind="weight")
    assert series["steps"] == [7] and series["counts"] == [counts]
    assert series["lo"] == [-0.5] and series["hi"] == [math.inf]  # infinity is stored as is


def test_a_batch_reports_what_changed_and_replays_store_nothing_twice(session: Session, run_frames: Any) -> None:
    frames = run_frames(steps=2, end=False)
    result = store.ingest_batch(session, frames=frames)
    assert result.acked == {"run-1": list(range(len(frames)))}
    assert result.changed_runs == ["run-1"]
    assert result.scalar_points[("run-1", "loss")] == ([0, 1], [2.0, 1.0])
    assert result.stat_steps == {"run-1": [0, 1]}
    assert result.stored_frames == len(frames)

    again = store.ingest_batch(session, frames=frames)
    assert again.acked == result.acked
    assert (again.stored_frames, again.replayed_frames, again.changed_runs) == (0, len(frames), [])
    assert session.query(ReceivedFrame).count() == len(frames)
    assert session.query(Scalar).count() == 4


def test_a_value_sent_again_under_a_new_seq_replaces_the_old_one(session: Session, run_frames: Any) -> None:
    frames = run_frames(steps=1, end=False)
    store.ingest_batch(session, frames=frames)
    n = len(frames)
    store.ingest_batch(
        session,
        frames=[
            wire.frame("scalars", run_id="run-1", seq=n, step=0, values={"loss": 9.0}, time=1.0),
            wire.frame("scalars", run_id="run-1", seq=n + 1, step=0, values={"loss": 8.0}, time=1.0),
        ],
    )
    assert store.scalar_series(session, run_id="run-1", key="loss") == ([0], [8.0])


def test_a_steps_signals_sent_in_two_batches_keep_both(session: Session, run_frames: Any) -> None:
    """The step's own signals, then log(targets=...)'s counts in a later batch: the second must not erase the
    first (they used to be upserted as whole rows, NULLs included)."""
    frames = run_frames(steps=1, end=False)
    store.ingest_batch(session, frames=frames)
    n = len(frames)
    own = {"grad_norm": 1.5, "grad_norms": [1.0, None, float("nan")], "training": True}
    store.ingest_batch(session, frames=[wire.frame("signals", run_id="run-1", seq=n, step=0, **own)])
    counts = {"target_counts": {"0": 3, "1": 5}}
    store.ingest_batch(session, frames=[wire.frame("signals", run_id="run-1", seq=n + 1, step=0, **counts)])
    _, signals, _, _ = store.read_steps(session, run_id="run-1", start=0, stop=1)[0]
    assert signals["grad_norm"] == 1.5 and signals["training"] is True, signals
    assert signals["grad_norms"][:2] == [1.0, None] and signals["grad_norms"][2] == "NaN"
    assert signals["target_counts"] == {"0": 3, "1": 5}


def test_a_layer_row_sent_twice_in_one_batch_keeps_the_later_values(session: Session, run_frames: Any) -> None:
    frames = run_frames(steps=1, end=False)
    n = len(frames)

    def stats(seq: int, norm: float) -> dict[str, Any]:
        row = [*stat_row("encoder", "weight", "grad")[:6], norm, *stat_row("encoder", "weight", "grad")[7:]]
        return wire.frame("layer_stats", run_id="run-1", seq=seq, step=5, rows=[row, row])

    def hist(seq: int, count: int) -> dict[str, Any]:
        row = ["encoder", "weight", "grad", -1.0, 1.0, [count] * wire.HIST_BINS]
        return wire.frame("histograms", run_id="run-1", seq=seq, step=5, rows=[row])

    store.ingest_batch(session, frames=[*frames, stats(n, 7.0), hist(n + 1, 3), stats(n + 2, 2.0), hist(n + 3, 1)])
    series = store.layer_series(session, run_id="run-1", layer="encoder", param="weight", kind="grad")
    assert series["norm"][series["steps"].index(5)] == 2.0
    hists = store.histogram_series(session, run_id="run-1", layer="encoder", param="weight", kind="grad")
    assert hists["counts"][hists["steps"].index(5)] == [1] * wire.HIST_BINS


def test_an_unknown_run_rolls_the_whole_batch_back(session: Session, run_frames: Any) -> None:
    frames = [*run_frames(steps=1), wire.frame("run_end", run_id="ghost", seq=0, step=0, status="crashed", time=1.0)]
    with pytest.raises(store.UnknownRunError, match="unknown run 'ghost': send a 'run_start' frame first"):
        store.ingest_batch(session, frames=frames)
    assert store.list_runs(session) == []
    assert session.query(ReceivedFrame).count() == 0


def test_run_lifecycle_lookups_and_filters(session: Session, run_frames: Any) -> None:
    store.ingest_batch(session, frames=run_frames(run_id="a", name="same", steps=2, end=False), now=10.0)
    later = run_frames(run_id="b", name="same", steps=1)
    later[0]["time"] = 2000.0
    store.ingest_batch(session, frames=later, now=20.0)
    store.ingest_batch(session, frames=[{**run_frames(run_id="c", name="other")[0], "project": "elsewhere"}])

    a = store.get_run(session, run_id="a")
    assert a is not None
    assert (a.status, a.last_step, a.last_loss, a.every, a.updated_at, a.project) == (
        "running",
        1,
        1.0,
        1,
        10.0,
        "proj",
    )
    assert a.alert_counts == {"info": 0, "warning": 0, "critical": 0}
    b = store.get_run(session, run_id="b")
    assert b is not None and (b.status, b.finished_at) == ("finished", 2000.0)

    assert [r.id for r in store.list_runs(session, project="proj")] == ["b", "a"]  # newest first
    assert [r.id for r in store.list_runs(session, name="other")] == ["c"]
    found = store.find_run(session, id_or_name="same")
    assert found is not None and found.id == "b"
    found = store.find_run(session, id_or_name="a")
    assert found is not None and found.id == "a"
    assert store.find_run(session, id_or_name="nope") is None
    assert store.get_run(session, run_id="nope") is None


def test_heartbeats_keep_a_run_alive_and_carry_its_drop_counts(session: Session, run_frames: Any) -> None:
    store.ingest_batch(session, frames=run_frames(run_id="a", steps=2, end=False), now=10.0)
    session.get(Run, "a").status = "crashed"  # as the liveness sweep leaves a silent run
    session.commit()

    beat = wire.frame("heartbeat", run_id="a", seq=100, step=1, time=50.0, dropped={"histograms": 7})
    store.ingest_batch(session, frames=[beat], now=60.0)
    a = store.get_run(session, run_id="a")
    assert a is not None
    # Alive again, seen at 60, the gap recorded; a heartbeat is not a step.
    assert (a.status, a.updated_at, a.dropped, a.last_step) == ("running", 60.0, {"histograms": 7}, 1)

    end = wire.frame("run_end", run_id="a", seq=101, step=1, status="finished", time=70.0, dropped={"histograms": 9})
    store.ingest_batch(session, frames=[end], now=70.0)
    a = store.get_run(session, run_id="a")
    assert a is not None and (a.status, a.dropped) == ("finished", {"histograms": 9})


def test_alerts_are_listed_and_counted(session: Session, run_frames: Any) -> None:
    store.ingest_batch(session, frames=run_frames(steps=1))
    for i, (rule, severity) in enumerate([("dead_relu", "warning"), ("nan_loss", "critical"), ("lr_high", "warning")]):
        session.add(
            Alert(
                run_id="run-1",
                rule=rule,
                severity=severity,
                layer="act" if i == 0 else None,
                first_step=5 - i,
                last_step=9,
                count=2,
                message=f"{rule} message",
                remedy="do this",
                evidence={"ratio": 0.5},
                created_at=1.0,
                updated_at=2.0,
            )
        )
    session.commit()
    run = store.get_run(session, run_id="run-1")
    assert run is not None and run.alert_counts == {"info": 0, "warning": 2, "critical": 1}
    alerts = store.list_alerts(session, run_id="run-1")
    assert [a.rule for a in alerts] == ["lr_high", "nan_loss", "dead_relu"]  # by first step
    assert alerts[2].layer == "act" and alerts[2].evidence == {"ratio": 0.5}


def test_nan_and_infinity_are_stored_where_they_are_data(session: Session, run_frames: Any) -> None:
    """A NaN loss, a NaN in the run's config and an Inf in a finding's evidence are data: the
    batch is stored on both backends (PostgreSQL's JSON type rejects a bare NaN token)."""
    frames = run_frames(run_id="n", steps=2, findings=True)
    frames[0]["config"] = {"lr": math.nan, "clip": math.inf, "name": "x"}
    frames[1]["values"]["loss"] = math.nan
    frames[-3]["findings"][0]["evidence"] = {"loss": math.inf}
    store.ingest_batch(session, frames=frames)

    run = store.get_run(session, run_id="n")
    assert run is not None and run.config == {"lr": "NaN", "clip": "Infinity", "name": "x"}
    steps, values = store.scalar_series(session, run_id="n", key="loss")
    assert steps == [0, 1]
    assert values[0] is None or math.isnan(values[0])  # not a number, whatever the backend
    assert values[1] == 1.0
    [alert] = store.list_alerts(session, run_id="n")
    assert (alert.rule, alert.evidence) == ("loss_at_init", {"loss": "Infinity"})


def test_a_database_from_an_older_version_gains_the_new_columns_and_keeps_its_rows(
    db_url: str, run_frames: Any
) -> None:
    engine = make_engine(db_url)
    init_db(engine)
    with make_session_factory(engine)() as session:
        store.ingest_batch(session, frames=run_frames(run_id="old", steps=2))
    with engine.begin() as connection:  # as a database written before runs.dropped existed
        connection.execute(text("ALTER TABLE runs DROP COLUMN dropped"))
    engine.dispose()

    engine = make_engine(db_url)
    init_db(engine)
    with make_session_factory(engine)() as session:
        run = store.get_run(session, run_id="old")
        assert run is not None and (run.last_step, run.status, run.dropped) == (1, "finished", None)
        beat = wire.frame("heartbeat", run_id="old", seq=99, step=1, time=5.0, dropped={"histograms": 1})
        store.ingest_batch(session, frames=[beat])
        run = store.get_run(session, run_id="old")
        assert run is not None and run.dropped == {"histograms": 1}
    engine.dispose()


def _rank_frames(run_id: str, rank: int, steps: int, *, name: str = "ddp", loss: float = 1.0) -> list[dict[str, Any]]:
    """What a rank r > 0 of a DDP run sends: its run_start (joining), loss and signals per step, its end."""
    model = {"modules": [{"name": "fc", "type": "Linear", "params": []}]}
    seq = iter(range(1000))
    frames = [
        wire.frame("run_start", run_id=run_id, seq=next(seq), step=0, rank=rank, name=name, project="proj",
                   time=1.0, model=model, config={"rank": rank, "world_size": 2}),
    ]  # fmt: skip
    for step in range(steps):
        frames.append(
            wire.frame("scalars", run_id=run_id, seq=next(seq), step=step, rank=rank, values={"loss": loss}, time=2.0)
        )
        frames.append(wire.frame("signals", run_id=run_id, seq=next(seq), step=step, rank=rank, input_nonfinite=step))
    frames.append(wire.frame("run_end", run_id=run_id, seq=next(seq), step=steps - 1, rank=rank, status="crashed",
                             time=3.0, dropped={"histograms": 4}))  # fmt: skip
    return frames


def test_the_ranks_of_a_ddp_run_share_it_each_in_its_own_seq_space(session: Session, run_frames: Any) -> None:
    # Rank 1 first: its run_start makes the run (nothing is refused or lost), rank 0's then describes it.
    ranked = _rank_frames("d", 1, steps=2, loss=7.0)
    result = store.ingest_batch(session, frames=ranked)
    assert result.acked == {} and result.acked_ranks == {"d": {"1": [f["seq"] for f in ranked]}}
    assert store.get_run(session, run_id="d").config == {"rank": 1, "world_size": 2}
    rank0 = run_frames(run_id="d", steps=2)  # its seqs 0.. are rank 1's too: another sender
    result = store.ingest_batch(session, frames=rank0)
    assert result.stored_frames == len(rank0) and result.acked == {"d": [f["seq"] for f in rank0]}
    # Replays of either rank store nothing twice; rank 1's run_start again changes nothing.
    again = store.ingest_batch(session, frames=ranked[:3] + rank0[:2])
    assert (again.stored_frames, again.replayed_frames) == (0, 5)
    run = store.get_run(session, run_id="d")
    assert run is not None and (run.name, run.model["modules"][0]["name"], run.config) == ("demo", "encoder", None)
    # Rank 0 ends the run (rank 1's "crashed" is its own); each rank's drops are kept apart.
    assert (run.status, run.last_loss, run.dropped) == ("finished", 2.0 / 2, {"histograms/rank1": 4})
    assert store.scalar_series(session, run_id="d", key="loss/rank1") == ([0, 1], [7.0, 7.0])
    assert store.scalar_series(session, run_id="d", key="loss") == ([0, 1], [2.0, 1.0])
    steps = store.read_steps(session, run_id="d", start=0, stop=2)
    assert [steps[s][3] for s in (0, 1)] == [{1: {"input_nonfinite": 0}}, {1: {"input_nonfinite": 1}}]
    assert steps[1][1]["grad_norm"] == 0.5  # rank 0's signals where they always were
    beat = wire.frame("heartbeat", run_id="d", seq=500, step=1, time=9.0, dropped={"scalars": 1})
    store.ingest_batch(session, frames=[beat])
    assert store.get_run(session, run_id="d").dropped == {"histograms/rank1": 4, "scalars": 1}


def test_a_database_from_before_ranks_gains_their_tables_and_keeps_its_runs(db_url: str, run_frames: Any) -> None:
    engine = make_engine(db_url)
    init_db(engine)
    with make_session_factory(engine)() as session:
        store.ingest_batch(session, frames=run_frames(run_id="old", steps=2))
    with engine.begin() as connection:  # as a database written before distributed runs
        connection.execute(text("DROP TABLE received_rank_frames"))
        connection.execute(text("DROP TABLE rank_step_signals"))
    engine.dispose()

    engine = make_engine(db_url)
    init_db(engine)
    with make_session_factory(engine)() as session:
        assert store.get_run(session, run_id="old").status == "finished"
        result = store.ingest_batch(session, frames=_rank_frames("old", 1, steps=1))
        assert result.stored_frames == 4
        assert store.read_steps(session, run_id="old", start=0, stop=1)[0][3] == {1: {"input_nonfinite": 0}}
    engine.dispose()
