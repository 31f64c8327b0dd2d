"""When to take a sample: every N steps, or adaptively within a cost budget.

`every=N` samples steps 0, N, 2N, ... . `every=None` keeps the monitor's own
cost near `overhead` (default 1%) of the training step: it times its sampled
steps against plain ones and spaces samples so that

    cost of one sample / (interval × plain step time) ≈ overhead.

A sample's cost is what the training thread paid for it: the larger of the
time inside the monitor's hooks and the sampled step's wall time beyond a
plain step's (which also catches what the hooks' timers cannot see: slower
forwards with activation hooks on, allocator effects), plus the time the
sender thread spent turning it into frames (it holds the GIL meanwhile, so
training waits for it on a CPU).

The interval stays within [ADAPTIVE_MIN, EVERY_MAX] and starts at EVERY_START
until both times are measured. The first EARLY_STEPS steps are sampled every
EVERY_START steps whatever the budget says (six samples, a one-time cost): most
faults show in a run's first steps (a bad init, a too-high LR, dead units), and
the rules that read samples need a few of them there on any machine, fast or slow.
The first sample's cost is not measured: it carries one-time work (kernel
warm-up, describing the model) that would set the interval far too long. On
CUDA the hook time is the time to *launch* the statistics kernels (they run
asynchronously), so the budget there is a budget on the training thread's time.
"""

from __future__ import annotations

import math
import time
from collections import deque

EVERY_MIN = 1
EVERY_MAX = 1000  # at least one sample per thousand steps, whatever it costs
EVERY_START = 10
EARLY_STEPS = 50  # adaptive: steps 0, 10, ..., 50 are sampled on any machine (see above)
# The adaptive floor: the budget cannot see the server storing the sample, which on a small
# machine running both takes CPU the training could use (measured: CNN, bench/overhead).
ADAPTIVE_MIN = 10
DEFAULT_OVERHEAD = 0.01  # 1% of step time: the "cost nobody notices" target
_SMOOTHING = 0.2  # weight of the newest measurement in the running averages


def choose_every(sample_cost_s: float, step_time_s: float, overhead: float) -> int:
    """The smallest interval whose amortised sample cost is within `overhead` of a step."""
    if step_time_s <= 0 or sample_cost_s <= 0:
        return EVERY_MIN
    return max(EVERY_MIN, min(EVERY_MAX, math.ceil(sample_cost_s / (overhead * step_time_s))))


class Schedule:
    """Decides which steps are sampled; in adaptive mode, measures and re-plans."""

    def __init__(self, every: int | None, overhead: float = DEFAULT_OVERHEAD) -> None:
        self.adaptive = every is None
        self.every = EVERY_START if every is None else every
        self.overhead = overhead
        self.next_step = 0
        self.sample_cost_s: float | None = None  # running average, seconds a sample cost training (_sample_cost)
        self.step_time_s: float | None = None  # running average of an unsampled step's wall time
        self._hook_time = 0.0
        self._background: deque[float] = deque()  # the sender's encoding times (appended from its thread)
        self._last_step_end: float | None = None
        self._samples = 0

    def is_due(self, step: int) -> bool:
        return step >= self.next_step

    def add_hook_time(self, seconds: float) -> None:
        """Time spent in the monitor's hooks during the step in progress."""
        self._hook_time += seconds

    def add_background_time(self, seconds: float) -> None:
        """Time the sender thread spent encoding a sample (thread-safe: a deque append)."""
        self._background.append(seconds)

    def end_step(self, step: int, sampled: bool) -> None:
        """Called once per step, after its optimizer step (or its loss without an optimizer)."""
        now = time.perf_counter()
        if sampled:
            self._samples += 1
            self.next_step = step + self.every
            if self.adaptive and self._samples > 1:  # the first one pays for warm-up
                self.sample_cost_s = _average(self.sample_cost_s, self._sample_cost(now))
        elif self._last_step_end is not None and self.adaptive:
            self.step_time_s = _average(self.step_time_s, now - self._last_step_end)
        self._hook_time = 0.0
        self._last_step_end = now
        if sampled and self.adaptive and self.sample_cost_s is not None and self.step_time_s is not None:
            self.every = max(ADAPTIVE_MIN, choose_every(self.sample_cost_s, self.step_time_s, self.overhead))
            self.next_step = step + self.every
        if sampled and self.adaptive and step < EARLY_STEPS:
            self.next_step = step + min(self.every, EVERY_START)  # the dense start (module docstring)

    def _sample_cost(self, now: float) -> float:
        """What the sampled step ending `now` cost training (see the module docstring)."""
        in_step = self._hook_time
        if self.step_time_s is not None and self._last_step_end is not None:
            in_step = max(in_step, now - self._last_step_end - self.step_time_s)
        encoded = 0.0
        while self._background:  # the samples before this one: encoded since
            encoded += self._background.popleft()
        return in_step + encoded

    @property
    def mode(self) -> str:
        return "adaptive" if self.adaptive else "fixed"


def _average(current: float | None, new: float) -> float:
    return new if current is None else (1 - _SMOOTHING) * current + _SMOOTHING * new


class NoSamples(Schedule):
    """Never samples: a rank > 0 of a distributed training, whose gradients (all-reduced) and weights are
    rank 0's, sends no per-layer statistics; its always-on signals and loss still go every step."""

    def __init__(self) -> None:
        super().__init__(EVERY_MAX)

    def is_due(self, step: int) -> bool:
        return False

    @property
    def mode(self) -> str:
        return "off (rank 0 samples)"
