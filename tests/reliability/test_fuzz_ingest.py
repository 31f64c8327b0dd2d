"""Property-based fuzzing of /ws/ingest: thousands of bad messages against a real server.

Each generated message (tests/reliability/badframes.py) goes over its own
websocket to a real uvicorn server (a 64 KiB message limit, so oversize
messages are cheap to make). A message that is not a batch must be answered
with an `error` naming the problem, then a close (1008, or 1009 for oversize);
never the internal-error close 1011, and nothing of it stored. A batch with a
bad frame is acked: the bad frame named in `refused` (index and reason, never
stored), the rest of the batch stored (a run is not lost for one bad frame).
Meanwhile a good client streams a run on its own connection throughout; every
one of its batches must be acked and every frame stored; the server stays up.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from client_hook import wire
from layerwatch.server.settings import Settings
from tests.reliability import badframes, frames
from tests.reliability.badframes import Bad
from tests.reliability.ledger import ledger_gaps, received_seqs, run_ids, scalar_steps
from tests.reliability.servers import ThreadedServer

# Keepalive pings (uvicorn's and the websockets client's, every 20 s, in their own threads)
# draw from the global `random`; when one lands while hypothesis generates an example it
# warns, though the example's data never depends on it.
pytestmark = pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")

LIMIT = 64 * 1024  # the server's max_message_bytes here
GOOD_RUN = "good-run"
FUZZ = settings(
    max_examples=1200,  # per test: ~3,000 bad messages in all, ~1 min on 2 busy cores
    deadline=None,  # a real server on a shared machine: latency is not what is tested
    database=None,  # nothing written into the working tree; a failure prints its example
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@dataclass
class GoodClient:
    """Streams a run (3 frames a step, 2 steps a batch) on one connection until stopped."""

    url: str
    steps: int = 0
    seq: int = 0
    failure: str | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        import random

        rng = random.Random(0)
        try:
            with connect(f"{self.url.replace('http', 'ws', 1)}/ws/ingest") as ws:
                self._send(ws, [("run_start", 0, frames.run_start_fields(name="good", layers=3, time=1.0))])
                while not self.stop.is_set():
                    batch = [
                        (kind, step, fields)
                        for step in (self.steps, self.steps + 1)
                        for kind, fields in frames.step_fields(step, layers=3, rng=rng, time=2.0)
                    ]
                    self._send(ws, batch)
                    self.steps += 2
                    time.sleep(0.01)
                self._send(ws, [("run_end", self.steps - 1, {"status": "finished", "time": 3.0})])
        except Exception as exc:  # the assertion is in the tests: this client must never fail
            self.failure = repr(exc)

    def _send(self, ws, batch: list[tuple]) -> None:
        numbered = [wire.frame(k, run_id=GOOD_RUN, seq=self.seq + i, step=s, **f) for i, (k, s, f) in enumerate(batch)]
        ws.send(json.dumps(wire.batch(numbered)))
        while (answer := json.loads(ws.recv(timeout=30)))["kind"] == "alert":
            pass
        expected = list(range(self.seq, self.seq + len(batch)))
        assert answer == wire.ack({GOOD_RUN: expected}), answer
        self.seq += len(batch)


@dataclass
class World:
    url: str
    db: Path
    good: GoodClient


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    db = tmp_path_factory.mktemp("fuzz") / "fuzz.db"
    with ThreadedServer(Settings(db_url=f"sqlite:///{db}", max_message_bytes=LIMIT)) as server:
        good = GoodClient(server.url)
        thread = threading.Thread(target=good.run, name="good-client", daemon=True)
        thread.start()
        yield World(server.url, db, good)
        good.stop.set()
        thread.join(timeout=30)
        # The end of the module: the good run complete and finished, and nothing else stored.
        assert good.failure is None, good.failure
        assert ledger_gaps(received_seqs(db, GOOD_RUN)) == ([], []) and len(received_seqs(db, GOOD_RUN)) == good.seq
        assert scalar_steps(db, GOOD_RUN, "loss") == list(range(good.steps))
        assert httpx.get(f"{server.url}/api/runs/{GOOD_RUN}").json()["status"] == "finished"
        assert all(run == GOOD_RUN or run.startswith("bad-") for run in run_ids(db))


def refusal(url: str, message: str | bytes) -> tuple[str, int]:
    """Send one message on a fresh connection; return the error text and the close code that followed."""
    with connect(f"{url.replace('http', 'ws', 1)}/ws/ingest", max_size=None) as ws:
        ws.send(message)
        answer = json.loads(ws.recv(timeout=30))
        assert answer["kind"] == "error", answer
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
    assert closed.value.rcvd is not None, "closed without a close frame"
    return answer["error"], closed.value.rcvd.code


def answer(url: str, message: str) -> dict:
    """Send one batch on a fresh connection; return the server's ack or error (past any alerts)."""
    with connect(f"{url.replace('http', 'ws', 1)}/ws/ingest", max_size=None) as ws:
        ws.send(message)
        while (reply := json.loads(ws.recv(timeout=30)))["kind"] == "alert":
            pass
    return reply


def check_refused_alone(world: World, bad: Bad) -> None:
    """The bad frame is refused by index, naming what is wrong; the batch's other frames are stored, or
    refused because their run's run_start was; nothing refused is in the ledger."""
    # A fresh run each time: hypothesis replays examples (shrinking), and a replayed run's frames are
    # already stored.
    message = json.loads(bad.message)
    batch = message["frames"]
    fresh = f"bad-{uuid.uuid4().hex}"
    original = next(f["run_id"] for f in batch if isinstance(f.get("run_id"), str) and f["run_id"].startswith("bad-"))
    for frame in batch:
        if frame.get("run_id") == original:
            frame["run_id"] = fresh
    reply = answer(world.url, json.dumps(message))
    if reply["kind"] == "error":
        # A run_start spoilt in its run_id: the batch's other frames are of a run never started (the
        # connection is closed for them, as for any frame of an unknown run). Nothing of it is stored.
        assert reply["error"].startswith("unknown run"), reply
        assert received_seqs(world.db, fresh) == []
        return
    refused = {r["index"]: r["error"] for r in reply.get("refused", [])}
    first = min(refused)
    for fragment in bad.expected:
        assert fragment in refused[first], (fragment, refused)
    acked = set(reply["seqs"].get(fresh, []))
    for i, frame in enumerate(batch):
        if i in refused:
            assert i == first or "run_start" in refused[i], (i, refused)
        else:
            assert frame["seq"] in acked, (i, reply)
    assert set(received_seqs(world.db, fresh)) == acked  # exactly what was acked, nothing refused


def check_refused(world: World, bad: Bad) -> None:
    error, code = refusal(world.url, bad.message)
    assert "could not store" not in error, error  # a schema hole reaching the database
    for fragment in bad.expected:
        assert fragment in error, (fragment, error)
    assert code == bad.code, (code, error)


def check_the_good_run_streams_on(world: World) -> None:
    assert world.good.failure is None, world.good.failure
    assert all(run == GOOD_RUN or run.startswith("bad-") for run in run_ids(world.db))
    assert httpx.get(f"{world.url}/api/health").status_code == 200


@FUZZ
@given(bad=badframes.one_bad_field())
def test_a_frame_with_one_missing_or_wrong_field_is_refused_alone_naming_it(world: World, bad: Bad) -> None:
    check_refused_alone(world, bad)


@FUZZ
@given(bad=badframes.not_a_batch(LIMIT))
def test_a_message_that_is_not_a_batch_is_refused_saying_why(world: World, bad: Bad) -> None:
    check_refused(world, bad)


@FUZZ
@given(frame_list=st.lists(badframes.frame_fields(), min_size=1, max_size=3))
def test_frames_of_random_content_are_refused_cleanly(world: World, frame_list: list) -> None:
    # Each bad frame refused by index, or the batch closed for a frame of an unknown run: 1008, never 1011.
    with connect(f"{world.url.replace('http', 'ws', 1)}/ws/ingest", max_size=None) as ws:
        ws.send(json.dumps(wire.batch(frame_list)))
        reply = json.loads(ws.recv(timeout=30))
        if reply["kind"] == "ack":
            assert not any(reply["seqs"].values()), reply  # random frames belong to no started run
            assert sorted(r["index"] for r in reply["refused"]) == list(range(len(frame_list))), reply
            assert all(r["error"].startswith(f"frame {r['index']}") for r in reply["refused"]), reply
            return
        assert reply["kind"] == "error" and "could not store" not in reply["error"], reply
        assert reply["error"].startswith("unknown run"), reply
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


def test_after_the_fuzzing_nothing_bad_is_stored_and_the_good_client_streams_on(world: World) -> None:
    steps_before = world.good.steps
    deadline = time.monotonic() + 10
    while world.good.steps < steps_before + 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert world.good.steps >= steps_before + 4, "the good client stalled"
    check_the_good_run_streams_on(world)
