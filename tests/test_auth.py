"""Access tokens (server/auth.py): REST under /api, /ws/live, the open files, and the start-up warning.

The app runs for real over a temporary SQLite file (TestClient); the websocket
close code a browser sees and the CLI warning are checked against a real
`layerwatch serve` process.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from client_hook import wire
from layerwatch.server import auth
from tests.serving import free_port, serve

TOKEN = "s3cret-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


def ingest(client: TestClient, frames: list[dict[str, Any]]) -> None:
    with client.websocket_connect("/ws/ingest", headers=BEARER) as ws:
        ws.send_text(json.dumps(wire.batch(frames)))
        answer = ws.receive_json()
        while answer["kind"] == "alert":
            answer = ws.receive_json()
        assert answer["kind"] == "ack", answer


@pytest.fixture
def guarded(make_client: Any, run_frames: Any) -> TestClient:
    """A server with a token and one stored run."""
    client = make_client(token=TOKEN)
    ingest(client, run_frames(steps=2))
    return client


def api_requests(client: TestClient) -> list[tuple[str, str]]:
    """(method, concrete path) for every REST operation the app documents under /api, read from the
    app itself, so that a router added later without the token dependency fails here."""
    requests = []
    for path, operations in client.app.openapi()["paths"].items():
        if path.startswith("/api") and path not in auth.OPEN_PATHS:
            concrete = re.sub(r"\{[^}]+\}", "1", path)
            requests += [(method.upper(), concrete) for method in sorted(operations)]
    return requests


def test_every_api_route_wants_the_token(guarded: TestClient) -> None:
    requests = api_requests(guarded)
    assert ("GET", "/api/runs") in requests and any(path.startswith("/api/webhooks") for _, path in requests)
    for method, path in requests:
        response = guarded.request(method, path)
        assert response.status_code == 401, (method, path, response.text)
        assert response.json()["detail"] == auth.TOKEN_REQUIRED
        assert response.headers["www-authenticate"] == "Bearer"


def test_a_wrong_token_is_told_so_and_the_right_one_reads(guarded: TestClient) -> None:
    wrong = guarded.get("/api/runs", headers={"Authorization": "Bearer nope"})
    assert (wrong.status_code, wrong.json()["detail"]) == (401, auth.TOKEN_WRONG)
    assert wrong.headers["www-authenticate"] == "Bearer"
    # The token is compared whole: a prefix of it is wrong too.
    assert guarded.get("/api/runs", headers={"Authorization": f"Bearer {TOKEN[:-1]}"}).status_code == 401
    runs = guarded.get("/api/runs", headers=BEARER)
    assert runs.status_code == 200 and [r["id"] for r in runs.json()] == ["run-1"]
    loss = guarded.get("/api/runs/run-1/scalars", params={"key": "loss"}, headers=BEARER).json()
    assert loss["values"] == [2.0, 1.0]


def test_another_scheme_is_named_and_query_tokens_do_not_open_rest(guarded: TestClient) -> None:
    basic = guarded.get("/api/runs", headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert basic.status_code == 401
    assert "'Basic'" in basic.json()["detail"] and "dXNlcjpwdw" not in basic.json()["detail"]
    # ?token= is for websockets only (browsers cannot set their headers); REST URLs end up in logs.
    assert guarded.get("/api/runs", params={"token": TOKEN}).status_code == 401


def test_health_stays_open_and_says_a_token_is_wanted(guarded: TestClient, client: TestClient) -> None:
    health = guarded.get("/api/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "version": health.json()["version"], "protocol": 1, "auth": "token"}
    assert int(health.headers["content-length"]) == len(health.content)
    # Without a token the body is as it always was, and everything is open.
    assert client.get("/api/health").json()["auth"] is None
    assert client.get("/api/runs").status_code == 200


def test_the_dashboard_files_load_without_a_token(guarded: TestClient) -> None:
    for path in ("/", "/static/app.js", "/static/api.js", "/static/style.css", "/static/plotly.min.js"):
        assert guarded.get(path).status_code == 200, path


def test_live_socket_wants_the_token(guarded: TestClient, run_frames: Any) -> None:
    for url, headers, problem in [
        ("/ws/live", {}, auth.TOKEN_REQUIRED),
        ("/ws/live?token=nope", {}, auth.TOKEN_WRONG),
        ("/ws/live", {"Authorization": "Bearer nope"}, auth.TOKEN_WRONG),
    ]:
        with guarded.websocket_connect(url, headers=headers) as ws:
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_text()
        assert (closed.value.code, closed.value.reason) == (auth.CLOSE_UNAUTHORIZED, problem)
    for url, headers in [(f"/ws/live?token={TOKEN}", {}), ("/ws/live", BEARER)]:
        with guarded.websocket_connect(url, headers=headers) as live:
            ingest(guarded, run_frames(run_id=f"run-{len(url)}", steps=1))
            event = live.receive_json()
        assert event["type"] == "run" and event["run"]["id"] == f"run-{len(url)}"


def test_a_real_browser_style_client_sees_the_close_code(tmp_path: Path) -> None:
    """What a browser gets: the handshake succeeds, then a close with 4401 and the reason."""
    with serve(tmp_path / "lw.db", args=["--token", TOKEN]) as base:
        ws_base = base.replace("http://", "ws://")
        with connect(f"{ws_base}/ws/live?token=wrong") as ws:
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10)
        assert closed.value.rcvd.code == auth.CLOSE_UNAUTHORIZED and closed.value.rcvd.reason == auth.TOKEN_WRONG
        with connect(f"{ws_base}/ws/live?token={TOKEN}") as ws:
            with pytest.raises(TimeoutError):
                ws.recv(timeout=0.3)  # open and quiet: nothing happened yet
        with connect(f"{ws_base}/ws/live?%74oken={TOKEN}&x=1") as ws:  # the key percent-encoded: still the token
            with pytest.raises(TimeoutError):
                ws.recv(timeout=0.3)
        assert httpx.get(f"{base}/api/runs").status_code == 401
        assert httpx.get(f"{base}/api/runs", params={"token": TOKEN}).status_code == 401
        assert httpx.get(f"{base}/api/runs", headers=BEARER).json() == []
        assert httpx.get(f"{base}/api/health").json()["auth"] == "token"
    # uvicorn logs each path with its query; the token is blanked there, the rest kept.
    log = next(tmp_path.glob("server-*.log")).read_text()
    assert '"WebSocket /ws/live?token=***" [accepted]' in log and "GET /api/runs?token=*** HTTP/1.1" in log, log
    assert '"WebSocket /ws/live?%74oken=***&x=1" [accepted]' in log, log  # red team #17 item 10
    assert TOKEN not in log, log


@pytest.mark.parametrize(
    "host, loopback",
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True), ("0.0.0.0", False), ("::", False)],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert auth.is_loopback(host) is loopback


def serve_output(args: list[str], until: str, timeout: float = 30) -> str:
    """Start `python -m server serve ARGS`, read its output until `until` shows (or it exits), stop it."""
    process = subprocess.Popen(
        [sys.executable, "-m", "layerwatch", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = []
    deadline = time.monotonic() + timeout
    try:
        assert process.stdout is not None
        for line in process.stdout:
            seen.append(line)
            if until in line or time.monotonic() > deadline:
                break
    finally:
        process.terminate()
        rest = process.communicate(timeout=15)[0]
    return "".join(seen) + rest


def test_serving_beyond_loopback_without_a_token_warns(tmp_path: Path) -> None:
    port = free_port()
    db = ["--db", f"sqlite:///{tmp_path}/a.db"]
    output = serve_output(["--host", "0.0.0.0", "--port", str(port), *db], until="Uvicorn running")
    assert f"WARNING: listening on 0.0.0.0:{port} (all interfaces) without an access token" in output, output
    assert "--token" in output and "LAYERWATCH_TOKEN" in output
    # With a token, or on loopback, there is nothing to warn about.
    for args in (["--host", "0.0.0.0", "--token", TOKEN], ["--host", "127.0.0.1"]):
        quiet = serve_output([*args, "--port", str(free_port()), *db], until="Uvicorn running")
        assert "Uvicorn running" in quiet and "WARNING: listening" not in quiet, quiet


# ---------------------------------------------------------------- hosts and origins (red team #17 item 1)


def test_hosts_and_origins_are_checked_and_named_when_bad() -> None:
    from layerwatch.server.settings import Settings

    assert Settings().hosts == ["127.0.0.1", "localhost", "::1"]
    assert Settings(host="0.0.0.0").hosts == ["*"]  # any of the machine's names, unless told which
    assert Settings(public_url="https://lw.example.com/").hosts[-1] == "lw.example.com"
    assert Settings(host="0.0.0.0", allowed_hosts=["LW.example.com", "*.corp"]).hosts == ["lw.example.com", "*.corp"]
    assert Settings(allow_origins=["HTTP://Notebook.local:8888/"]).allow_origins == ["http://notebook.local:8888"]
    for bad in ("notebook.local:8888", "ftp://x", "http://x/path", "null"):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            Settings(allow_origins=[bad])
    for bad in ("host:8000", "a.*.b", "", "http://x"):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            Settings(allowed_hosts=[bad])
