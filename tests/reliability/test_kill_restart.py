"""SIGKILL the server mid-run, twice, and restart it on the same port and database.

A real training streams every step (every=1) to a real `layerwatch serve`. The
first kill lands while the client is streaming; the client piles up a backlog
while nobody listens. The second kill lands just after the restarted server
commits its first replayed batch, so the ack may never leave. After
`mon.close()` every step must be stored exactly once, read both over REST and
straight from the SQLite file (the ledger holds every seq once, no gaps).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from client_hook import monitor
from tests.reliability.checks import assert_stored_once
from tests.reliability.ledger import received_seqs
from tests.reliability.servers import ServerProcess
from tests.reliability.training import TinyTraining

STEPS = 150
FIRST_KILL, RESTART = 50, 90  # steps: the outage in between leaves the client a backlog
STEP_SLEEP_S = 0.02  # so the kills land mid-run rather than after the last step
CLOSE_TIMEOUT_S = 60.0  # restarts and reconnect backoff (up to 5 s) fit well inside


def kill_after_next_commit(server: ServerProcess, run_id: str, killed: threading.Event) -> None:
    """Wait until the restarted server's ledger grows (it committed a replayed batch), then
    SIGKILL it at once and start it again: the ack for that batch is likely lost."""
    before = len(received_seqs(server.db_path, run_id))
    deadline = time.monotonic() + 30
    while len(received_seqs(server.db_path, run_id)) == before and time.monotonic() < deadline:
        time.sleep(0.002)
    server.kill()
    killed.set()
    server.start()


def test_sigkill_and_restart_mid_run_stores_every_step_once(tmp_path: Path) -> None:
    db = tmp_path / "lw.db"
    server = ServerProcess(db)
    server.start()
    try:
        training = TinyTraining(seed=0)
        mon = monitor.attach(
            training.model, optimizer=training.opt, server=server.url, run="killed", every=1,
            close_timeout=CLOSE_TIMEOUT_S,
        )  # fmt: skip
        second_kill = threading.Event()
        killer: threading.Thread | None = None
        losses = []
        for step in range(STEPS):
            loss = training.step(step)
            mon.log(loss=loss)
            losses.append(loss.item())
            if step == FIRST_KILL:
                server.kill()
            elif step == RESTART:
                server.start()
                killer = threading.Thread(target=kill_after_next_commit, args=(server, mon.run_id, second_kill))
                killer.start()
            time.sleep(STEP_SLEEP_S)
        assert killer is not None
        killer.join(timeout=60)
        mon.close()

        assert second_kill.is_set() and server.starts == 3
        assert mon.status()["dropped"] == {}

        assert_stored_once(server.url, db, mon.run_id, losses)  # read from the third server process
    finally:
        server.stop()
