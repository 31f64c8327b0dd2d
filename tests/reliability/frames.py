"""Synthetic but realistic frames of a training: what the load test and bench/load.py send.

Per step, as `monitor.attach(..., every=1)` would: a `scalars` frame with the
loss and lr, a `signals` frame, and a `layer_stats` frame with a weight, a
grad and an activation row per layer. Values look like a healthy run (the
loss falls, update ratios near 1e-3) so the diagnosis rules do their usual
work, not an alert storm. Built with `client_hook.wire` names only.
"""

from __future__ import annotations

import math
import random
from typing import Any

from client_hook import wire


def model(layers: int) -> dict[str, Any]:
    """The `model` field of run_start: `layers` Linear modules named fc0, fc1, ..."""
    return {"modules": [{"name": f"fc{i}", "type": "Linear", "params": ["weight", "bias"]} for i in range(layers)]}


def run_start_fields(*, name: str, layers: int, time: float) -> dict[str, Any]:
    return {"name": name, "project": "load", "time": time, "model": model(layers), "optimizer": {"type": "SGD"}}


def _stat_row(layer: str, param: str, kind: str, scale: float, rng: random.Random) -> list[Any]:
    std = scale * (1 + 0.05 * rng.random())
    cells = {
        "layer": layer,
        "param": param,
        "kind": kind,
        "mean": 0.01 * rng.uniform(-1, 1),
        "std": std,
        "rms": std,
        "norm": std * 32,
        "min": -3 * std,
        "max": 3 * std,
        "nonfinite": 0,
        "zero_frac": 0.5 if kind == "activation" else 0.0,
        "numel": 1024,
        "update_ratio": 1e-3 * (1 + 0.1 * rng.random()) if kind == "weight" else None,
        "sat_frac": None,
    }
    return [cells[column] for column in wire.LAYER_STAT_COLUMNS]


def step_fields(step: int, *, layers: int, rng: random.Random, time: float) -> list[tuple[str, dict[str, Any]]]:
    """(kind, fields) of the three frames of one step."""
    loss = 2.3 * math.exp(-step / 400) + 0.05 * rng.random()
    rows = []
    for i in range(layers):
        rows.append(_stat_row(f"fc{i}", "weight", "weight", 0.1, rng))
        rows.append(_stat_row(f"fc{i}", "weight", "grad", 0.01, rng))
        rows.append(_stat_row(f"fc{i}", wire.ACTIVATION_PARAM, "activation", 1.0, rng))
    return [
        ("scalars", {"values": {"loss": loss, "lr": 0.1}, "time": time}),
        (
            "signals",
            {
                "training": True,
                "input_mean": 0.0,
                "input_std": 1.0,
                "input_nonfinite": 0,
                "input_fingerprint": f"{rng.getrandbits(64):016x}",
                "output_nonfinite": False,
                "grad_norm": 0.5 + 0.1 * rng.random(),
                "nonfinite_grads": [],
                "grads_stale": False,
            },
        ),
        ("layer_stats", {"rows": rows, "every": 1}),
    ]
