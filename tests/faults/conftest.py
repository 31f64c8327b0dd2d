"""The fault suite's harness: one real `layerwatch serve` for the session, and `train_and_diagnose`.

Every training here is real (real model, real optimizer, real or synthetic
data), streamed by the real client to the real server, whose diagnosis engine
raises alerts; a test reads them back over REST exactly as the dashboard does.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from client_hook import monitor
from tests.serving import serve


@pytest.fixture(scope="session")
def diag_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session server's SQLite file (for `layerwatch diagnose --db`)."""
    return tmp_path_factory.mktemp("faults") / "faults.db"


@pytest.fixture(scope="session")
def diag_server(diag_db: Path) -> Iterator[str]:
    with serve(diag_db) as url:
        yield url


Alerts = list[dict[str, Any]]


def diagnose_stored(run_id: str, db: Path) -> str:
    """What `layerwatch diagnose RUN --db` prints for a run of the session's database: the rules replayed
    over the stored rows alone."""
    command = [sys.executable, "-m", "layerwatch", "diagnose", run_id, "--db", f"sqlite:///{db}"]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.fixture
def train_and_diagnose(diag_server: str) -> Callable[..., Alerts]:
    """train_and_diagnose(train, model, optimizer=None, **attach) -> the run's alerts.

    `train(mon)` runs the training loop, logging through `mon`; the monitor is
    closed (everything delivered and diagnosed) before the alerts are read.
    """

    def run(train: Callable[[monitor.Monitor], None], model: Any, optimizer: Any = None, **attach: Any) -> Alerts:
        attach.setdefault("run", f"fault-{train.__name__}")
        mon = monitor.attach(model, optimizer=optimizer, server=diag_server, close_timeout=60, **attach)
        with mon:
            train(mon)
        assert mon.status()["dropped"] == {}, mon.status()
        alerts = httpx.get(f"{diag_server}/api/runs/{mon.run_id}/alerts", timeout=30).json()
        run.last_run_id = mon.run_id  # type: ignore[attr-defined]
        return alerts

    return run


def alarms(alerts: Alerts) -> Alerts:
    """The alerts that count as alarms: warning and critical."""
    return [a for a in alerts if a["severity"] in ("warning", "critical")]


def by_rule(alerts: Alerts, rule: str) -> Alerts:
    return [a for a in alerts if a["rule"] == rule]


def describe(alerts: Alerts | dict[str, Any]) -> str:
    """The alerts (or one alert) in one line each, for an assertion's message."""
    if isinstance(alerts, dict):
        alerts = [alerts]
    return "; ".join(f"{a['rule']}[{a['severity']}] {a['layer']!r} @{a['step']}: {a['message']}" for a in alerts)


DATA = Path(__file__).parent
