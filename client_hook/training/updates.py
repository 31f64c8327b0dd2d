"""Every tensor's update-to-weight ratio ||w_after - w_before|| / ||w_before||, on a fixed step schedule.

The sampled layer statistics carry the same ratio, but only on sampled steps,
whose spacing follows the machine's speed. The rules that judge updates
(update_ratio_high/low, weights_not_updating) need readings on the same steps
whatever the machine, so this probe reads them on a fixed schedule of step
numbers: every step of the first DENSE_STEPS (where LR faults show first),
then every EVERY-th step.

Cost, per reading: each trainable tensor is read through a fixed strided
subset of at most ELEMENTS elements (`stats.prime_stride`: it walks every row
and column), as cached views. Before the step one `torch.cat` copies them
(~ELEMENTS * 4 bytes a tensor); after it, one more `cat`, and a
`segment_reduce` gives every tensor's squared delta and weight norm in one
vector: ~10 ops whatever the number of tensors, nothing read back in the
training thread. Measured on this project's 2-core CPU machine (2026-12-04):
~52 us a reading for the 6 tensors of bench's MLP, ~1.1 ms for 150 768x768
matrices (strided reads of big matrices are cache misses), amortised over
EVERY steps after the first ones. The estimate from a subset of ELEMENTS is
within ~10% of the full ratio, far inside the orders of magnitude the rules
judge.

A parameter whose storage moved since the views were cached (`p.data = ...`,
`model.to()` after attach) is seen by its data pointer and the views are
rebuilt; tensors on more than one device (model parallel) are not read.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from client_hook.training.stats import prime_stride

ELEMENTS = 256  # subset elements per tensor
DENSE_STEPS = 50  # every step of the first ones is read ...
EVERY = 10  # ... then every this many steps (a reading costs ~50 us on a small CPU model: ~5 us a step)
DIGITS = 4  # significant digits sent (the rules compare orders of magnitude and exact zeros)


def due(step: int) -> bool:
    """Whether `step` (0-based optimizer step) gets a reading: the same steps on every machine."""
    return step < DENSE_STEPS or step % EVERY == 0


class UpdateProbe:
    """Reads the update ratio of every trainable parameter across one optimizer step."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        """`params`: the model's parameters in model order (`tensors` of run_start); frozen ones are skipped."""
        self._params = params
        self._trainable = [i for i, p in enumerate(params) if p.requires_grad]
        self._ptrs: list[int] = []
        self._views: list[torch.Tensor] = []
        self._lengths: torch.Tensor | None = None
        self._before: torch.Tensor | None = None

    def before_step(self) -> None:
        """Copy the subsets before the optimizer changes them (the step pre-hook)."""
        self._before = None
        if not self._trainable or not self._ready():
            return
        self._before = torch.cat(self._views).float()

    def after_step(self) -> torch.Tensor | None:
        """The ratios of this step as one float vector (trainable tensors, model order), on the tensors'
        device; None when nothing was read before the step. Zero where the step left the subset unchanged,
        inf where the weights were all zero and moved."""
        before, self._before = self._before, None
        if before is None or self._lengths is None:
            return None
        after = torch.cat(self._views).float()
        squares = torch.cat([(after - before).square(), before.square()])
        sums = torch.segment_reduce(squares, "sum", lengths=self._lengths).sqrt()
        delta, base = sums[: len(self._trainable)], sums[len(self._trainable) :]
        ratio = delta / torch.where(base > 0, base, torch.ones_like(base))
        return torch.where(base > 0, ratio, torch.where(delta > 0, math.inf, 0.0))

    def per_tensor(self, values: list[float]) -> list[float | None]:
        """One entry per model tensor (run_start's `tensors`): the ratio to DIGITS digits, None if frozen."""
        out: list[float | None] = [None] * len(self._params)
        for i, value in zip(self._trainable, values):
            out[i] = float(f"{value:.{DIGITS}g}") if math.isfinite(value) else value
        return out

    def _ready(self) -> bool:
        """Whether the cached views still look at the parameters' storage; rebuilt if not."""
        params = [self._params[i] for i in self._trainable]
        ptrs = [p.data_ptr() for p in params]
        if ptrs == self._ptrs:
            return bool(self._views)
        self._ptrs, self._views, self._lengths = ptrs, [], None
        if len({p.device for p in params}) != 1 or not all(p.is_contiguous() for p in params):
            return False  # a view of a non-contiguous tensor would be a copy; several devices: no one cat
        views = []
        for p in params:
            flat = p.detach().reshape(-1)
            views.append(flat[:: prime_stride(tuple(p.shape), ELEMENTS)] if p.numel() > ELEMENTS else flat)
        lengths = [v.numel() for v in views]
        self._views = views
        self._lengths = torch.tensor(lengths + lengths, device=params[0].device)
        return True
