"""Cross-site websocket hijacking and DNS rebinding, from a real Chromium page (red team #17 item 1).

A page served from a second loopback origin (http://127.0.0.2:PORT, as any web
site the user visits would be) opens the server's websockets, which browsers
do not hold to the same-origin policy: before, it read every run from
/ws/live and stored a run through /ws/ingest. The server now refuses a
browser `Origin` that is neither its own nor listed with `--allow-origin`
(listing the page's origin lets it in: the positive control), and a `Host`
it is not served under (a rebound DNS name) gets 400 on every path.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from client_hook import wire
from tests.serving import free_port

PAGE = """<!doctype html><meta charset="utf-8"><title>elsewhere</title><script>
window.results = {};
function probe(name, path, onopen) {
  const ws = new WebSocket(`ws://127.0.0.1:${PORT}${path}`);
  ws.onopen = () => { window.results[name] = "open"; if (onopen) onopen(ws); };
  ws.onmessage = (e) => { window.results[name + "_message"] = e.data; };
  ws.onclose = (e) => { window.results[name + "_closed"] = e.code; };
}
probe("live", "/ws/live");
probe("ingest", "/ws/ingest", (ws) => ws.send(JSON.stringify(BATCH)));
</script>"""


@pytest.fixture
def elsewhere(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An http server on 127.0.0.2 (another origin than 127.0.0.1): (its origin, the folder it serves)."""
    port = free_port()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.2", port), Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.2:{port}", tmp_path
    finally:
        httpd.shutdown()
        httpd.server_close()


def _visit(browser, server: str, origin: str, folder: Path, run_id: str) -> dict:
    """Open the page on `origin`, aimed at `server`; what its websockets did once both closed or opened."""
    start = wire.frame(
        "run_start", run_id=run_id, seq=0, step=0, name=run_id, project="p", time=1.0, model={"modules": []}
    )
    page_text = PAGE.replace("PORT", server.rsplit(":", 1)[1]).replace("BATCH", json.dumps(wire.batch([start])))
    (folder / "page.html").write_text(page_text)
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"{origin}/page.html")
        page.wait_for_function(
            "() => ['live', 'ingest'].every((n) => window.results[n + '_closed'] !== undefined"
            " || window.results[n + '_message'] !== undefined)",
            timeout=15_000,
        )
        return page.evaluate("() => window.results")
    finally:
        context.close()


def test_a_page_of_another_origin_cannot_open_the_websockets(browser, server: str, elsewhere) -> None:
    origin, folder = elsewhere
    results = _visit(browser, server, origin, folder, "hijacked-run")
    assert results.get("live") != "open" and results.get("ingest") != "open", results
    assert "live_message" not in results and "ingest_message" not in results, results
    runs = httpx.get(f"{server}/api/runs").json()
    assert "hijacked-run" not in {run["id"] for run in runs}


def test_an_origin_the_operator_allows_may(browser, server_factory, tmp_path: Path, elsewhere) -> None:
    """The positive control: the same page, its origin listed with --allow-origin, connects and stores."""
    origin, folder = elsewhere
    with server_factory(tmp_path / "allowed.db", args=["--allow-origin", origin]) as allowed:
        results = _visit(browser, allowed, origin, folder, "allowed-run")
        assert results.get("live") == "open" and results.get("ingest") == "open", results
        assert json.loads(results["ingest_message"])["kind"] == "ack", results
        assert "allowed-run" in {run["id"] for run in httpx.get(f"{allowed}/api/runs").json()}


def test_a_rebound_host_name_gets_400_everywhere_and_clients_without_origin_are_unaffected(server: str) -> None:
    port = server.rsplit(":", 1)[1]
    for path in ("/api/runs", "/", "/api/health"):
        refused = httpx.get(f"{server}{path}", headers={"Host": f"evil.example:{port}"})
        assert refused.status_code == 400 and "Invalid host header" in refused.text, (path, refused.status_code)
        assert httpx.get(f"{server}{path}", headers={"Host": f"localhost:{port}"}).status_code == 200
    ws_url = server.replace("http://", "ws://") + "/ws/live"
    with pytest.raises(InvalidStatus) as denied:
        connect(ws_url, additional_headers={"Host": f"evil.example:{port}"}).close()
    assert denied.value.response.status_code == 400
    with pytest.raises(InvalidStatus) as foreign:
        connect(ws_url, origin="http://evil.example").close()
    assert foreign.value.response.status_code == 403
    with connect(ws_url) as ws:  # a training client or script: no Origin at all
        ws.ping().wait(5)
    with connect(ws_url, origin=server) as ws:  # the dashboard's own origin
        ws.ping().wait(5)
