"""The one verdict the fault tests share: a run stored completely and exactly once."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.reliability.ledger import ledger_gaps, received_seqs, rows_per_step, scalar_steps
from tests.reliability.training import PROBE


def assert_stored_once(url: str, db: Path, run_id: str, losses: list[float]) -> None:
    """Every step's loss and layer statistics once, over REST and in the SQLite file; the
    ledger holds every seq from 0 to the run_end once, with no gaps."""
    steps = list(range(len(losses)))
    run = httpx.get(f"{url}/api/runs/{run_id}").json()
    assert (run["status"], run["last_step"]) == ("finished", steps[-1])
    loss_series = httpx.get(f"{url}/api/runs/{run_id}/scalars", params={"key": "loss"}).json()
    assert loss_series["steps"] == steps
    assert loss_series["values"] == pytest.approx(losses, rel=1e-6)
    assert httpx.get(f"{url}/api/runs/{run_id}/layer_stats", params=PROBE).json()["steps"] == steps

    seqs = received_seqs(db, run_id)
    assert ledger_gaps(seqs) == ([], [])
    # run_end is the run's last frame and it is stored (status finished): with no gap
    # below it, every frame the client numbered is in.
    assert len(seqs) == seqs[-1] + 1
    assert scalar_steps(db, run_id, "loss") == steps
    stats = rows_per_step(db, "layer_stats", run_id)
    assert sorted(stats) == steps
    assert len(set(stats.values())) == 1  # every step has every series (once: the table's key)
    assert sorted(rows_per_step(db, "histograms", run_id)) == steps
