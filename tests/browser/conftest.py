"""Real-browser fixtures: a real `python -m server serve` on a free port with a
temporary SQLite file, a headless system Chromium driven by Playwright, and a
small training-client stand-in that ingests frames over /ws/ingest.

Nothing is mocked: the dashboard talks to the server exactly as in use, and
the browser may not reach anything but the test server.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from websockets.sync.client import connect

from client_hook import wire
from tests.serving import serve as running_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="session")
def server_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server") / "layerwatch.db"


@pytest.fixture(scope="session")
def server(server_db: Path) -> Iterator[str]:
    """The base URL of a real layerwatch server shared by the tests; terminated after the session."""
    with running_server(server_db) as base:
        yield base


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    """A headless system Chromium. Missing Chromium is a failure, not a skip."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: install it with `apt-get install -y chromium` (not `playwright install`)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class PageProbe:
    """A page plus everything it said and asked for while the test ran."""

    def __init__(self, page: object) -> None:
        self.page = page
        self.errors: list[str] = []
        self.requests: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("request", lambda request: self.requests.append(request.url))

    def _console(self, msg: object) -> None:
        if msg.type == "error":
            self.errors.append(f"console.error: {msg.text}")


@contextmanager
def open_page(browser: object, base_url: str) -> Iterator[PageProbe]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, base_url=base_url)
    page = context.new_page()
    # Generous: on a 2-core CI machine a live test's training, the server and Chromium share the
    # cores, and an action waits for the renderer (a click once waited > 10 s there, never locally).
    page.set_default_timeout(30_000)
    try:
        yield PageProbe(page)
    finally:
        context.close()


@pytest.fixture
def probe(browser: object, server: str) -> Iterator[PageProbe]:
    with open_page(browser, server) as probe:
        yield probe


class TrainingClient:
    """Sends wire frames for one run over /ws/ingest, as `client_hook` would."""

    def __init__(self, server: str, run_id: str) -> None:
        self.url = server.replace("http://", "ws://") + "/ws/ingest"
        self.run_id = run_id
        self.seq = 0

    def send(self, frames: list[tuple[str, int, dict]]) -> None:
        """Send (kind, step, fields) frames in one batch and wait for the ack."""
        built = []
        for kind, step, fields in frames:
            built.append(wire.frame(kind, run_id=self.run_id, seq=self.seq, step=step, **fields))
            self.seq += 1
        with connect(self.url) as ws:
            ws.send(json.dumps(wire.batch(built)))
            # The server may push alerts its rules raised on this batch before the ack.
            answer = json.loads(ws.recv(timeout=10))
            while answer.get("kind") == "alert":
                answer = json.loads(ws.recv(timeout=10))
        assert answer.get("kind") == "ack", answer
        assert sorted(answer["seqs"][self.run_id]) == [f["seq"] for f in built], answer


@pytest.fixture
def client_for(server: str):
    """`client_for(run_id)`: a training client for the shared server (or for `base=` another one)."""
    return lambda run_id, base=None: TrainingClient(base or server, run_id)


@pytest.fixture
def server_factory():
    """`running_server(db, port=None)` for tests that start and stop servers of their own."""
    return running_server


@pytest.fixture
def page_factory(browser: object):
    """`open_page(base_url)`: a fresh browser context and page on another server."""
    return lambda base_url: open_page(browser, base_url)


@pytest.fixture
def add_alert(server: str, server_db: Path):
    """Store an alert row for a run, as the diagnosis engine will (no rule fires on test data yet)."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from layerwatch.server.tables import Alert

    engine = create_engine(f"sqlite:///{server_db}")

    def add(
        run_id: str,
        *,
        rule: str,
        severity: str,
        step: int,
        last_step: int,
        count: int,
        layer: str | None,
        message: str,
        remedy: str,
    ) -> None:
        now = time.time()
        with Session(engine) as session, session.begin():
            session.add(
                Alert(
                    run_id=run_id,
                    rule=rule,
                    severity=severity,
                    layer=layer,
                    first_step=step,
                    last_step=last_step,
                    count=count,
                    message=message,
                    remedy=remedy,
                    evidence=None,
                    created_at=now,
                    updated_at=now,
                )
            )

    yield add
    engine.dispose()
