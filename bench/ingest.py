"""Ingest: a synthetic client streams a 200-layer model every step into a real server on SQLite.

Frames are built with `client_hook.wire` exactly as the sender builds them
(layer_stats + histograms per step, weight/grad/activation rows per layer);
batches of BATCH steps go over one websocket, each waiting for its ack, as the
sender does. The server's whole path is timed: JSON parse and validation, the
rows, the step rollups, the diagnosis rules and the ack.
"""

from __future__ import annotations

import json
import random
import time
import uuid

from bench._common import figure, machine, parser, percentile, server
from client_hook import wire

LAYERS = 200
BATCH = 4  # steps per websocket message (2 frames each)


def step_frames(run_id: str, seq: int, step: int, rng: random.Random) -> list[dict]:
    stats, hists = [], []
    for i in range(LAYERS):
        for kind in wire.TENSOR_KINDS:
            param = wire.ACTIVATION_PARAM if kind == "activation" else "weight"
            v = rng.random()
            cells = {"layer": f"layer{i}", "param": param, "kind": kind, "nonfinite": 0, "numel": 4096}
            cells["update_ratio"] = v * 1e-3 if kind == "weight" else None
            cells["sat_frac"] = None  # what the client sends for a Linear: it has no saturating tails
            stats.append([cells.get(column, v) for column in wire.LAYER_STAT_COLUMNS])
            hists.append([f"layer{i}", param, kind, -v, v, [rng.randrange(200) for _ in range(wire.HIST_BINS)]])
    return [
        wire.frame("layer_stats", run_id=run_id, seq=seq, step=step, rows=stats, every=1),
        wire.frame("histograms", run_id=run_id, seq=seq + 1, step=step, rows=hists),
    ]


def main() -> None:
    args = parser(__doc__).parse_args()
    steps = 16 if args.quick else 200
    print(f"machine: {machine()}")
    from websockets.sync.client import connect

    rng = random.Random(0)
    run_id = uuid.uuid4().hex
    model = {"modules": [{"name": f"layer{i}", "type": "Linear", "params": ["weight"]} for i in range(LAYERS)]}
    start = wire.frame("run_start", run_id=run_id, seq=0, step=0, name="ingest", project="bench", time=time.time(),
                       model=model)  # fmt: skip
    messages = []
    seq = 1
    for first in range(0, steps, BATCH):
        frames = []
        for step in range(first, min(first + BATCH, steps)):
            frames += step_frames(run_id, seq, step, rng)
            seq += 2
        messages.append(json.dumps(wire.batch(frames)))
    with server() as (url, db):
        # compression=None as client_hook/sending/sender.py connects (deflate would cost both sides ~10 ms a batch).
        with connect(url.replace("http", "ws") + "/ws/ingest", max_size=wire.MAX_MESSAGE_BYTES, compression=None) as ws:
            ws.send(json.dumps(wire.batch([start])))
            while json.loads(ws.recv())["kind"] != "ack":  # alerts come before the ack
                pass
            latencies = []
            began = time.perf_counter()
            for message in messages:
                sent = time.perf_counter()
                ws.send(message)
                reply = json.loads(ws.recv())
                while reply["kind"] == "alert":  # the rules' alerts come just before the ack
                    reply = json.loads(ws.recv())
                assert reply["kind"] == "ack", reply
                latencies.append(time.perf_counter() - sent)
            elapsed = time.perf_counter() - began
        size = sum(p.stat().st_size for p in db.parent.glob(db.name + "*"))  # database + WAL
    rows = steps * LAYERS * len(wire.TENSOR_KINDS)
    figure("layer-stat rows/s sustained", f"{rows / elapsed:,.0f} (+ as many histogram rows)", ">= 100,000")
    p50, p99 = percentile(latencies, 50) * 1e3, percentile(latencies, 99) * 1e3
    figure("send->ack per batch", f"p50 {p50:.0f} ms, p99 {p99:.0f} ms ({BATCH} steps x {LAYERS * 3} rows x 2 frames)")
    figure(
        "bytes stored per layer per sampled step", f"{size / (steps * LAYERS):,.0f} B (3 kinds: stats + histogram rows)"
    )


if __name__ == "__main__":
    main()
