"""Quiet on healthy runs: well-configured trainings raise no warning or critical alert at all.

Every training of `healthy_models.HEALTHY` runs through the real client and
server with every rule on, for three seeds with the adaptive sampling
(`every=None`, the default) and once with every step sampled (`every=1`,
150 steps: dense sampling costs more per step and 150 steps are enough for
the per-layer rules to see every phase of the run).
A false alarm here is a bug in the rule that raised it, not in the training.
"""

from __future__ import annotations

import pytest
import torch

from tests.faults.conftest import alarms, describe
from tests.faults.healthy_models import HEALTHY

CASES = [(name, seed, None) for name in HEALTHY for seed in (0, 1, 2)] + [(name, 0, 1) for name in HEALTHY]
EVERY_1_STEPS = 150


@pytest.mark.parametrize(("name", "seed", "every"), CASES, ids=[f"{n}-seed{s}-every{e}" for n, s, e in CASES])
def test_healthy_training_raises_no_alarm(train_and_diagnose, name: str, seed: int, every: int | None) -> None:
    torch.set_num_threads(1)  # the suite runs many small trainings; threads only add overhead here
    t = HEALTHY[name](seed) if every is None else HEALTHY[name](seed, steps=EVERY_1_STEPS)
    alerts = train_and_diagnose(t.train, t.model, t.optimizer, every=every, run=f"healthy-{name}-{seed}-{every}")
    assert alarms(alerts) == [], describe(alarms(alerts))
