"""Alert webhooks end to end: a real `layerwatch serve --webhook URL` process posting to a real receiver.

Every receiver is a real HTTP server on 127.0.0.1 (`Receiver`) that records
each request and answers with scripted status codes; nothing of the HTTP
client is mocked. Reusable by other test modules (e.g. a diverging-training
test once the diagnosis engine's `loss_diverging` rule lands):

    from tests.test_webhooks import Receiver, serve_with_webhooks, webhook_receiver  # noqa: F401 (fixture)

    def test_x(tmp_path, webhook_receiver):
        with serve_with_webhooks(tmp_path / "x.db", webhook_receiver.url) as base:
            ...  # train with monitor.attach(..., server=base)
        (request,) = webhook_receiver.wait_for(1)
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from client_hook import wire
from tests.serving import free_port, wait_until_up

SECRET = "s3cret-for-tests"


# ---------------------------------------------------------------- a real receiver


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)


class Receiver:
    """An HTTP server on loopback that records every POST and answers from a script.

    `script` is a list of (status, headers) answered in order; after it runs
    out every request gets 200. `port` may be fixed before `start()` so a
    server can be configured with the URL of a receiver that is still down.
    """

    def __init__(self, script: list[tuple[int, dict[str, str]]] | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.script = list(script or [])
        self.requests: list[Request] = []
        self._lock = threading.Condition()
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    receiver.requests.append(Request(self.path, dict(self.headers.items()), body, time.time()))
                    status, headers = receiver.script.pop(0) if receiver.script else (200, {})
                    receiver._lock.notify_all()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass  # quiet test output

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def wait_for(self, n: int, timeout: float = 10) -> list[Request]:
        """The first `n` requests, waiting up to `timeout` s for them; AssertionError if they do not come."""
        with self._lock:
            if not self._lock.wait_for(lambda: len(self.requests) >= n, timeout=timeout):
                raise AssertionError(f"expected {n} webhook requests within {timeout} s, got {len(self.requests)}")
            return list(self.requests[:n])


@pytest.fixture
def webhook_receiver() -> Iterator[Receiver]:
    """A started receiver answering 200 to everything."""
    receiver = Receiver().start()
    yield receiver
    receiver.stop()


@contextlib.contextmanager
def serve_with_webhooks(
    db_path: Path, *webhooks: str, args: tuple[str, ...] = (), secret: str | None = SECRET, port: int | None = None
) -> Iterator[str]:
    """`layerwatch serve --webhook URL ...` as a real process (signing with `secret`); yield its base URL."""
    port = port or free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "layerwatch", "serve", "--port", str(port), "--db", f"sqlite:///{db_path}"]
    command.append("--webhook-allow-private")  # the receivers listen on 127.0.0.1
    for url in webhooks:
        command += ["--webhook", url]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERWATCH_")}
    if secret is not None:
        env["LAYERWATCH_WEBHOOK_SECRET"] = secret
    log_path = db_path.with_name(f"server-{port}.log")
    with open(log_path, "ab") as log:
        process = subprocess.Popen([*command, *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        try:
            wait_until_up(base, process)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; its log:\n{log_path.read_text(errors='replace')}") from None
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def ingest(base: str, frames: list[dict[str, Any]]) -> None:
    """Send one batch over /ws/ingest and wait for its ack (after the commit)."""
    with connect(base.replace("http", "ws") + "/ws/ingest") as ws:
        ws.send(json.dumps(wire.batch(frames)))
        answer = json.loads(ws.recv(timeout=10))
        while answer["kind"] == "alert":  # alerts the batch raised come just before its ack
            answer = json.loads(ws.recv(timeout=10))
        assert answer["kind"] == "ack", answer


def findings_frame(run_id: str, seq: int, step: int, *findings: dict[str, Any]) -> dict[str, Any]:
    return wire.frame("findings", run_id=run_id, seq=seq, step=step, findings=list(findings))


def finding(rule: str = "loss_at_init", severity: str = "warning", layer: str | None = None) -> dict[str, Any]:
    return {"rule": rule, "severity": severity, "layer": layer, "message": f"{rule} fired", "remedy": "fix it"}


def deliveries(base: str, **params: Any) -> list[dict[str, Any]]:
    response = httpx.get(f"{base}/api/webhooks/deliveries", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def wait_until(predicate: Any, timeout: float = 10, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout} s")


def signature(body: bytes, secret: str) -> str:
    """What a receiver computes: the README's verification, written out independently of the server's code."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


# ---------------------------------------------------------------- tests


def test_a_real_alert_is_delivered_once_signed_and_linked(tmp_path: Path, run_frames: Any) -> None:
    receiver = Receiver().start()
    try:
        args = ("--public-url", "https://lw.example.org/")
        with serve_with_webhooks(tmp_path / "a.db", receiver.url, args=args) as base:
            ingest(base, run_frames(findings=True, end=False))
            (request,) = receiver.wait_for(1)

            body = request.json
            assert request.path == "/hook"
            assert request.headers["Content-Type"] == "application/json"
            # Signed over the raw bytes: the right secret verifies, a wrong one does not.
            header = request.headers["X-Layerwatch-Signature"]
            assert hmac.compare_digest(header, signature(request.body, SECRET))
            assert not hmac.compare_digest(header, signature(request.body, "wrong-secret"))
            assert request.headers["Idempotency-Key"] == body["delivery_id"]
            assert {k: body[k] for k in ("rule", "severity", "step", "layer", "run", "run_id", "project")} == {
                "rule": "loss_at_init",
                "severity": "warning",
                "step": 0,
                "layer": None,
                "run": "demo",
                "run_id": "run-1",
                "project": "proj",
            }
            assert body["message"] == "initial loss 9.1 is far from ln(10) = 2.3"
            assert body["remedy"] == "check the output layer"
            assert body["url"] == "https://lw.example.org/#/run/run-1"
            assert body["text"] == (
                "[warning] loss_at_init in run 'demo' at step 0: initial loss 9.1 is far from ln(10) = 2.3 "
                "https://lw.example.org/#/run/run-1"
            )
            assert body["sent_at"].endswith("Z") and body["change"] == "new"

            # Recorded and visible over REST, per alert too.
            (delivery,) = wait_until(lambda: [d for d in deliveries(base, run_id="run-1") if d["status"] != "pending"])
            assert delivery["status"] == "delivered" and delivery["id"] == body["delivery_id"]
            assert [(a["number"], a["status_code"], a["outcome"]) for a in delivery["attempt_log"]] == [
                (1, 200, "delivered")
            ]
            assert delivery["attempt_log"][0]["latency_ms"] >= 0
            assert deliveries(base, alert_id=body["alert_id"]) == [delivery]
            summary = httpx.get(f"{base}/api/webhooks/summary", params={"run_id": "run-1"}).json()
            assert summary == [
                {"alert_id": body["alert_id"], "state": "delivered", "delivered": 1, "pending": 0, "failed": 0}
            ]

            # The same finding again is an update: nothing is sent. A rise to critical is sent again.
            ingest(base, [findings_frame("run-1", 900, 5, finding())])
            time.sleep(1.0)
            assert len(receiver.requests) == 1
            ingest(base, [findings_frame("run-1", 901, 7, finding(severity="critical"))])
            second = receiver.wait_for(2)[1].json
            assert (second["severity"], second["change"], second["step"], second["alert_id"]) == (
                "critical",
                "escalated",
                7,
                body["alert_id"],
            )
            assert second["text"].startswith("[critical] (escalated) loss_at_init in run 'demo' at step 7")

            # A healthy run sends nothing.
            ingest(base, run_frames("healthy", name="healthy"))
            time.sleep(1.0)
            assert len(receiver.requests) == 2
            assert deliveries(base, run_id="healthy") == []
    finally:
        receiver.stop()


def test_a_500_is_retried_and_both_attempts_are_recorded(tmp_path: Path, run_frames: Any) -> None:
    receiver = Receiver(script=[(500, {})]).start()
    try:
        with serve_with_webhooks(tmp_path / "b.db", receiver.url) as base:
            ingest(base, run_frames(findings=True))
            first, second = receiver.wait_for(2)
            # The first retry comes soon (≤ 1 s of backoff), as the same delivery.
            assert second.at - first.at < 2.5
            assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"]
            assert (first.json["attempt"], second.json["attempt"]) == (1, 2)
            (delivery,) = wait_until(lambda: [d for d in deliveries(base) if d["status"] == "delivered"])
            assert [(a["status_code"], a["outcome"]) for a in delivery["attempt_log"]] == [
                (500, "retry"),
                (200, "delivered"),
            ]
            assert "HTTP 500" in delivery["attempt_log"][0]["error"]
    finally:
        receiver.stop()


def test_a_429_waits_as_long_as_retry_after_says(tmp_path: Path, run_frames: Any) -> None:
    receiver = Receiver(script=[(429, {"Retry-After": "2"})]).start()
    try:
        with serve_with_webhooks(tmp_path / "c.db", receiver.url) as base:
            ingest(base, run_frames(findings=True))
            first, second = receiver.wait_for(2, timeout=15)
            assert second.at - first.at >= 1.9  # the backoff alone would be ≤ 1 s
            (delivery,) = wait_until(lambda: [d for d in deliveries(base) if d["status"] == "delivered"])
            assert [a["status_code"] for a in delivery["attempt_log"]] == [429, 200]
    finally:
        receiver.stop()


def test_a_receiver_that_is_down_gets_the_alert_when_it_comes_up(tmp_path: Path, run_frames: Any) -> None:
    receiver = Receiver()  # not started: connection refused
    try:
        with serve_with_webhooks(tmp_path / "d.db", receiver.url) as base:
            ingest(base, run_frames(findings=True))
            (pending,) = wait_until(lambda: [d for d in deliveries(base) if d["attempts"] >= 1])
            assert pending["status"] == "pending" and pending["attempt_log"][0]["status_code"] is None
            assert pending["attempt_log"][0]["error"]
            receiver.start()
            (request,) = receiver.wait_for(1, timeout=15)
            assert request.json["rule"] == "loss_at_init"
            wait_until(lambda: deliveries(base)[0]["status"] == "delivered", what="delivered")
    finally:
        receiver.stop()


def test_a_restart_resumes_pending_deliveries(tmp_path: Path, run_frames: Any) -> None:
    receiver = Receiver()
    db = tmp_path / "e.db"
    try:
        with serve_with_webhooks(db, receiver.url) as base:
            ingest(base, run_frames(findings=True))
            wait_until(lambda: [d for d in deliveries(base) if d["attempts"] >= 1], what="a failed attempt")
        receiver.start()
        time.sleep(0.5)
        assert receiver.requests == []  # nobody sends while the server is down
        with serve_with_webhooks(db, receiver.url) as base:
            (request,) = receiver.wait_for(1, timeout=15)
            (delivery,) = wait_until(lambda: [d for d in deliveries(base) if d["status"] == "delivered"])
            assert delivery["id"] == request.json["delivery_id"]
            assert delivery["attempt_log"][-1]["status_code"] == 200
    finally:
        receiver.stop()


def test_a_bad_webhook_url_stops_start_up_naming_it(tmp_path: Path) -> None:
    for bad in ("ftp://example.org/hook", "http:///no-host", "example.org/hook"):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "layerwatch",
                "serve",
                "--port",
                str(free_port()),
                "--webhook",
                bad,
                "--db",
                f"sqlite:///{tmp_path}/f.db",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode != 0
        assert repr(bad) in result.stderr, result.stderr


def test_webhook_test_command_posts_a_valid_signed_sample(webhook_receiver: Receiver) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERWATCH_")}
    command = [sys.executable, "-m", "layerwatch", "webhook", "test", webhook_receiver.url, "--secret", SECRET]
    command.append("--allow-private")
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, env=env)
    assert result.returncode == 0, result.stderr
    assert "HTTP 200" in result.stdout
    (request,) = webhook_receiver.wait_for(1)
    assert request.headers["X-Layerwatch-Signature"] == signature(request.body, SECRET)
    body = request.json
    assert {
        "rule",
        "severity",
        "step",
        "layer",
        "message",
        "remedy",
        "run",
        "run_id",
        "project",
        "url",
        "text",
        "sent_at",
        "delivery_id",
    } <= set(body)
    assert request.headers["Idempotency-Key"] == body["delivery_id"]


def test_webhook_test_command_fails_when_the_receiver_does(tmp_path: Path) -> None:
    refusing = Receiver(script=[(500, {})]).start()
    try:
        for url in (refusing.url, f"http://127.0.0.1:{free_port()}/nobody", "not-a-url"):
            result = subprocess.run(
                [sys.executable, "-m", "layerwatch", "webhook", "test", url], capture_output=True, text=True, timeout=30
            )
            assert result.returncode != 0 and url in result.stderr, (url, result.stderr)
    finally:
        refusing.stop()


# ---------------------------------------------------------------- SSRF (red team #17 item 9)


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/",
        "http://2130706433/",  # 127.0.0.1 as one integer
        "http://0x7f000001:8080/",
        "http://10.0.0.5/hook",
        "http://[::ffff:127.0.0.1]/",
    ],
)
def test_internal_webhook_addresses_are_refused_by_default(make_client, url: str, tmp_path: Path) -> None:
    from layerwatch.server.settings import Settings

    with pytest.raises(ValueError, match="internal address"):
        Settings(webhooks=[url])
    client = make_client(webhook_allow_private=False)
    answer = client.post("/api/webhooks", json={"url": url})
    assert answer.status_code == 422 and "internal address" in answer.text and "--webhook-allow-private" in answer.text
    refused = subprocess.run(
        [sys.executable, "-m", "layerwatch", "webhook", "test", url], capture_output=True, text=True, timeout=30
    )
    assert refused.returncode == 2 and "internal address" in refused.stderr


def test_a_name_that_resolves_inside_is_refused_at_delivery_and_not_retried(tmp_path: Path) -> None:
    """`localhost` is a name, allowed when added; it resolves to 127.0.0.1 when the alert is delivered: the
    delivery fails for good, the receiver gets nothing, and the internal service's answer is never shown."""
    receiver = Receiver(script=[(500, {})]).start()  # its body ("ok") stands for an internal service's answer
    try:
        inside = receiver.url.replace("127.0.0.1", "localhost")
        result = subprocess.run(
            [sys.executable, "-m", "layerwatch", "webhook", "test", inside], capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 1 and "resolves to an internal address" in result.stderr, result.stderr
        assert receiver.requests == []
        allowed = subprocess.run(
            [sys.executable, "-m", "layerwatch", "webhook", "test", inside, "--allow-private"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert allowed.returncode == 1 and "HTTP 500" in allowed.stderr  # reached, refused by the receiver ...
        assert "ok" not in allowed.stderr.split("HTTP 500")[1]  # ... whose body is not echoed
    finally:
        receiver.stop()


def test_webhook_urls_with_credentials_or_spaces_are_refused() -> None:
    from layerwatch.server.settings import check_webhook_url

    for bad in ("https://user:pw@hooks.example.com/x", "https://hooks.example.com/a b"):
        with pytest.raises(ValueError, match="no user:password@ part and no spaces"):
            check_webhook_url(bad)


def test_logs_show_a_webhooks_host_never_its_path() -> None:
    from layerwatch.server.webhooks.destinations import shown

    assert shown("https://hooks.slack.com/services/T000/B000/XXXX") == "https://hooks.slack.com/…"
    assert shown("http://127.0.0.1:9000/hook?key=s") == "http://127.0.0.1:9000/…"
