"""The dashboard asks for the access token once: a real Chromium against a real `layerwatch serve --token`.

The page loads without a token, meets the server's 401, shows its in-page
form, and with the right token shows the run list and live updates; a reload
does not ask again (the token is in localStorage); a wrong token is told so and
asked for again. A project's token shows that project's runs only, live too.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from websockets.sync.client import connect

from client_hook import wire

TOKEN = "browser-s3cret"
MODEL = {"modules": [{"name": "fc", "type": "Linear", "params": []}]}


def start_run(base: str, name: str, project: str = "tokens") -> str:
    """Ingest a run_start and a loss over /ws/ingest with the token, as a training client does; its id."""
    run_id = f"{name}-{uuid.uuid4().hex[:8]}"
    start = {"name": name, "project": project, "time": time.time(), "model": MODEL}
    frames = [
        wire.frame("run_start", run_id=run_id, seq=0, step=0, **start),
        wire.frame("scalars", run_id=run_id, seq=1, step=0, values={"loss": 1.5}, time=time.time()),
    ]
    url = base.replace("http://", "ws://") + "/ws/ingest"
    with connect(url, additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
        ws.send(json.dumps(wire.batch(frames)))
        while json.loads(ws.recv(timeout=10))["kind"] != "ack":
            pass
    return run_id


def enter_token(page: object, token: str) -> None:
    page.fill("#token-input", token)
    page.click("#token-submit")


def unexpected(errors: list[str]) -> list[str]:
    """Console errors other than Chromium's own line for each 401 (the server's answer the page handles)."""
    return [e for e in errors if "status of 401" not in e]


def test_the_dashboard_asks_once_and_remembers(tmp_path: Path, server_factory, page_factory) -> None:
    with server_factory(tmp_path / "lw.db", args=["--token", TOKEN]) as base, page_factory(base) as probe:
        run_id = start_run(base, "needs-a-token")
        page = probe.page
        page.goto("/")
        overlay = page.locator("#token-overlay")
        overlay.wait_for(state="visible")
        assert page.locator("#token-title").text_content() == "This server needs an access token"
        assert page.locator("#token-message").get_attribute("data-kind") == "ask"
        assert page.locator(f'tr[data-run-id="{run_id}"]').count() == 0

        enter_token(page, TOKEN)
        page.locator(f'tr[data-run-id="{run_id}"]').wait_for()
        assert overlay.is_hidden()
        # /ws/live took the token too: a run started now appears without a reload.
        page.wait_for_function("document.getElementById('live-indicator').dataset.state === 'live'")
        live_id = start_run(base, "appears-live")
        page.locator(f'tr[data-run-id="{live_id}"]').wait_for()

        # A reload does not ask again.
        page.reload()
        page.locator(f'tr[data-run-id="{live_id}"]').wait_for()
        page.wait_for_function("document.getElementById('live-indicator').dataset.state === 'live'")
        assert overlay.is_hidden()
        assert page.evaluate("localStorage.getItem('layerwatch-token')") == TOKEN
        # Every API request carried the header; no REST URL carries the token.
        assert not any(TOKEN in url for url in probe.requests if "/api/" in url)
        assert unexpected(probe.errors) == []


def test_a_wrong_token_is_told_so_and_asked_again(tmp_path: Path, server_factory, page_factory) -> None:
    with server_factory(tmp_path / "lw.db", args=["--token", TOKEN]) as base, page_factory(base) as probe:
        run_id = start_run(base, "wrong-first")
        page = probe.page
        page.goto("/")
        page.locator("#token-overlay").wait_for(state="visible")
        enter_token(page, "not-the-token")
        message = page.locator("#token-message")
        page.wait_for_function("document.getElementById('token-message').dataset.kind === 'wrong'")
        assert "not accepted" in message.text_content() and "the access token is wrong" in message.text_content()
        assert page.locator("#token-overlay").is_visible()
        assert page.locator(f'tr[data-run-id="{run_id}"]').count() == 0

        enter_token(page, TOKEN)
        page.locator(f'tr[data-run-id="{run_id}"]').wait_for()
        assert page.locator("#token-overlay").is_hidden()

        # A stored token the server no longer takes (it was restarted with another) asks again too.
        page.evaluate("localStorage.setItem('layerwatch-token', 'stale-token')")
        page.reload()
        page.wait_for_function("document.getElementById('token-message').dataset.kind === 'wrong'")
        assert page.locator("#token-overlay").is_visible()
        enter_token(page, TOKEN)
        page.locator(f'tr[data-run-id="{run_id}"]').wait_for()
        assert unexpected(probe.errors) == []


def test_a_project_token_shows_its_project_only(tmp_path: Path, server_factory, page_factory) -> None:
    args = ["--token", TOKEN, "--project-token", "vision=vision-s3cret"]
    with server_factory(tmp_path / "lw.db", args=args) as base, page_factory(base) as probe:
        other = start_run(base, "nlp-run", project="nlp")
        mine = start_run(base, "vision-run", project="vision")
        page = probe.page
        page.goto("/")
        page.locator("#token-overlay").wait_for(state="visible")
        enter_token(page, "vision-s3cret")
        page.locator(f'tr[data-run-id="{mine}"]').wait_for()
        page.wait_for_function("document.getElementById('live-indicator').dataset.state === 'live'")
        # Live: another project's new run never shows; this project's does.
        other_live = start_run(base, "nlp-live", project="nlp")
        mine_live = start_run(base, "vision-live", project="vision")
        page.locator(f'tr[data-run-id="{mine_live}"]').wait_for()
        for hidden in (other, other_live):
            assert page.locator(f'tr[data-run-id="{hidden}"]').count() == 0
        assert page.locator("tr[data-run-id]").count() == 2
        # Another project's run page, reached by its URL, is not found rather than shown.
        answer = page.request.get(f"{base}/api/runs/{other}", headers={"Authorization": "Bearer vision-s3cret"})
        assert answer.status == 404
        # Its own run's page loads whole, the alerts' webhook column included (no 403 anywhere).
        with page.expect_response(lambda r: "/api/webhooks/summary" in r.url) as summary:
            page.locator(f'tr[data-run-id="{mine}"] td.name a').click()
        assert summary.value.status == 200
        page.wait_for_function(f"location.hash.includes({mine!r})")
        assert unexpected(probe.errors) == []
