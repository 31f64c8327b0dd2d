"""Graceful SIGTERM: a real `layerwatch serve` stops accepting, commits what is in flight, exits 0.

The database is read directly (sqlite3) after the server has exited, so what
is checked is what is on disk, not what a server says.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

from client_hook import wire
from tests.serving import free_port, wait_until_up

EXIT_WAIT_S = 20.0  # a hang bound, not a speed check: uvicorn's own grace is 10 s
ROWS = [[f"layer{i}", "weight", "weight", 0.1, 0.2, 0.3, 1.0, -1.0, 1.0, 0, 0.0, 256, 0.001, None] for i in range(40)]
MODEL = {"modules": [{"name": f"layer{i}", "type": "Linear", "params": []} for i in range(40)]}


@contextmanager
def server_process(db: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m server serve` on `port` over the SQLite file `db`; killed at the end if still running."""
    log = db.with_name(f"server-{port}-{time.monotonic_ns()}.log")
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "layerwatch", "serve", "--port", str(port), "--db", f"sqlite:///{db}"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    process.log = log  # type: ignore[attr-defined]
    try:
        wait_until_up(f"http://127.0.0.1:{port}", process)
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def sigterm(process: subprocess.Popen[bytes]) -> str:
    """SIGTERM the server; its log once it has exited, which must be with status 0."""
    process.send_signal(signal.SIGTERM)
    returncode = process.wait(timeout=EXIT_WAIT_S)
    log = process.log.read_text(errors="replace")  # type: ignore[attr-defined]
    assert returncode == 0, log
    assert "Application shutdown complete" in log and "Traceback" not in log, log
    return log


def stored_seqs(db: Path, run_id: str) -> set[int]:
    with sqlite3.connect(db) as conn:
        return {seq for (seq,) in conn.execute("SELECT seq FROM received_frames WHERE run_id = ?", (run_id,))}


def run_frames(run_id: str, steps: int) -> list[dict[str, Any]]:
    """run_start, then per step a scalars and a layer_stats frame (40 rows), then run_end."""
    frames = [wire.frame("run_start", run_id=run_id, seq=0, step=0, name=run_id, project="p", time=1.0, model=MODEL)]
    for step in range(steps):
        loss = {"values": {"loss": 1.0 / (step + 1)}, "time": 1.0}
        frames.append(wire.frame("scalars", run_id=run_id, seq=len(frames), step=step, **loss))
        frames.append(wire.frame("layer_stats", run_id=run_id, seq=len(frames), step=step, rows=ROWS))
    frames.append(wire.frame("run_end", run_id=run_id, seq=len(frames), step=steps - 1, status="finished", time=2.0))
    return frames


class ReplayingClient(threading.Thread):
    """Streams a run's frames as client_hook's sender does: every frame is kept until acked,
    and after a lost connection it reconnects and sends the unacked ones again."""

    def __init__(self, url: str, frames: list[dict[str, Any]], per_batch: int = 20) -> None:
        super().__init__(daemon=True)
        self.url, self.frames, self.per_batch = url, frames, per_batch
        self.acked: set[int] = set()
        self.batches: list[list[int]] = []  # the seqs of every batch sent, in order
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._stream()
        except BaseException as exc:  # reported by the test, not lost in a thread
            self.error = exc

    def _stream(self) -> None:
        deadline = time.monotonic() + 120
        while len(self.acked) < len(self.frames) and not self.stop.is_set():
            assert time.monotonic() < deadline, "the client could not deliver its run"
            try:
                with connect(self.url, open_timeout=2) as ws:
                    while len(self.acked) < len(self.frames):
                        batch = [f for f in self.frames if f["seq"] not in self.acked][: self.per_batch]
                        with self.lock:
                            self.batches.append([f["seq"] for f in batch])
                        ws.send(json.dumps(wire.batch(batch)))
                        answer = json.loads(ws.recv(timeout=30))
                        while answer["kind"] != "ack":
                            answer = json.loads(ws.recv(timeout=30))
                        with self.lock:
                            self.acked.update(answer["seqs"][batch[0]["run_id"]])
                        time.sleep(0.01)  # a training step's worth of pause between batches
            except AssertionError:
                raise
            except Exception:  # refused, closed with 1012, reset: the server is away
                time.sleep(0.1)  # try again, as the real sender does

    def snapshot(self) -> tuple[set[int], list[list[int]]]:
        with self.lock:
            return set(self.acked), [list(b) for b in self.batches]


def test_sigterm_mid_run_keeps_every_ack_and_a_restart_finishes_the_run_once(tmp_path: Path) -> None:
    db, port = tmp_path / "lw.db", free_port()
    frames = run_frames("streamed", steps=400)
    client = ReplayingClient(f"ws://127.0.0.1:{port}/ws/ingest", frames)
    with server_process(db, port) as first:
        client.start()
        deadline = time.monotonic() + 60
        while len(client.snapshot()[0]) < 100:  # mid-run: some acked, most still to come
            assert time.monotonic() < deadline and client.error is None, client.error
            time.sleep(0.02)
        sigterm(first)
    acked, batches = client.snapshot()
    assert len(acked) < len(frames), "the run ended before the server was stopped: nothing was tested"
    stored = stored_seqs(db, "streamed")
    assert acked <= stored, f"acked but not on disk: {sorted(acked - stored)[:10]}"
    for batch in batches:  # one transaction per batch: all of it or none of it
        assert set(batch) <= stored or not set(batch) & stored, batch

    with server_process(db, port) as second:  # same database, same port: the client finds it again
        client.join(timeout=120)
        assert not client.is_alive() and client.error is None, client.error
        sigterm(second)
    assert stored_seqs(db, "streamed") == {f["seq"] for f in frames}
    with sqlite3.connect(db) as conn:
        losses = conn.execute("SELECT step FROM scalars WHERE run_id = 'streamed' AND key = 'loss' ORDER BY step")
        assert [step for (step,) in losses] == list(range(400))
        per_step = conn.execute("SELECT step, COUNT(*) FROM layer_stats WHERE run_id = 'streamed' GROUP BY step")
        assert dict(per_step.fetchall()) == {step: len(ROWS) for step in range(400)}
        assert conn.execute("SELECT status FROM runs WHERE id = 'streamed'").fetchone() == ("finished",)


def test_a_batch_caught_mid_commit_is_committed_before_exit(tmp_path: Path) -> None:
    """The test holds SQLite's write lock, so the server's commit of a batch waits on it; SIGTERM
    comes while it waits. A graceful server lets that commit finish before it exits."""
    db, port = tmp_path / "lw.db", free_port()
    frames = run_frames("in-flight", steps=5)
    with server_process(db, port) as process:
        blocker = sqlite3.connect(db, timeout=30, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # the one writer now is this test
        with connect(f"ws://127.0.0.1:{port}/ws/ingest") as ws:
            ws.send(json.dumps(wire.batch(frames)))
            time.sleep(1.0)  # time for the server to read the small batch and reach its commit
            process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert process.poll() is None, "the server exited with a commit still waiting"
            blocker.rollback()  # the server's commit goes ahead now
            with pytest.raises(Exception):  # noqa: B017 -- closed with 1012, never acked: any close error
                while json.loads(ws.recv(timeout=EXIT_WAIT_S))["kind"] != "ack":
                    pass
        blocker.close()
        returncode = process.wait(timeout=EXIT_WAIT_S)
    log = process.log.read_text(errors="replace")  # type: ignore[attr-defined]
    assert returncode == 0, log
    assert stored_seqs(db, "in-flight") == {f["seq"] for f in frames}, log
