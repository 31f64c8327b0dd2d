"""Sampling schedules: fixed every N, and the adaptive cost budget of every=None."""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.nn import functional as F

from client_hook import monitor
from client_hook.training.sampling import EARLY_STEPS, EVERY_MAX, EVERY_MIN, EVERY_START, Schedule, choose_every
from tests.test_monitor import NOWHERE, frames


def test_choose_every_keeps_the_amortised_cost_within_budget() -> None:
    # A sample costing 5 ms on 10 ms steps at a 1% budget: one sample per 50 steps.
    assert choose_every(0.005, 0.010, 0.01) == 50
    assert choose_every(0.0051, 0.010, 0.01) == 51  # rounds up: never over budget
    assert choose_every(1e-6, 1.0, 0.01) == EVERY_MIN
    assert choose_every(10.0, 1e-4, 0.01) == EVERY_MAX
    assert choose_every(0.0, 0.01, 0.01) == EVERY_MIN


def test_fixed_schedule_samples_multiples_of_every() -> None:
    schedule = Schedule(every=3)
    sampled = []
    for step in range(10):
        due = schedule.is_due(step)
        sampled += [step] if due else []
        schedule.end_step(step, due)
    assert sampled == [0, 3, 6, 9] and schedule.mode == "fixed"


def test_adaptive_schedule_follows_measured_costs() -> None:
    schedule = Schedule(every=None, overhead=0.01)
    assert schedule.mode == "adaptive" and schedule.every == EVERY_START
    sampled = []
    for step in range(200):
        due = schedule.is_due(step)
        if due:
            sampled.append(step)
            schedule.add_hook_time(0.002)  # each sample costs 2 ms of hook time
        time.sleep(0.001)  # ~1 ms steps: 2 ms / (1% of ~1 ms) -> an interval near 200
        schedule.end_step(step, due)
    # The first EARLY_STEPS steps are sampled densely on any machine, then the budget rules.
    assert sampled[: EARLY_STEPS // EVERY_START + 1] == list(range(0, EARLY_STEPS + 1, EVERY_START))
    assert schedule.every > 50 and len(sampled) <= EARLY_STEPS // EVERY_START + 2


def test_a_samples_cost_counts_its_steps_wall_time_and_the_senders_encoding() -> None:
    """Hook timers miss part of what a sample costs training: the sampled step's wall time beyond a
    plain step's counts, and so does the sender thread's encoding (it holds the GIL)."""

    def adapt(extra_wall_s: float, encoding_s: float) -> tuple[float, int]:
        schedule = Schedule(every=None, overhead=0.01)
        for step in range(2 * EVERY_START + 1):
            due = schedule.is_due(step)
            time.sleep(0.001)  # ~1 ms steps
            if due:
                schedule.add_hook_time(0.0001)  # what the hooks' timers saw: 0.1 ms
                time.sleep(extra_wall_s)  # what they did not see
            schedule.end_step(step, due)
            if due and encoding_s:
                schedule.add_background_time(encoding_s)  # the sender thread, after the step handed it over
        assert schedule.sample_cost_s is not None and schedule.step_time_s is not None
        # A sleep(0.001) step lasts longer than 1 ms on a loaded machine: the interval is judged
        # against the plain step time this run measured, not against the nominal 1 ms.
        expected_every = 0.005 / (0.01 * schedule.step_time_s)
        return schedule.sample_cost_s, schedule.every / expected_every

    hooks_only, _ = adapt(0.0, 0.0)
    slow_step, slow_ratio = adapt(0.005, 0.0)
    encoded, encoded_ratio = adapt(0.0, 0.005)
    assert hooks_only < 0.002
    # 5 ms unseen by the hooks, counted: the interval is 5 ms / (1% of a plain step) (~500 at 1 ms steps).
    assert slow_step > 0.004 and 0.75 < slow_ratio < 1.5
    # Same band as above: the interval follows the step time as it was when it was last set, which a
    # loaded CI box moves by ~20% (0.82 seen); not counting the encoding would give a ratio of ~0.02.
    assert 0.005 <= encoded < 0.007 and 0.75 < encoded_ratio < 1.5


def test_every_none_on_a_real_training_spends_little_and_says_so() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = monitor.attach(model, opt, server=NOWHERE, close_timeout=0.1)  # every=None: adaptive
    x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
    for _ in range(300):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.log(loss=loss)
    sampled = frames(mon, "layer_stats")
    assert sampled[0]["step"] == 0 and sampled[1]["step"] == EVERY_START
    # Statistics of ~20 tensors cost far more than 1% of this tiny step: samples thin out.
    assert mon.every > EVERY_START and len(sampled) < 300 // EVERY_START
    assert sampled[-1]["every"] == mon.every  # each sample says the interval chosen after it
    start = frames(mon, "run_start")[0]
    assert start["config"]["every_mode"] == "adaptive" and start["config"]["overhead_budget"] == 0.01
    assert mon.status()["every_mode"] == "adaptive"
    mon.close()
