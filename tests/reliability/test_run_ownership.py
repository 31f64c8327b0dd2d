"""A run belongs to the client that started it: nobody else can take its sequence numbers (red team #17 item 2).

The server stores each (run, seq) once and acks a repeat without storing it,
so whoever could send to a run could claim its future seqs first: 15,000
heartbeats with the victim's run id, and the victim's client reported its
steps acked while 1,478 of 1,500 were never stored. Now the first run_start
of a run sets its secret (kept hashed), and the frames of that run are taken
only on a connection that sent a run_start with it: the squatter's frames are
refused by name, never acked, and take no seq. A real server, a real training.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import torch
from websockets.sync.client import connect

from client_hook import monitor, wire
from tests.reliability.ledger import ledger_gaps, received_seqs
from tests.serving import serve
from tests.test_client_robustness import batch, make
from tests.training import train_step

STEPS = 150


def _squat(url: str, run_id: str, seqs: range) -> list[dict]:
    """Heartbeats of `run_id` with `seqs`, 500 a batch, from a connection that never proved anything."""
    answers = []
    with connect(url.replace("http://", "ws://") + "/ws/ingest") as ws:
        for start in range(seqs.start, seqs.stop, 500):
            frames = [
                wire.frame("heartbeat", run_id=run_id, seq=s, step=0, time=1.0)
                for s in range(start, min(start + 500, seqs.stop))
            ]
            ws.send(json.dumps(wire.batch(frames)))
            answers.append(json.loads(ws.recv(timeout=30)))
        # A run_start of its own, to take the run over: refused too.
        forged = wire.frame(
            "run_start", run_id=run_id, seq=0, step=0, name="mine", project="p", time=1.0,
            model={"modules": []}, secret="guess",
        )  # fmt: skip
        ws.send(json.dumps(wire.batch([forged])))
        answers.append(json.loads(ws.recv(timeout=30)))
    return answers


def test_a_squatter_cannot_take_a_runs_seqs_and_every_step_is_stored(tmp_path: Path) -> None:
    with serve(tmp_path / "own.db") as url:
        model, opt = make(9)
        mon = monitor.attach(model, opt, server=url, every=1, close_timeout=60)
        g = torch.Generator().manual_seed(9)
        for _ in range(10):
            train_step(model, opt, *batch(g), mon=mon)
        deadline = threading.Event()
        while mon.status()["acked"] == 0 and not deadline.wait(0.05):
            pass  # the run exists on the server (its run_start stored) before the squatter comes
        answers = _squat(url, mon.run_id, range(0, 3000))
        for _ in range(STEPS - 10):
            train_step(model, opt, *batch(g), mon=mon)
        mon.close()
        assert mon.status()["dropped"] == {}
        loss = httpx.get(f"{url}/api/runs/{mon.run_id}/scalars", params={"key": "loss"}).json()
        assert loss["steps"] == list(range(STEPS))  # every step stored, none lost to a squatted seq
        run = httpx.get(f"{url}/api/runs/{mon.run_id}").json()
        assert run["name"] != "mine" and run["status"] == "finished"
    db = tmp_path / "own.db"
    assert ledger_gaps(received_seqs(db, mon.run_id)) == ([], [])
    assert all(a["kind"] == "ack" and not a["seqs"] for a in answers), answers[0]  # nothing of it acked
    refusals = [r for a in answers for r in a["refused"]]
    assert len(refusals) == 3001
    assert "has not sent its run_start with the run's secret" in refusals[0]["error"]
    assert "does not carry its secret" in refusals[-1]["error"]
