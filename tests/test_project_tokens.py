"""Project tokens (server/auth.py): a project's token reads and sends that project's runs only.

A real app over the test's database (TestClient) for REST, /ws/ingest and /ws/live;
a real `layerwatch serve` process and a real training for the CLI and env wiring.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect
from torch import nn

from client_hook import monitor, wire
from layerwatch.server import cli
from layerwatch.server.settings import Settings, parse_project_tokens
from tests.serving import serve
from tests.training import train_step

SERVER = "server-secret"
VISION = "vision-secret"
NLP = "nlp-secret"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def send(client: TestClient, token: str, frames: list[dict[str, Any]]) -> tuple[dict[str, Any], int | None]:
    """Send one batch with `token`: (the server's answer past any alerts, the close code if it closed)."""
    with client.websocket_connect("/ws/ingest", headers=bearer(token)) as ws:
        ws.send_text(json.dumps(wire.batch(frames)))
        answer = ws.receive_json()
        while answer["kind"] == "alert":
            answer = ws.receive_json()
        if answer["kind"] == "ack":
            return answer, None
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        return answer, closed.value.code


@pytest.fixture
def split(make_client: Any, run_frames: Any) -> TestClient:
    """A server with a server token and two project tokens; run v1 in project vision, n1 in nlp."""
    client = make_client(token=SERVER, project_tokens={"vision": VISION, "nlp": NLP})
    for run_id, project in (("v1", "vision"), ("n1", "nlp")):
        answer, _ = send(client, SERVER, run_frames(run_id=run_id, steps=2, project=project))
        assert answer["kind"] == "ack", answer
    return client


def run_routes(client: TestClient) -> list[str]:
    """Every GET route of one run the app documents, read from the app (a route added later is covered)."""
    paths = client.app.openapi()["paths"]
    return [path for path, operations in paths.items() if "{run_id}" in path and "get" in operations]


def test_a_project_token_lists_and_reads_its_own_project_only(split: TestClient) -> None:
    listed = split.get("/api/runs", headers=bearer(VISION)).json()
    assert [(r["id"], r["project"]) for r in listed] == [("v1", "vision")]
    assert split.get("/api/runs", params={"project": "nlp"}, headers=bearer(VISION)).json() == []
    assert [r["id"] for r in split.get("/api/runs", params={"project": "vision"}, headers=bearer(VISION)).json()] == [
        "v1"
    ]
    assert sorted(r["id"] for r in split.get("/api/runs", headers=bearer(SERVER)).json()) == ["n1", "v1"]

    routes = run_routes(split)
    assert "/api/runs/{run_id}" in routes and "/api/runs/{run_id}/alerts" in routes
    for route in routes:
        # Another project's run is answered as absent (before any query parameter is looked at).
        other = split.get(route.replace("{run_id}", "n1"), headers=bearer(VISION))
        assert (other.status_code, other.json()["detail"]) == (404, "no run with id 'n1'"), route
        # The same request for its own run, or with the server's token, finds the run.
        for run_id, token in (("v1", VISION), ("n1", SERVER), ("n1", NLP)):
            found = split.get(route.replace("{run_id}", run_id), headers=bearer(token))
            assert found.status_code != 404, (route, run_id, found.text)
    loss = split.get("/api/runs/v1/scalars", params={"key": "loss"}, headers=bearer(VISION)).json()
    assert loss["values"] == [2.0, 1.0]


def test_managing_webhooks_wants_the_server_token(split: TestClient) -> None:
    body = {"url": "http://127.0.0.1:9/hook", "project": "vision"}
    for method, path, kwargs in [
        ("GET", "/api/webhooks", {}),
        ("POST", "/api/webhooks", {"json": body}),
        ("DELETE", "/api/webhooks/1", {}),
        ("GET", "/api/webhooks/deliveries", {}),  # every run's, unless one of its own is named
    ]:
        refused = split.request(method, path, headers=bearer(VISION), **kwargs)
        assert refused.status_code == 403, (method, path, refused.text)
        assert "project 'vision' only" in refused.json()["detail"]
    assert split.get("/api/webhooks", headers=bearer(SERVER)).status_code == 200
    assert split.post("/api/webhooks", json=body, headers=bearer(SERVER)).status_code == 201
    # A wrong token is still a 401, not a 403.
    assert split.get("/api/webhooks", headers=bearer("nope")).status_code == 401


def test_a_project_token_reads_its_own_runs_deliveries(split: TestClient) -> None:
    """The dashboard's webhook column (/summary) and the deliveries of a run, scoped like the runs."""
    for path in ("/api/webhooks/summary", "/api/webhooks/deliveries"):
        own = split.get(path, params={"run_id": "v1"}, headers=bearer(VISION))
        assert (own.status_code, own.json()) == (200, []), path
        other = split.get(path, params={"run_id": "n1"}, headers=bearer(VISION))
        assert (other.status_code, other.json()["detail"]) == (404, "no run with id 'n1'"), path
        assert split.get(path, params={"run_id": "n1"}, headers=bearer(SERVER)).status_code == 200, path


def test_a_project_token_sends_its_own_project_only(split: TestClient, run_frames: Any) -> None:
    answer, _ = send(split, VISION, run_frames(run_id="v2", steps=1, project="vision"))
    assert answer["kind"] == "ack" and answer["seqs"]["v2"]

    # A new run of another project: refused, naming both, and nothing of it stored.
    answer, code = send(split, VISION, run_frames(run_id="n2", steps=1, project="nlp"))
    assert answer["kind"] == "error" and code == 1008
    assert "'vision' only" in answer["error"] and "'n2'" in answer["error"] and "'nlp'" in answer["error"]
    assert split.get("/api/runs/n2", headers=bearer(SERVER)).status_code == 404

    # Frames for another project's stored run, alone or claiming it with a run_start of its own project.
    n1_frames = run_frames(run_id="n1", steps=4, project="vision")
    for frames in (n1_frames[-3:], n1_frames):
        answer, code = send(split, VISION, frames)
        assert answer["kind"] == "error" and code == 1008 and "run 'n1' belongs to project 'nlp'" in answer["error"]
    # A batch mixing an allowed run with a refused one is refused whole.
    mixed = run_frames(run_id="v3", steps=1, project="vision") + n1_frames[-3:]
    answer, code = send(split, VISION, mixed)
    assert answer["kind"] == "error" and code == 1008
    assert split.get("/api/runs/v3", headers=bearer(SERVER)).status_code == 404

    # n1 is as it was: its project, its two steps, its loss.
    n1 = split.get("/api/runs/n1", headers=bearer(SERVER)).json()
    assert (n1["project"], n1["last_step"]) == ("nlp", 1)
    assert split.get("/api/runs/n1/scalars", params={"key": "loss"}, headers=bearer(NLP)).json()["values"] == [
        2.0,
        1.0,
    ]


def test_a_project_dashboard_hears_only_its_project(split: TestClient, run_frames: Any) -> None:
    with (
        split.websocket_connect(f"/ws/live?token={VISION}") as vision,
        split.websocket_connect("/ws/live", headers=bearer(SERVER)) as everything,
    ):
        # nlp's run first: a leak would be the first thing the vision dashboard hears.
        send(split, SERVER, run_frames(run_id="n5", steps=1, project="nlp"))
        send(split, SERVER, run_frames(run_id="v5", steps=1, project="vision"))
        heard = [vision.receive_json() for _ in range(3)]
        assert all((e.get("run_id") or e["run"]["id"]) == "v5" for e in heard), heard
        first = everything.receive_json()
        assert first["type"] == "run" and first["run"]["id"] == "n5"


def test_health_says_a_token_is_wanted_with_project_tokens_only(make_client: Any) -> None:
    client = make_client(project_tokens={"vision": VISION})
    assert client.get("/api/health").json()["auth"] == "token"
    assert client.get("/api/runs").status_code == 401
    assert client.get("/api/runs", headers=bearer(VISION)).json() == []


@pytest.mark.parametrize(
    "tokens, server_token, named",
    [
        ({"a": "same-secret", "b": "same-secret"}, None, "projects 'a' and 'b' have the same token"),
        ({"a": SERVER}, SERVER, "the token of project 'a' is the server's token"),
        ({"": "x-secret"}, None, "non-empty string, but got ''"),
        ({"a": ""}, None, "the token of project 'a' must be a non-empty string"),
    ],
)
def test_bad_project_tokens_are_named_without_the_token(
    tokens: dict[str, str], server_token: str | None, named: str
) -> None:
    with pytest.raises(ValueError) as bad:
        Settings(token=server_token, project_tokens=tokens)
    assert named in str(bad.value)
    assert "same-secret" not in str(bad.value) and SERVER not in str(bad.value)


def test_project_token_entries_are_parsed_and_bad_ones_named() -> None:
    assert parse_project_tokens(["vision=a=b", " nlp = t2 "]) == {"vision": "a=b", "nlp": "t2"}
    for entries, named in [
        (["vision"], "project token 'vision' must be written PROJECT=TOKEN"),
        (["=secret-x"], "project token #1 must be written"),
        (["a=t1", "a=t2"], "project 'a' is given a token twice"),
    ]:
        with pytest.raises(ValueError, match=re.escape(named)) as bad:
            parse_project_tokens(entries)
        assert "secret-x" not in str(bad.value)


def test_serve_refuses_a_bad_project_token_with_its_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--db", "sqlite://", "--project-token", "vision"]) == 2
    assert "project token 'vision' must be written PROJECT=TOKEN" in capsys.readouterr().err


def test_a_real_training_with_its_project_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`layerwatch serve` with project tokens from the flag and the environment; the monitor sends
    with its project's token, and a run claiming another project is refused without harming training."""
    monkeypatch.setenv("LAYERWATCH_PROJECT_TOKENS", f"nlp={NLP}")
    with serve(tmp_path / "lw.db", args=["--project-token", f"vision={VISION}"]) as base:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
        mon = monitor.attach(model, opt, server=base, project="vision", token=VISION, every=1, close_timeout=30)
        for _ in range(3):
            train_step(model, opt, x, y, mon=mon)
        mon.close()
        wrong = monitor.attach(model, opt, server=base, project="nlp", token=VISION, every=1, close_timeout=10)
        losses = [train_step(model, opt, x, y, mon=wrong).item() for _ in range(3)]
        wrong.close()
        assert all(torch.isfinite(torch.tensor(losses)))
        assert wrong.status()["dropped"].get("rejected", 0) > 0

        runs = httpx.get(f"{base}/api/runs", headers=bearer(VISION)).json()
        assert [(r["id"], r["project"], r["last_step"]) for r in runs] == [(mon.run_id, "vision", 2)]
        assert httpx.get(f"{base}/api/runs", headers=bearer(NLP)).json() == []  # the refused run is not stored
        assert httpx.get(f"{base}/api/runs/{mon.run_id}", headers=bearer(NLP)).status_code == 404
        assert httpx.get(f"{base}/api/health").json()["auth"] == "token"


def test_a_project_token_sees_where_its_alerts_went_but_never_the_webhooks_url(split: TestClient) -> None:
    """Red team #17 item 9: a webhook URL (a Slack URL's path is its credential) belongs to the server
    token's holder; a project token reads its runs' deliveries with the URL cut to scheme://host/…."""
    from tests.test_webhooks import finding, findings_frame

    url = "https://hooks.example.com/services/T000/B000/SECRETPATH"
    assert split.post("/api/webhooks", json={"url": url}, headers=bearer(SERVER)).status_code == 201
    answer, _ = send(split, VISION, [findings_frame("v1", 1000, 3, finding(severity="critical"))])
    assert answer["kind"] == "ack", answer
    seen = split.get("/api/webhooks/deliveries", params={"run_id": "v1"}, headers=bearer(VISION)).json()
    assert [d["url"] for d in seen] == ["https://hooks.example.com/…"], seen
    full = split.get("/api/webhooks/deliveries", params={"run_id": "v1"}, headers=bearer(SERVER)).json()
    assert [d["url"] for d in full] == [url]
