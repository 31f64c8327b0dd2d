"""A real training through a proxy that cuts its connection at random bytes, several times a run.

Cuts land anywhere: in the websocket handshake, in the middle of a batch (the
server sees half a message, stores nothing and hangs up), or in the middle of
an ack (the batch is committed but the client never hears so and replays it).
With FIN or RST, at byte counts from a seeded RNG. Every step must still be
stored exactly once.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from client_hook import monitor
from tests.reliability.checks import assert_stored_once
from tests.reliability.proxy import FlakyProxy
from tests.reliability.servers import ServerProcess
from tests.reliability.training import TinyTraining

STEPS = 150
STEP_SLEEP_S = 0.01  # spreads the run over the cuts (a step of this model takes ~1 ms)
CUTS = 8  # connections cut; the ninth and later pass through, so the run can finish
# Byte budgets: a step of this model is ~4 KB of frames upstream; an ack is ~0.1-2 KB downstream.
MAX_UP_BYTES, MAX_DOWN_BYTES = 60_000, 3_000


@pytest.mark.parametrize("seed", [1, 2])
def test_random_connection_cuts_lose_and_duplicate_nothing(tmp_path: Path, seed: int) -> None:
    db = tmp_path / "lw.db"
    with ServerProcess(db) as server:
        proxy = FlakyProxy(server.port, seed=seed, cuts=CUTS, max_up=MAX_UP_BYTES, max_down=MAX_DOWN_BYTES)
        try:
            training = TinyTraining(seed=seed)
            mon = monitor.attach(
                training.model, optimizer=training.opt, server=proxy.url, run=f"flaky-{seed}", every=1,
                close_timeout=60,
            )  # fmt: skip
            losses = []
            for step in range(STEPS):
                loss = training.step(step)
                mon.log(loss=loss)
                losses.append(loss.item())
                time.sleep(STEP_SLEEP_S)
            mon.close()
        finally:
            proxy.close()

        assert len(proxy.cuts) == CUTS, proxy.cuts  # every planned cut happened before the run ended
        assert {cut.direction for cut in proxy.cuts} == {"up", "down"}  # mid-batch and mid-ack
        assert mon.status()["dropped"] == {}
        assert_stored_once(server.url, db, mon.run_id, losses)  # read past the proxy, from the server itself
