"""Load: 50 concurrent clients x 1000 steps into one real `layerwatch serve`; nothing lost or duplicated.

Each client is the real `client_hook.sending.sender.Sender` (its own thread, websocket,
per-run seqs, batching and ack bookkeeping) fed the frames of a synthetic
training (tests/reliability/frames.py): run_start, then per step scalars,
signals and layer_stats, then run_end. The frames are made in the sender
threads, as the monitor's samples are. Afterwards the SQLite file must hold,
for every run, each step 0..999 once and every seq in the ledger once.
bench/load.py measures the same traffic's throughput and ack latency.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from client_hook.sending.sender import Frame, Sender
from tests.reliability import frames
from tests.reliability.ledger import (
    count,
    ledger_gaps,
    received_seqs,
    rows_per_step,
    run_ids,
    run_status,
    scalar_steps,
)
from tests.reliability.servers import ServerProcess

CLIENTS = 50
STEPS = 1000
LAYERS = 4  # 12 layer-stat rows a step: the test checks delivery; bench/load.py uses 10 layers for figures
# The test checks delivery, not speed (bench/load.py measures throughput): the bound only
# stops a hung server. The same code delivered this traffic in ~60 s on 2026-12-02 and
# needed ~100 s on 2026-12-04's slower 2-core machines (bench.load: 2,387 -> 882 frames/s,
# the old commit measuring 996 there too), so it allows 3x the slowest seen.
CLOSE_TIMEOUT_S = 300.0


class StepItem:
    """One step of the synthetic training; its frames are built in the sender thread."""

    def __init__(self, step: int, rng: random.Random) -> None:
        self.step, self.rng = step, rng

    def frames(self) -> list[tuple[str, int, dict[str, Any]]]:
        fields = frames.step_fields(self.step, layers=LAYERS, rng=self.rng, time=time.time())
        return [(kind, self.step, f) for kind, f in fields]


def test_fifty_clients_a_thousand_steps_each_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    db = tmp_path / "load.db"
    with ServerProcess(db) as server:
        senders = []
        for client in range(CLIENTS):
            sender = Sender(server=server.url, run_id=f"load-{client:02d}", max_queue=STEPS + 10)
            sender.submit(Frame("run_start", 0, **frames.run_start_fields(name=f"c{client}", layers=LAYERS, time=1.0)))
            senders.append(sender)
        for sender in senders:  # all queued up front: 50 clients sending as fast as the server acks
            rng = random.Random(sender.run_id)
            for step in range(STEPS):
                assert sender.submit(StepItem(step, rng))
            sender.submit(Frame("run_end", STEPS - 1, status="finished", time=2.0))

        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        left = {s.run_id: s.close(max(0.0, deadline - time.monotonic())) for s in senders}
        assert left == {s.run_id: 0 for s in senders}
        assert all(s.dropped == {} for s in senders)

    frames_per_run = 1 + 3 * STEPS + 1  # run_start, 3 a step, run_end; plus a heartbeat every 10 s
    assert run_ids(db) == {s.run_id for s in senders}
    for sender in senders:
        seqs = received_seqs(db, sender.run_id)
        assert ledger_gaps(seqs) == ([], []), sender.run_id
        assert len(seqs) == sender.acked >= frames_per_run, sender.run_id  # each acked frame stored once
        assert run_status(db, sender.run_id) == "finished"  # run_end, the last frame, is in
        assert scalar_steps(db, sender.run_id, "loss") == list(range(STEPS))
        assert rows_per_step(db, "layer_stats", sender.run_id) == dict.fromkeys(range(STEPS), 3 * LAYERS)
        assert sorted(rows_per_step(db, "step_signals", sender.run_id)) == list(range(STEPS))
    assert count(db, "received_frames") == sum(s.acked for s in senders)
