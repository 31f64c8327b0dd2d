"""The REST API (on SQLite and PostgreSQL) and the static files: shapes, forward order,
404s and 422s that name the bad value."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import plotly
import pytest
from fastapi.testclient import TestClient

from client_hook import wire
from layerwatch.server.schemas import LayerSeriesPublic
from layerwatch.server.store import HEATMAP_STATS

RUN_FIELDS = {
    "id",
    "name",
    "project",
    "status",
    "created_at",
    "updated_at",
    "finished_at",
    "last_step",
    "last_loss",
    "every",
    "alert_counts",
    "dropped",
}


@pytest.fixture
def db_url(any_db_url: str) -> str:
    return any_db_url  # every test here runs on SQLite and on a real PostgreSQL


@pytest.fixture
def api(client: TestClient, run_frames: Any) -> TestClient:
    with client.websocket_connect("/ws/ingest") as ws:
        ws.send_text(json.dumps(wire.batch(run_frames(steps=3))))
        assert ws.receive_json()["kind"] == "ack"
    return client


def test_health_says_who_answers(client: TestClient) -> None:
    health = client.get("/api/health").json()
    assert health == {"status": "ok", "version": "0.1.0", "protocol": wire.PROTOCOL_VERSION, "auth": None}


def test_runs_is_a_bare_list_of_runs(api: TestClient) -> None:
    runs = api.get("/api/runs").json()
    assert isinstance(runs, list) and len(runs) == 1
    assert set(runs[0]) == RUN_FIELDS
    assert runs[0]["alert_counts"] == {"info": 0, "warning": 0, "critical": 0}
    assert api.get("/api/runs", params={"project": "proj"}).json() == runs
    assert api.get("/api/runs", params={"project": "other"}).json() == []
    assert api.get("/api/runs", params={"name": "demo"}).json() == runs


def test_run_detail_lists_keys_and_series_in_forward_order(api: TestClient) -> None:
    run = api.get("/api/runs/run-1").json()
    assert set(run) == RUN_FIELDS | {"model", "optimizer", "config", "scalar_keys", "series"}
    assert run["model"]["modules"][0]["name"] == "encoder"
    assert run["optimizer"] == {"type": "SGD", "lr": 0.1} and run["config"] is None
    assert run["scalar_keys"] == ["loss", "lr"]
    assert [(s["layer"], s["param"], s["kind"]) for s in run["series"]] == [
        ("encoder", "weight", "weight"), ("encoder", "weight", "grad"),
        ("encoder", "bias", "weight"), ("encoder", "bias", "grad"),
        ("act", "output", "activation"),
        ("decoder", "weight", "weight"), ("decoder", "weight", "grad"),
        ("decoder", "bias", "weight"), ("decoder", "bias", "grad"),
    ]  # fmt: skip


def test_scalars(api: TestClient) -> None:
    assert api.get("/api/runs/run-1/scalars", params={"key": "lr"}).json() == {
        "key": "lr", "steps": [0, 1, 2], "values": [0.1, 0.1, 0.1]
    }  # fmt: skip
    assert api.get("/api/runs/run-1/scalars", params={"key": "nope"}).json() == {
        "key": "nope",
        "steps": [],
        "values": [],
    }
    assert api.get("/api/runs/run-1/scalars").status_code == 422  # key is required


@pytest.mark.parametrize(
    "path",
    [
        "/scalars?key=loss",
        "/heatmap?kind=grad&stat=norm",
        "/layer_stats?layer=encoder&param=weight&kind=grad",
        "/histograms?layer=encoder&param=weight&kind=grad",
    ],
)
def test_the_largest_step_range_a_client_may_ask_for_is_answered(api: TestClient, path: str) -> None:
    """end = 2**63 - 1 (the documented bound) once overflowed the rollup's bucket arithmetic: a 500."""
    response = api.get(f"/api/runs/run-1{path}&start=0&end={2**63 - 1}")
    assert response.status_code == 200, response.text
    assert response.json()["steps"] == [0, 1, 2]


def test_heatmap_rows_follow_the_model_not_the_alphabet(api: TestClient) -> None:
    heat = api.get("/api/runs/run-1/heatmap", params={"kind": "grad", "stat": "norm"}).json()
    assert heat["rows"] == ["encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"]
    assert heat["layers"] == ["encoder", "encoder", "decoder", "decoder"]
    assert heat["params"] == ["weight", "bias", "weight", "bias"]
    assert heat["steps"] == [0, 1, 2] and heat["z"] == [[1.0, 2.0, 3.0]] * 4
    weights = api.get("/api/runs/run-1/heatmap", params={"kind": "weight", "stat": "update_ratio", "param": "weight"})
    assert weights.json()["rows"] == ["encoder.weight", "decoder.weight"]
    acts = api.get("/api/runs/run-1/heatmap", params={"kind": "activation", "stat": "numel"}).json()
    assert acts["rows"] == ["act"] and acts["z"] == [[16, 16, 16]]


def test_layer_stats_has_every_statistic(api: TestClient) -> None:
    params = {"layer": "encoder", "param": "weight", "kind": "weight"}
    series = api.get("/api/runs/run-1/layer_stats", params=params).json()
    assert set(series) == {"layer", "param", "kind", "steps", *HEATMAP_STATS}
    assert set(LayerSeriesPublic.model_fields) == set(series)
    assert series["steps"] == [0, 1, 2] and series["norm"] == [1.0, 2.0, 3.0] and series["numel"] == [16] * 3
    assert series["update_ratio"] == [0.001, 0.002, 0.003]
    grads = api.get("/api/runs/run-1/layer_stats", params={**params, "kind": "grad"}).json()
    assert grads["update_ratio"] == [None] * 3


def test_histograms(api: TestClient) -> None:
    params = {"layer": "encoder", "param": "weight", "kind": "grad"}
    hist = api.get("/api/runs/run-1/histograms", params=params).json()
    assert hist["bins"] == wire.HIST_BINS and hist["steps"] == [0, 1, 2]
    assert hist["lo"] == [-1.0] * 3 and hist["hi"] == [1.0] * 3 and len(hist["counts"][2]) == wire.HIST_BINS


def test_alerts_is_an_empty_list_for_now(api: TestClient) -> None:
    assert api.get("/api/runs/run-1/alerts").json() == []


@pytest.mark.parametrize(
    "path",
    ["", "/scalars?key=loss", "/heatmap", "/layer_stats?layer=a&param=b&kind=grad",
     "/histograms?layer=a&param=b&kind=grad", "/alerts"],
)  # fmt: skip
def test_unknown_run_is_a_404_naming_the_id(api: TestClient, path: str) -> None:
    answer = api.get(f"/api/runs/no-such-run{path}")
    assert answer.status_code == 404
    assert answer.json() == {"detail": "no run with id 'no-such-run'"}


@pytest.mark.parametrize(
    ("query", "bad", "allowed"), [("stat=bogus", "bogus", "update_ratio"), ("kind=weights", "weights", "activation")]
)
def test_bad_heatmap_choice_is_a_422_naming_value_and_choices(
    api: TestClient, query: str, bad: str, allowed: str
) -> None:
    answer = api.get(f"/api/runs/run-1/heatmap?{query}")
    assert answer.status_code == 422
    assert bad in answer.text and allowed in answer.text


def test_plotly_is_served_from_the_python_package(client: TestClient) -> None:
    answer = client.get("/static/plotly.min.js")
    assert answer.status_code == 200
    assert answer.content == (Path(plotly.__file__).parent / "package_data" / "plotly.min.js").read_bytes()


def test_dashboard_and_docs_are_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/static/plotly.min.js" in page.text
    assert client.get("/docs").status_code == 200
    assert client.get("/static/..%2Fpyproject.toml").status_code == 404
    assert client.get("/static/nothing-here.js").status_code == 404
