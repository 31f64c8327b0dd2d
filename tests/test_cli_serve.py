"""`layerwatch serve` as a real process: it answers health, ingests over a real websocket, serves the data back."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import connect

from client_hook import wire
from tests.serving import free_port, wait_until_up

REPO = Path(__file__).resolve().parents[1]


def test_serve_ingests_and_serves_back(tmp_path: Path, run_frames: Any) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "layerwatch", "serve", "--port", str(port), "--db", f"sqlite:///{tmp_path}/x.db"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert wait_until_up(base, process)["protocol"] == wire.PROTOCOL_VERSION
        frames = run_frames(steps=2)
        with connect(f"ws://127.0.0.1:{port}/ws/ingest") as ws:
            ws.send(json.dumps(wire.batch(frames)))
            answer = json.loads(ws.recv(timeout=10))
            while answer["kind"] == "alert":  # alerts the batch raised come just before its ack
                answer = json.loads(ws.recv(timeout=10))
            assert answer == wire.ack({"run-1": [f["seq"] for f in frames]})
        runs = httpx.get(f"{base}/api/runs").json()
        assert [(r["id"], r["status"], r["last_step"]) for r in runs] == [("run-1", "finished", 1)]
        loss = httpx.get(f"{base}/api/runs/run-1/scalars", params={"key": "loss"}).json()
        assert loss["values"] == [2.0, 1.0]
    finally:
        process.terminate()
        try:
            output = process.communicate(timeout=10)[0].decode()
        except subprocess.TimeoutExpired:
            process.kill()
            output = process.communicate()[0].decode()
    assert f"layerwatch dashboard: http://127.0.0.1:{port}/" in output
    # A clean shutdown: uvicorn finishes, then re-raises the SIGTERM it caught.
    assert "Application shutdown complete" in output, output
    assert process.returncode in (0, -signal.SIGTERM), output
