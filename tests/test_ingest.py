"""/ws/ingest through a real app on a SQLite file and on PostgreSQL: ack after store, idempotent replays,
bad messages closing only their own connection, tokens, and NaN as data."""

from __future__ import annotations

import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from client_hook import wire


@pytest.fixture
def db_url(any_db_url: str) -> str:
    return any_db_url  # every test here runs on SQLite and on a real PostgreSQL


def send(ws: Any, frames: list[dict[str, Any]]) -> dict[str, Any]:
    """Send one batch; return the server's answer to it (the ack or an error), reading past
    the alerts it raised, as the client does."""
    ws.send_text(json.dumps(wire.batch(frames)))
    while (answer := ws.receive_json())["kind"] == "alert":
        pass
    return answer


def expect_close(ws: Any) -> tuple[str, int]:
    """The error text the server sent and the close code that followed it."""
    answer = ws.receive_json()
    assert answer["kind"] == "error", answer
    with pytest.raises(WebSocketDisconnect) as closed:
        ws.receive_text()
    return answer["error"], closed.value.code


def all_seqs(frames: list[dict[str, Any]]) -> dict[str, list[int]]:
    seqs: dict[str, list[int]] = {}
    for f in frames:
        seqs.setdefault(f["run_id"], []).append(f["seq"])
    return seqs


def test_a_batch_is_acked_with_its_seqs_and_readable_over_rest(client: TestClient, run_frames: Any) -> None:
    frames = run_frames(steps=3)
    with client.websocket_connect("/ws/ingest") as ws:
        assert send(ws, frames) == wire.ack(all_seqs(frames))

    (run,) = client.get("/api/runs").json()
    assert (run["id"], run["status"], run["last_step"], run["every"]) == ("run-1", "finished", 2, 1)
    assert client.get("/api/runs/run-1/scalars", params={"key": "loss"}).json()["values"] == [2.0, 1.0, 2.0 / 3]
    hist = client.get("/api/runs/run-1/histograms", params={"layer": "encoder", "param": "weight", "kind": "grad"})
    assert hist.json()["counts"] == [[s] * wire.HIST_BINS for s in range(3)]
    stats = client.get("/api/runs/run-1/layer_stats", params={"layer": "act", "param": "output", "kind": "activation"})
    assert stats.json()["norm"] == [1.0, 2.0, 3.0]


def test_a_replayed_batch_is_acked_again_and_stored_once(client: TestClient, run_frames: Any) -> None:
    frames = run_frames(steps=2, end=False)
    with client.websocket_connect("/ws/ingest") as ws:
        first = send(ws, frames)
        # The client lost the ack and sends everything again, plus one new frame.
        more = [*frames, wire.frame("scalars", run_id="run-1", seq=len(frames), step=2, values={"loss": 0.5}, time=2.0)]
        second = send(ws, more)
    assert first == wire.ack(all_seqs(frames))
    assert second == wire.ack(all_seqs(more))
    loss = client.get("/api/runs/run-1/scalars", params={"key": "loss"}).json()
    assert loss == {"key": "loss", "steps": [0, 1, 2], "values": [2.0, 1.0, 0.5]}
    assert client.get("/api/runs/run-1").json()["last_loss"] == 0.5


@pytest.mark.parametrize(
    ("message", "expected", "code"),
    [
        ("{not json", "message is not valid JSON", 1008),
        (b"\x00binary", "binary messages are not accepted", 1008),
        (json.dumps({"protocol": 99, "frames": []}), "unsupported protocol version 99", 1008),
    ],
)
def test_a_bad_message_closes_only_its_connection_and_loses_nothing(
    client: TestClient, run_frames: Any, message: Any, expected: str, code: int
) -> None:
    stored = run_frames(run_id="stored-before", steps=2)
    with client.websocket_connect("/ws/ingest") as other:
        assert send(other, stored)["kind"] == "ack"
        with client.websocket_connect("/ws/ingest") as ws:
            mine = run_frames(run_id="mine", steps=1, end=False)
            assert send(ws, mine)["kind"] == "ack"
            if isinstance(message, bytes):
                ws.send_bytes(message)
            else:
                ws.send_text(message)
            text, closed_with = expect_close(ws)
        assert expected in text
        assert closed_with == code
        # The other connection goes on.
        later = [wire.frame("scalars", run_id="stored-before", seq=len(stored), step=5, values={"loss": 0.1}, time=3.0)]
        assert send(other, later) == wire.ack({"stored-before": [len(stored)]})

    runs = {run["id"]: run for run in client.get("/api/runs").json()}
    assert set(runs) == {"stored-before", "mine"}
    assert client.get("/api/runs/stored-before/scalars", params={"key": "loss"}).json()["steps"] == [0, 1, 5]
    assert client.get("/api/runs/mine/scalars", params={"key": "loss"}).json()["steps"] == [0]


@pytest.mark.parametrize(
    ("spoil", "expected"),
    [
        (lambda f: f.pop("step"), "frame 1 ('scalars'): missing field 'step'"),
        (lambda f: f.update(kind="bogus"), "frame 1 ('bogus'): field 'kind' must be one of"),
        (lambda f: f.update(values={"": 1.0}), "frame 1 ('scalars'): 'scalars' frame: field 'values' must be"),
        (lambda f: f["values"].update({"x" * 300: 1.0}), "entry 'xxxxx"),
    ],
)
def test_a_bad_frame_is_refused_by_name_and_the_rest_of_its_batch_is_stored(
    client: TestClient, run_frames: Any, spoil: Any, expected: str
) -> None:
    """Red team #17 item 3: one invalid frame (an old client's empty scalar key or 300-character name) made
    the server refuse the whole batch, and its client dropped it all. It is refused alone, by index and
    with the reason, never stored and never acked; the connection and the rest of the batch go on."""
    start = run_frames(run_id="run-1", steps=1, end=False)
    good = wire.frame("scalars", run_id="run-1", seq=len(start) + 1, step=1, values={"loss": 0.5}, time=2.0)
    bad = wire.frame("scalars", run_id="run-1", seq=len(start), step=1, values={"loss": 0.7}, time=2.0)
    spoil(bad)
    with client.websocket_connect("/ws/ingest") as ws:
        assert send(ws, start)["kind"] == "ack"
        answer = send(ws, [good, bad, good | {"seq": len(start) + 2, "step": 2, "values": {"loss": 0.25}}])
        assert answer["kind"] == "ack" and answer["seqs"] == {"run-1": [len(start) + 1, len(start) + 2]}
        (refusal,) = answer["refused"]
        assert refusal["index"] == 1 and expected in refusal["error"], refusal
        # The connection goes on: the refused seq was never taken, so a valid frame may use it.
        fixed = wire.frame("scalars", run_id="run-1", seq=len(start), step=1, values={"other": 1.0}, time=2.0)
        assert send(ws, [fixed]) == wire.ack({"run-1": [len(start)]})
    loss = client.get("/api/runs/run-1/scalars", params={"key": "loss"}).json()
    assert loss["steps"] == [0, 1, 2] and loss["values"][1:] == [0.5, 0.25]


def test_an_oversize_message_is_refused_naming_size_and_limit(make_client: Any, run_frames: Any) -> None:
    client = make_client(max_message_bytes=2000)
    text = json.dumps(wire.batch(run_frames(steps=3)))
    with client.websocket_connect("/ws/ingest") as ws:
        ws.send_text(text)
        error, code = expect_close(ws)
    assert f"message of {len(text)} bytes is over this server's limit of 2000 bytes" in error
    assert code == 1009
    assert client.get("/api/runs").json() == []


def test_an_unknown_run_is_rejected_and_nothing_of_its_batch_is_stored(client: TestClient, run_frames: Any) -> None:
    good = run_frames(run_id="good", steps=1, end=False)
    orphan = wire.frame("scalars", run_id="orphan", seq=0, step=0, values={"loss": 1.0}, time=1.0)
    with client.websocket_connect("/ws/ingest") as ws:
        ws.send_text(json.dumps(wire.batch([*good, orphan])))
        text, code = expect_close(ws)
    assert text == "unknown run 'orphan': send a 'run_start' frame first"
    assert code == 1008
    assert client.get("/api/runs").json() == []  # the good run's frames shared the batch: rolled back too
    # ... and a run_start later in the batch than the data does not count.
    with client.websocket_connect("/ws/ingest") as ws:
        ws.send_text(json.dumps(wire.batch([good[1], good[0]])))
        text, _ = expect_close(ws)
    assert "unknown run 'good'" in text


def test_a_token_is_required_when_configured(make_client: Any, run_frames: Any) -> None:
    client = make_client(token="s3cret")
    frames = run_frames(steps=1)
    with client.websocket_connect("/ws/ingest") as ws:
        text, code = expect_close(ws)
    assert "requires a token" in text and code == 1008
    with client.websocket_connect("/ws/ingest", headers={"Authorization": "Bearer wrong"}) as ws:
        assert expect_close(ws)[1] == 1008
    with client.websocket_connect("/ws/ingest", headers={"Authorization": "Bearer s3cret"}) as ws:
        assert send(ws, frames[:2])["kind"] == "ack"
    with client.websocket_connect("/ws/ingest?token=s3cret") as ws:
        assert send(ws, frames[2:])["kind"] == "ack"
    # REST wants the token too on such a server (tests/test_auth.py).
    assert client.get("/api/runs/run-1", headers={"Authorization": "Bearer s3cret"}).json()["status"] == "finished"


def test_a_model_described_by_bare_param_names_is_still_diagnosed(client: TestClient, run_frames: Any) -> None:
    """The schema lets `params` be bare names (conftest's MODEL); the rules must cope, not go quiet."""
    frames = run_frames(steps=2, end=False)  # step 0 is judged once step 1 has begun
    frames[1]["values"]["loss"] = 9.1  # far above ln 10: outputs scaled up at init
    with client.websocket_connect("/ws/ingest") as ws:
        ws.send_text(json.dumps(wire.batch(frames)))
        alert = ws.receive_json()
        assert alert["kind"] == "alert" and alert["alert"]["rule"] == "loss_at_init", alert
        assert "C = 10 classes" in alert["alert"]["message"]
        assert ws.receive_json()["kind"] == "ack"


def test_a_nan_loss_is_stored_and_served_as_null(client: TestClient, run_frames: Any) -> None:
    frames = run_frames(steps=1, end=False)
    frames.append(
        wire.frame(
            "scalars", run_id="run-1", seq=len(frames), step=1, values={"loss": math.nan, "big": math.inf}, time=2.0
        )
    )
    with client.websocket_connect("/ws/ingest") as ws:
        assert send(ws, frames)["kind"] == "ack"  # json.dumps writes NaN/Infinity tokens
    assert client.get("/api/runs/run-1/scalars", params={"key": "loss"}).json()["values"] == [2.0, None]
    assert client.get("/api/runs/run-1/scalars", params={"key": "big"}).json()["values"] == [None]
    run = client.get("/api/runs/run-1").json()
    assert run["last_loss"] is None and run["last_step"] == 1


def test_dashboards_hear_committed_batches_live(client: TestClient, run_frames: Any) -> None:
    frames = run_frames(steps=2, end=False)
    frames.append(wire.frame("scalars", run_id="run-1", seq=len(frames), step=2, values={"loss": math.nan}, time=2.0))
    with client.websocket_connect("/ws/live") as live, client.websocket_connect("/ws/ingest") as ws:
        assert send(ws, frames)["kind"] == "ack"
        events = [json.loads(live.receive_text()) for _ in range(4)]  # strict JSON: no NaN tokens
    by_type = {(e["type"], e.get("key")): e for e in events}
    assert by_type[("run", None)]["run"]["id"] == "run-1"
    assert by_type[("run", None)]["run"]["last_step"] == 2
    assert by_type[("scalars", "loss")] == {
        "type": "scalars",
        "run_id": "run-1",
        "key": "loss",
        "steps": [0, 1, 2],
        "values": [2.0, 1.0, None],
    }
    assert by_type[("scalars", "lr")]["steps"] == [0, 1]
    assert by_type[("layer_stats", None)] == {"type": "layer_stats", "run_id": "run-1", "steps": [0, 1]}


def test_concurrent_clients_all_get_stored(client: TestClient, run_frames: Any) -> None:
    def train(run_id: str) -> list[dict[str, Any]]:
        frames = run_frames(run_id=run_id, steps=8)
        answers = []
        with client.websocket_connect("/ws/ingest") as ws:
            for i in range(0, len(frames), 3):  # many small batches, interleaved with the other clients'
                answers.append(send(ws, frames[i : i + 3]))
        return answers

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(train, [f"run-{i}" for i in range(4)]))
    assert all(answer["kind"] == "ack" for answers in results for answer in answers)
    runs = client.get("/api/runs").json()
    stored = sorted((r["id"], r["status"], r["last_step"]) for r in runs)
    assert stored == [(f"run-{i}", "finished", 7) for i in range(4)]


def _ddp_frames(rank: int, steps: int, *, bad_input_at: int | None = None, nan_grads_at: int | None = None) -> list:
    """One rank's frames of a 2-rank run "ddp": run_start, per step its loss and signals; no end."""
    model = {"modules": [{"name": "", "type": "Net", "params": []}, {"name": "fc", "type": "Linear", "params": []}]}
    start = {"name": "ddp", "project": "p", "time": 1.0, "model": model, "config": {"rank": rank, "world_size": 2}}
    frames = [wire.frame("run_start", run_id="ddp", seq=0, step=0, rank=rank, **start)]
    for step in range(steps):
        values = {"loss": math.nan if step == bad_input_at else 1.0, **({"lr": 0.1} if rank == 0 else {})}
        bad = step == bad_input_at
        grads = ["fc.weight"] if nan_grads_at is not None and step >= nan_grads_at else []
        frames += [
            wire.frame("scalars", run_id="ddp", seq=0, step=step, rank=rank, values=values, time=1.0),
            wire.frame("signals", run_id="ddp", seq=0, step=step, rank=rank, training=True,
                       input_nonfinite=int(bad), output_nonfinite=bad, first_nonfinite="input" if bad else None,
                       grad_norm=math.nan if grads else 1.0, nonfinite_grads=grads),
        ]  # fmt: skip
    return frames


def _numbered(frames: list[dict[str, Any]], first: int = 0) -> list[dict[str, Any]]:
    return [{**f, "seq": first + i} for i, f in enumerate(frames)]


def test_a_nan_on_one_rank_is_judged_with_every_rank_s_data_and_names_it(client: TestClient, db_url: str) -> None:
    """Rank 0 runs ahead of rank 1 (two connections): step 3 is judged only once rank 1's step 3 is in,
    so the finding is rank 1's NaN input, not rank 0's all-reduced NaN gradients of the same step."""
    rank0 = _numbered(_ddp_frames(0, steps=6, nan_grads_at=3))
    rank1 = _numbered(_ddp_frames(1, steps=6, bad_input_at=3, nan_grads_at=3))
    with client.websocket_connect("/ws/ingest") as ws0, client.websocket_connect("/ws/ingest") as ws1:
        assert send(ws0, rank0) == wire.ack({"ddp": [f["seq"] for f in rank0]})
        assert client.get("/api/runs/ddp/alerts").json() == []  # steps 0..4 wait for rank 1
        assert send(ws1, rank1) == wire.ack({}, {"ddp": {"1": [f["seq"] for f in rank1]}})
        end = {"status": "finished", "time": 2.0}
        send(ws0, [wire.frame("run_end", run_id="ddp", seq=len(rank0), step=5, rank=0, **end)])
        send(ws1, [wire.frame("run_end", run_id="ddp", seq=len(rank1), step=5, rank=1, **end)])
    (alert,) = [a for a in client.get("/api/runs/ddp/alerts").json() if a["rule"] == "non_finite"]
    evidence = alert["evidence"]
    assert (alert["step"], alert["layer"], evidence["rank"], evidence["ranks"]) == (3, None, 1, [0, 1])
    assert "in the input batch on rank 1" in alert["message"]
    run = client.get("/api/runs/ddp").json()
    assert (run["status"], run["config"]["rank"]) == ("finished", 0)
    assert client.get("/api/runs/ddp/scalars", params={"key": "loss/rank1"}).json()["values"][3] is None

    # A replay of the stored run (`layerwatch diagnose`) reads every rank's rows back: the same finding.
    from layerwatch.server.db import make_engine, make_session_factory
    from layerwatch.server.diagnosis.engine import diagnose_stored_run

    engine = make_engine(db_url)
    with make_session_factory(engine)() as session:
        (replayed,) = [f for f, _, _ in diagnose_stored_run(session, run_id="ddp") if f.rule == "non_finite"]
    engine.dispose()
    assert (replayed.step, replayed.message) == (3, alert["message"])


DEEP = object()  # stands for a config nested 1,000 deep, spliced into the message's text
DEEP_TEXT = '{"a": ' * 1000 + "1" + "}" * 1000  # json.dumps itself cannot write it (RecursionError)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("config", DEEP, "at most 64 levels of objects and lists deep"),
        ("config", {"lr": "\ud800"}, "valid Unicode text (a string holds a lone surrogate"),
        ("model", {"modules": [{"name": "fc", "type": "Linear", "params": [[1]]}]}, "params are names or objects"),
        ("name", "bad\udfff", "valid Unicode text"),
    ],
    ids=["deep-config", "surrogate-config", "params-not-names", "surrogate-name"],
)
def test_malformed_descriptions_are_refused_alone_and_the_server_answers_on(
    client: TestClient, run_frames: Any, caplog: pytest.LogCaptureFixture, field: str, value: Any, expected: str
) -> None:
    """Red team #17 item 7: a config nested 1,000 deep made the error text itself fail (12k log lines per
    message), a lone surrogate stored in a config turned GET /api/runs/{id} into a 500, `params: [[1]]` the
    heatmap. Each is refused by name, with one log line; the good run beside it is stored and readable."""
    bad = wire.frame("run_start", run_id="bad", seq=0, step=0, name="b", project="p", time=1.0, model={"modules": []})
    bad[field] = value
    good = run_frames(run_id="good", steps=2)
    text = json.dumps(wire.batch([{**bad, field: "DEEP"} if value is DEEP else bad, *good]))
    text = text.replace('"DEEP"', DEEP_TEXT, 1)
    with caplog.at_level(logging.WARNING), client.websocket_connect("/ws/ingest") as ws:
        ws.send_text(text)
        answer = ws.receive_json()
    assert answer["kind"] == "ack" and answer["seqs"] == {"good": [f["seq"] for f in good]}, answer
    (refusal,) = answer["refused"]
    assert refusal["index"] == 0 and expected in refusal["error"], refusal
    assert len(caplog.records) < 5, [r.getMessage()[:100] for r in caplog.records]
    assert {run["id"] for run in client.get("/api/runs").json()} == {"good"}
    assert client.get("/api/runs/good").status_code == 200


def test_a_step_past_what_the_dashboard_can_draw_is_refused(client: TestClient, run_frames: Any) -> None:
    start = run_frames(run_id="run-1", steps=1, end=False)
    huge = wire.frame("scalars", run_id="run-1", seq=len(start), step=2**63 - 1, values={"loss": 1.0}, time=1.0)
    with client.websocket_connect("/ws/ingest") as ws:
        answer = send(ws, [*start, huge])
    assert [r["index"] for r in answer["refused"]] == [len(start)]
    assert "up to 2**53 - 1" in answer["refused"][0]["error"]
    assert client.get("/api/runs/run-1").json()["last_step"] == 0
