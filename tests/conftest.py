"""Shared fixtures: a small model description, a complete run's frames, and a server app on a temp SQLite file."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from client_hook import wire
from layerwatch.server.main import create_app
from layerwatch.server.settings import Settings
from tests.postgres import PostgresServer

# Listed out of alphabetical order on purpose: the server must keep the model's (forward) order.
MODEL = {
    "modules": [
        {"name": "encoder", "type": "Linear", "params": ["weight", "bias"]},
        {"name": "act", "type": "ReLU", "params": []},
        {"name": "decoder", "type": "Linear", "params": ["weight", "bias"]},
    ]
}


def stat_row(layer: str, param: str, kind: str, scale: float = 1.0) -> list[Any]:
    """A layer_stats row in wire.LAYER_STAT_COLUMNS order."""
    stats = {
        "mean": 0.1 * scale,
        "std": 0.2 * scale,
        "rms": 0.3 * scale,
        "norm": scale,
        "min": -scale,
        "max": scale,
        "nonfinite": 0,
        "zero_frac": 0.0,
        "numel": 16,
        "update_ratio": 0.001 * scale if kind == "weight" else None,
        "sat_frac": None,
    }
    return [layer, param, kind, *(stats[name] for name in wire.LAYER_STAT_COLUMNS[3:])]


@pytest.fixture
def run_frames() -> Callable[..., list[dict[str, Any]]]:
    """run_frames(run_id, steps=3, end=True): run_start, then per step scalars/layer_stats/histograms, then run_end."""

    def build(
        run_id: str = "run-1",
        steps: int = 3,
        end: bool = True,
        name: str = "demo",
        findings: bool = False,
        project: str = "proj",
    ) -> list[dict[str, Any]]:
        seq = iter(range(10_000))
        frames = [
            wire.frame(
                "run_start",
                run_id=run_id,
                seq=next(seq),
                step=0,
                name=name,
                project=project,
                time=1000.0,
                model=MODEL,
                optimizer={"type": "SGD", "lr": 0.1},
                config=None,
            )
        ]
        for step in range(steps):
            frames.append(
                wire.frame(
                    "scalars",
                    run_id=run_id,
                    seq=next(seq),
                    step=step,
                    values={"loss": 2.0 / (step + 1), "lr": 0.1},
                    time=1000.0 + step,
                )
            )
            rows = [
                stat_row(layer, param, kind, scale=step + 1)
                for layer in ("decoder", "encoder")
                for param in ("bias", "weight")
                for kind in ("grad", "weight")
            ]
            rows.append(stat_row("act", wire.ACTIVATION_PARAM, "activation", scale=step + 1))
            frames.append(wire.frame("layer_stats", run_id=run_id, seq=next(seq), step=step, rows=rows, every=1))
            counts = [step] * wire.HIST_BINS
            frames.append(
                wire.frame(
                    "histograms",
                    run_id=run_id,
                    seq=next(seq),
                    step=step,
                    rows=[["encoder", "weight", "grad", -1.0, 1.0, counts]],
                )
            )
            frames.append(
                wire.frame(
                    "signals",
                    run_id=run_id,
                    seq=next(seq),
                    step=step,
                    training=True,
                    input_mean=0.0,
                    input_std=1.0,
                    input_nonfinite=0,
                    input_fingerprint=f"fp{step}",
                    output_nonfinite=False,
                    grad_norm=1.0 / (step + 1),
                    nonfinite_grads=[],
                    grads_stale=False,
                    # Ten classes: the first loss, 2.0, is near ln 10 (a healthy start, no loss_at_init).
                    target_counts={str(c): 3 + c % 2 for c in range(10)},
                )
            )
        if findings:
            frames.append(
                wire.frame(
                    "findings",
                    run_id=run_id,
                    seq=next(seq),
                    step=0,
                    findings=[
                        {
                            "rule": "loss_at_init",
                            "severity": "warning",
                            "layer": None,
                            "message": "initial loss 9.1 is far from ln(10) = 2.3",
                            "remedy": "check the output layer",
                            "evidence": {"loss": 9.1, "expected": 2.3},
                        }
                    ],
                )
            )
            frames.append(
                wire.frame(
                    "heartbeat", run_id=run_id, seq=next(seq), step=steps - 1, time=1500.0, dropped={"histograms": 2}
                )
            )
        if end:
            frames.append(
                wire.frame("run_end", run_id=run_id, seq=next(seq), step=steps - 1, status="finished", time=2000.0)
            )
        return frames

    return build


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/t.db"


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the whole session (tests/postgres.py)."""
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database on each backend in turn: a module that says `db_url = any_db_url`-style
    (see test_store.py) runs every test on SQLite and on a real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/t.db"
    return request.getfixturevalue("postgres").new_database()


TEST_HOST = "testserver"  # the Host header of starlette's TestClient (its websockets always say it)


@pytest.fixture
def make_client(db_url: str) -> Iterator[Callable[..., TestClient]]:
    """make_client(**settings) -> a TestClient on a fresh app over the test's database."""
    clients: list[TestClient] = []

    def build(**settings: Any) -> TestClient:
        # TestClient's requests say `Host: testserver`: a host this server must be told it is served under.
        # And its webhook receivers listen on 127.0.0.1: an internal address, allowed here (test_webhooks
        # checks the refusal with the default).
        settings = {"allowed_hosts": [TEST_HOST], "webhook_allow_private": True, **settings}
        client = TestClient(create_app(Settings(db_url=db_url, **settings)))
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.close()


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


@pytest.fixture(autouse=True, scope="session")
def spool_in_test_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Monitors closed with their server away keep their frames on disk: in the test's temp dir, not /tmp."""
    import os

    before = os.environ.get("LAYERWATCH_SPOOL_DIR")
    os.environ["LAYERWATCH_SPOOL_DIR"] = str(tmp_path_factory.mktemp("layerwatch-spool"))
    yield
    if before is None:
        os.environ.pop("LAYERWATCH_SPOOL_DIR", None)
    else:
        os.environ["LAYERWATCH_SPOOL_DIR"] = before
