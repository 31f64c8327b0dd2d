"""Each benchmark runs with --quick and prints its figures (their values are not asserted: not timed tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("overhead", ["cnn every=1 overhead:", "mlp default (every=None) overhead:", "adaptive interval chosen:"]),
        ("memory", ["RSS growth, server down, every=1 (MLP):", "frames held in memory at the end:", "spool on disk"]),
        ("ingest", ["layer-stat rows/s sustained:", "send->ack per batch:", "bytes stored per layer"]),
        ("queries", ["loss series:", "heatmap (layer x step):", "histogram over time:"]),
        ("latency", ["log -> dashboard latency:"]),
        ("peers", ["layerwatch every step:"]),
        ("load", ["frames/s:", "layer-stat rows/s:", "send->ack per batch:", "runs incomplete or duplicated: 0"]),
    ],
)
def test_benchmark_runs_quick(name: str, expected: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "machine:" in done.stdout
    for line in expected:
        assert line in done.stdout, done.stdout
