"""One real `layerwatch serve` (SQLite) for the framework-mechanics tests, and readers of what it stored.

The per-step signals have no REST endpoint of their own: `signals(...)` reads them from the
server's database with the store's own replay reader, as the diagnosis does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.orm import Session

from layerwatch.server import store
from layerwatch.server.db import make_engine
from tests.serving import serve


@pytest.fixture(scope="package")
def server_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    db = tmp_path_factory.mktemp("frameworks") / "lw.db"
    with serve(db) as url:
        yield url, db


@pytest.fixture
def url(server_db: tuple[str, Path]) -> str:
    return server_db[0]


@pytest.fixture
def signals(server_db: tuple[str, Path]) -> Callable[[str], dict[int, dict[str, Any]]]:
    """signals(run_id) -> {step: the stored signals of that step}."""

    def read(run_id: str) -> dict[int, dict[str, Any]]:
        engine = make_engine(f"sqlite:///{server_db[1]}")
        try:
            with Session(engine) as session:
                steps = store.read_steps(session, run_id=run_id, start=0, stop=1 << 40)
        finally:
            engine.dispose()
        return {step: data[1] for step, data in sorted(steps.items())}

    return read


def get(url: str, run_id: str, what: str = "", **params: str) -> Any:
    response = httpx.get(f"{url}/api/runs/{run_id}{'/' + what if what else ''}", params=params, timeout=30)
    response.raise_for_status()
    return response.json()


def alarms(url: str, run_id: str) -> list[dict[str, Any]]:
    """The run's warning and critical alerts."""
    return [a for a in get(url, run_id, "alerts") if a["severity"] in ("warning", "critical")]
