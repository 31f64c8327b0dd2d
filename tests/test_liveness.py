"""Crashed-run detection (server/liveness.py) against a real server process and real clients.

A client process that heartbeats and is then SIGKILLed must end up `crashed`
(over REST and as a live event); one that keeps heartbeating stays `running`;
one that ended stays `finished`; a crashed run that sends again is `running`.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.orm import Session

from client_hook import wire
from layerwatch.server import liveness, store
from layerwatch.server.db import init_db, make_engine, make_session_factory
from layerwatch.server.settings import Settings
from tests.serving import serve

TIMEOUT_S = 2.0  # the server's --heartbeat-timeout here
HEARTBEAT_EVERY_S = 0.2  # ten heartbeats per timeout: a loaded machine still gets one through
WAIT_S = 30.0  # how long a test waits for something that must happen (never how soon it must)

MODEL = {"modules": [{"name": "fc", "type": "Linear", "params": []}]}

# A training process stand-in: says run_start, then heartbeats (acked each time) until killed.
HEARTBEATING_CLIENT = """
import json, sys, time
from websockets.sync.client import connect
from client_hook import wire

url, run_id, every = sys.argv[1], sys.argv[2], float(sys.argv[3])
model = {"modules": [{"name": "fc", "type": "Linear", "params": []}]}
with connect(url) as ws:
    for seq in range(10**9):
        fields = dict(name=run_id, project="liveness", model=model) if seq == 0 else {}
        kind = "run_start" if seq == 0 else "heartbeat"
        ws.send(json.dumps(wire.batch([wire.frame(kind, run_id=run_id, seq=seq, step=0, time=time.time(), **fields)])))
        while json.loads(ws.recv(timeout=30))["kind"] != "ack":
            pass
        if seq == 0:
            print("started", flush=True)
        time.sleep(every)
"""


def send(base: str, frames: list[dict[str, Any]]) -> None:
    from websockets.sync.client import connect

    with connect(base.replace("http://", "ws://") + "/ws/ingest") as ws:
        ws.send(json.dumps(wire.batch(frames)))
        while json.loads(ws.recv(timeout=30))["kind"] != "ack":
            pass


def statuses(base: str) -> dict[str, str]:
    return {run["id"]: run["status"] for run in httpx.get(f"{base}/api/runs", timeout=10).json()}


def wait_for(check: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, f"waited {WAIT_S} s for {what}"
        time.sleep(0.1)


def start_client(base: str, run_id: str) -> subprocess.Popen[str]:
    url = base.replace("http://", "ws://") + "/ws/ingest"
    process = subprocess.Popen(
        [sys.executable, "-c", HEARTBEATING_CLIENT, url, run_id, str(HEARTBEAT_EVERY_S)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "started"
    return process


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    with serve(tmp_path / "lw.db", args=["--heartbeat-timeout", str(TIMEOUT_S)]) as base:
        yield base


def test_a_killed_client_crashes_its_run_and_a_beating_one_stays_running(server: str) -> None:
    from websockets.sync.client import connect

    send(
        server,
        [
            wire.frame("run_start", run_id="ended", seq=0, step=0, name="ended", project="p", time=1.0, model=MODEL),
            wire.frame("run_end", run_id="ended", seq=1, step=0, status="finished", time=2.0),
        ],
    )
    beating = start_client(server, "beating")
    doomed = start_client(server, "doomed")
    try:
        with connect(server.replace("http://", "ws://") + "/ws/live") as live:
            doomed.kill()  # SIGKILL: no run_end, no goodbye, the socket just dies
            doomed.wait()
            # Dashboards hear it: a run event with the new status.
            deadline = time.monotonic() + WAIT_S
            while True:
                event = json.loads(live.recv(timeout=max(0.0, deadline - time.monotonic())))
                if event["type"] == "run" and event["run"]["id"] == "doomed":
                    assert event["run"]["status"] in ("running", "crashed")  # its last heartbeats came first
                    if event["run"]["status"] == "crashed":
                        break
        seen = statuses(server)
        assert seen == {"ended": "finished", "beating": "running", "doomed": "crashed"}
        # Two more whole timeouts: the heartbeating run is never marked, the others stay as they are.
        until = time.monotonic() + 2 * TIMEOUT_S
        while time.monotonic() < until:
            assert statuses(server) == seen
            time.sleep(0.2)
        assert beating.poll() is None, "the heartbeating client died"
    finally:
        beating.kill()
        doomed.kill()
        beating.wait()
        doomed.wait()

    # Whatever comes later from a crashed run revives it (it was only silent).
    send(server, [wire.frame("heartbeat", run_id="doomed", seq=10**6, step=0, time=time.time())])
    assert statuses(server)["doomed"] == "running"
    wait_for(lambda: statuses(server)["doomed"] == "crashed", "the revived run to be marked crashed again")


def test_marking_touches_only_silent_running_runs(tmp_path: Path, run_frames: Any) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/t.db")
    init_db(engine)
    sessions = make_session_factory(engine)
    with sessions() as session:
        store.ingest_batch(session, frames=run_frames(run_id="old", end=False), now=100.0)
        store.ingest_batch(session, frames=run_frames(run_id="old-but-ended"), now=100.0)
        store.ingest_batch(session, frames=run_frames(run_id="recent", end=False), now=200.0)
    with sessions() as session:
        assert store.mark_crashed(session, before=150.0) == ["old"]
        assert store.mark_crashed(session, before=150.0) == []  # once is enough
    with sessions() as session:
        status: dict[str, str] = {run.id: run.status for run in store.list_runs(session)}
        assert status == {"old": "crashed", "old-but-ended": "finished", "recent": "running"}
        assert store.get_run(session, run_id="old").updated_at == 100.0  # still when it was last heard from
    engine.dispose()


def test_a_fresh_server_judges_no_one_before_it_listened_a_whole_timeout() -> None:
    # Restarted at t=1000 after a long outage: a run last heard of at t=0 gets until t=1060 to reconnect.
    assert liveness.stale_before(now=1030.0, timeout_s=60.0, listening_since=1000.0) is None
    assert liveness.stale_before(now=1060.0, timeout_s=60.0, listening_since=1000.0) == 1000.0
    assert liveness.sweep_interval(60.0) == liveness.MAX_SWEEP_INTERVAL_S
    assert liveness.sweep_interval(1.0) == 0.25


def test_the_sweeper_reports_what_it_marked(tmp_path: Path, run_frames: Any) -> None:
    import threading

    from layerwatch.server.live import LiveHub

    engine = make_engine(f"sqlite:///{tmp_path}/t.db")
    init_db(engine)
    sessions = make_session_factory(engine)
    with sessions() as session:
        store.ingest_batch(session, frames=run_frames(run_id="quiet", end=False), now=100.0)
    sweeper = liveness.Sweeper(sessions=sessions, hub=LiveHub(), write_lock=threading.Lock(), timeout_s=60.0)
    sweeper.listening_since = 0.0
    assert sweeper.sweep(now=150.0) == []  # 50 s of silence: not yet
    crashed = sweeper.sweep(now=161.0)
    assert [(run.id, run.status) for run in crashed] == [("quiet", "crashed")]
    with Session(engine) as session:
        assert store.get_run(session, run_id="quiet").status == "crashed"
    engine.dispose()


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, "60", True])
def test_a_bad_heartbeat_timeout_is_named(bad: object) -> None:
    with pytest.raises(ValueError, match="heartbeat_timeout_s must be a positive, finite number") as error:
        Settings(heartbeat_timeout_s=bad)  # type: ignore[arg-type]
    assert repr(bad) in str(error.value)


@pytest.mark.parametrize("bad", ["soon", "0", "-5", "nan", "inf"])
def test_the_cli_refuses_a_bad_heartbeat_timeout(bad: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "layerwatch", "serve", "--heartbeat-timeout", bad],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--heartbeat-timeout" in result.stderr and repr(bad) in result.stderr, result.stderr


def test_the_sweeper_runs_again_when_the_app_is_started_on_a_new_event_loop(tmp_path: Path) -> None:
    """Each TestClient (or an ASGI test tool) runs the lifespan on a loop of its own."""
    from fastapi.testclient import TestClient

    from layerwatch.server.main import create_app

    app = create_app(Settings(db_url=f"sqlite:///{tmp_path}/loops.db", heartbeat_timeout_s=0.4))
    for _ in range(2):
        with TestClient(app):
            time.sleep(0.3)  # a few sweeps (every timeout / 4)
            task = app.state.liveness._task
            assert task is not None and not task.done(), "the sweeper died on this loop"
