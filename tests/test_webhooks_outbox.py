"""Webhook policy in-process: rate limit, no retry on 4xx, giving up, filters, REST, and config validation.

The app runs with its lifespan (so the worker runs) in a TestClient; every
receiver is still a real HTTP server on loopback (`tests.test_webhooks.Receiver`).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from client_hook import wire
from layerwatch.server.main import create_app
from layerwatch.server.settings import Settings
from layerwatch.server.webhooks import outbox, payload, signing
from layerwatch.server.webhooks.sender import Answer, parse_retry_after
from tests.conftest import TEST_HOST
from tests.test_webhooks import Receiver, finding, findings_frame, wait_until


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def app_client(db_url: str, **settings: Any) -> TestClient:
    settings = {"allowed_hosts": [TEST_HOST], "webhook_allow_private": True, **settings}  # receivers on 127.0.0.1
    return TestClient(create_app(Settings(db_url=db_url, **settings)))


def send(client: TestClient, frames: list[dict[str, Any]]) -> None:
    with client.websocket_connect("/ws/ingest") as ws:
        ws.send_text(json.dumps(wire.batch(frames)))
        answer = ws.receive_json()
        while answer["kind"] == "alert":  # alerts the batch raised come just before its ack
            answer = ws.receive_json()
        assert answer["kind"] == "ack", answer


def statuses(client: TestClient) -> list[str]:
    return sorted(d["status"] for d in client.get("/api/webhooks/deliveries").json())


def test_the_rate_limit_defers_rather_than_drops(db_url: str, receiver: Receiver, run_frames: Any) -> None:
    with app_client(db_url, webhooks=[receiver.url], webhook_rate_limit=2, webhook_rate_window_s=2.0) as client:
        rules = [finding(rule=f"rule_{i}") for i in range(3)]
        send(client, [*run_frames(end=False), findings_frame("run-1", 500, 1, *rules)])
        requests = receiver.wait_for(3, timeout=10)
        assert requests[1].at - requests[0].at < 1.5
        assert requests[2].at - requests[0].at >= 1.8  # the third waited for the window
        assert sorted(r.json["rule"] for r in requests) == ["rule_0", "rule_1", "rule_2"]
        wait_until(lambda: statuses(client) == ["delivered"] * 3, what="all delivered")


def test_a_4xx_is_not_retried_and_a_5xx_is_given_up_after_the_bound(db_url: str, run_frames: Any) -> None:
    gone = Receiver(script=[(404, {})]).start()
    broken = Receiver(script=[(503, {})] * 50).start()
    try:
        with app_client(db_url, webhooks=[gone.url, broken.url], webhook_retry_for_s=1.5) as client:
            send(client, run_frames(findings=True))
            wait_until(lambda: statuses(client) == ["failed", "failed"], timeout=10, what="both failed")
            by_url = {d["url"]: d for d in client.get("/api/webhooks/deliveries").json()}
            assert [a["status_code"] for a in by_url[gone.url]["attempt_log"]] == [404]
            assert len(gone.requests) == 1
            attempts = by_url[broken.url]["attempt_log"]
            assert len(attempts) >= 2 and {a["status_code"] for a in attempts} == {503}
            assert "gave up" in by_url[broken.url]["last_error"]
            summary = client.get("/api/webhooks/summary", params={"run_id": "run-1"}).json()
            assert [(s["state"], s["failed"]) for s in summary] == [("failed", 2)]
    finally:
        gone.stop()
        broken.stop()


def test_rest_webhooks_filter_by_project_and_severity_and_never_return_secrets(
    db_url: str, receiver: Receiver, run_frames: Any
) -> None:
    other = Receiver().start()
    try:
        with app_client(db_url) as client:
            made = client.post(
                "/api/webhooks",
                json={"url": receiver.url, "project": "proj", "secret": "per-hook", "min_severity": "info"},
            )
            assert made.status_code == 201, made.text
            assert "secret" not in made.json() and made.json()["signed"] is True
            for body in ({"url": other.url, "project": "another"}, {"url": other.url, "min_severity": "critical"}):
                assert client.post("/api/webhooks", json=body).status_code == 201
            assert "per-hook" not in client.get("/api/webhooks").text

            send(client, [*run_frames(end=False), findings_frame("run-1", 500, 1, finding(severity="info"))])
            (request,) = receiver.wait_for(1)
            assert signing.verify(request.body, "per-hook", request.headers["X-Layerwatch-Signature"])
            assert request.json["severity"] == "info"
            time.sleep(0.5)
            assert other.requests == []  # another project's, and a critical-only one

            hook_id = made.json()["id"]
            assert client.delete(f"/api/webhooks/{hook_id}").status_code == 204
            assert client.delete(f"/api/webhooks/{hook_id}").status_code == 404
    finally:
        other.stop()


def test_configured_webhooks_are_listed_and_not_deletable_over_rest(db_url: str, receiver: Receiver) -> None:
    with app_client(db_url, webhooks=[receiver.url]) as client:
        (hook,) = client.get("/api/webhooks").json()
        assert (hook["url"], hook["source"], hook["min_severity"], hook["signed"]) == (
            receiver.url,
            "config",
            "warning",
            False,
        )
        refused = client.delete(f"/api/webhooks/{hook['id']}")
        assert refused.status_code == 409 and "--webhook" in refused.json()["detail"]


@pytest.mark.parametrize("bad", ["ftp://example.org/x", "http://", "hooks.example.org/x", "http://host:port/x"])
def test_a_bad_webhook_url_is_a_clear_error_in_settings_and_a_422_over_rest(db_url: str, bad: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        Settings(db_url=db_url, webhooks=[bad])
    with app_client(db_url) as client:
        response = client.post("/api/webhooks", json={"url": bad})
        assert response.status_code == 422 and bad in response.text
        assert client.post("/api/webhooks", json={"url": "http://x.org", "min_severity": "loud"}).status_code == 422


def test_retry_schedule_backs_off_with_jitter_and_classifies_answers() -> None:
    delays = [outbox.retry_delay(n, base_s=1.0, max_s=600.0) for n in range(1, 13)]
    assert 0.5 <= delays[0] <= 1.0  # the first retry within a second
    assert all(0.5 * min(600, 2 ** (n - 1)) <= d <= min(600, 2 ** (n - 1)) for n, d in enumerate(delays, start=1))
    assert delays[-1] <= 600
    assert outbox.retryable(Answer(None, 1.0, "refused")) and outbox.retryable(Answer(429, 1.0))
    assert outbox.retryable(Answer(502, 1.0)) and not outbox.retryable(Answer(400, 1.0))
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert parse_retry_after("soon") is None


def test_the_body_is_compact_json_whose_text_is_one_line(tmp_path: Path) -> None:
    alert = payload.snapshot(
        alert_id=1, rule="r", severity="critical", change="new", step=3, first_step=3, count=1, layer="fc1",
        message="two\nlines", remedy="x", evidence={"v": float("nan")}, run="n", run_id="id", project="p",
    )  # fmt: skip
    body = payload.render(alert, delivery_id="d-1", sent_at=0.0, base_url="http://h:1/", attempt=1)
    data = json.loads(body)
    assert data["text"] == "[critical] r in run 'n' (layer fc1) at step 3: two lines http://h:1/#/run/id"
    assert data["evidence"] == {"v": None} and data["sent_at"] == "1970-01-01T00:00:00.000Z"
    assert signing.verify(body, "k", signing.sign(body, "k")) and not signing.verify(body, "k", signing.sign(body, "j"))


def test_an_alert_raised_outside_ingest_is_sent_once_it_commits(
    db_url: str, receiver: Receiver, run_frames: Any
) -> None:
    """What the diagnosis engine does: alerting.raise_alert (the row and its deliveries), then commit."""
    from layerwatch.server import alerting, store

    with app_client(db_url, webhooks=[receiver.url]) as client:
        send(client, run_frames(end=False))
        with client.app.state.sessions() as session:
            found = store.Finding(
                rule="loss_diverging", severity="critical", layer=None, step=2, message="m", remedy="r"
            )
            alert, change = alerting.raise_alert(session, run_id="run-1", finding=found, now=time.time())
            # Already queued by raise_alert: enqueuing again adds nothing (one delivery per webhook).
            assert change == store.ALERT_NEW
            assert outbox.enqueue(session, alert=alert, change=change, now=time.time()) == 0
            session.commit()
        (request,) = receiver.wait_for(1)
        assert (request.json["rule"], request.json["run"], request.json["project"]) == (
            "loss_diverging",
            "demo",
            "proj",
        )
