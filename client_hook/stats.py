"""Tensor statistics and histograms: pure functions, tensor in, tensor out.

Everything here runs on the tensor's own device and never copies to the host
(no `.item()`, no Python-side shapes that depend on values), so a whole sample
of many tensors can be stacked and copied to the host once, in
`client_hook.collector`. A summary row is, in this order,

    STAT_FIELDS (wire.py) | lo, hi | HIST_BINS counts

as float64 (counts are exact integers in float64 up to 2**53 elements).
Definitions: mean, std (population), rms, norm (L2), min, max are taken over the
finite elements only; nonfinite counts NaN and ±Inf; zero_frac is the fraction
of elements exactly 0 among all elements; the histogram has HIST_BINS equal bins
from the finite min to the finite max and counts finite elements only (a
constant tensor puts everything in the first bin).
"""

from __future__ import annotations

import torch

from client_hook.wire import HIST_BINS, STAT_FIELDS

ROW_WIDTH = len(STAT_FIELDS) + 2 + HIST_BINS
_HIST_OFFSET = len(STAT_FIELDS) + 2


def empty_summary(device: torch.device | str = "cpu") -> torch.Tensor:
    """The summary row of a tensor with no elements: NaN statistics, zero counts."""
    row = torch.full((ROW_WIDTH,), float("nan"), dtype=torch.float64, device=device)
    row[STAT_FIELDS.index("nonfinite")] = 0
    row[STAT_FIELDS.index("zero_frac")] = 0
    row[STAT_FIELDS.index("numel")] = 0
    row[_HIST_OFFSET:] = 0
    return row


@torch.no_grad()
def summarize(x: torch.Tensor, bins: int = HIST_BINS) -> torch.Tensor:
    """One summary row (statistics, histogram range, histogram counts) for `x`.

    Costs about ten elementwise passes over `x` on its device; nothing is
    synchronised with the host.
    """
    n = x.numel()  # static shape: no device sync
    if n == 0:
        return empty_summary(x.device)
    flat = x.detach().reshape(-1)
    # Statistics in float32 at least (bf16/fp16 sums lose too much); float64 stays.
    flat = flat.float() if flat.dtype not in (torch.float32, torch.float64) else flat
    finite = torch.isfinite(flat)
    n_finite = finite.sum()
    has_finite = n_finite > 0
    count = n_finite.clamp(min=1).to(flat.dtype)
    clean = torch.where(finite, flat, torch.zeros((), dtype=flat.dtype, device=flat.device))

    total = clean.sum()
    sq = (clean * clean).sum()
    mean = total / count
    centered = torch.where(finite, flat - mean, torch.zeros((), dtype=flat.dtype, device=flat.device))
    std = ((centered * centered).sum() / count).sqrt()
    rms = (sq / count).sqrt()
    norm = sq.sqrt()
    inf = torch.tensor(float("inf"), dtype=flat.dtype, device=flat.device)
    lo = torch.where(finite, flat, inf).min()
    hi = torch.where(finite, flat, -inf).max()
    nan = torch.full((), float("nan"), dtype=flat.dtype, device=flat.device)
    mean, std, rms, norm, lo, hi = (torch.where(has_finite, v, nan) for v in (mean, std, rms, norm, lo, hi))
    nonfinite = (n - n_finite).to(flat.dtype)
    zero_frac = (flat == 0).sum().to(flat.dtype) / n

    counts = histogram_counts(clean, finite, lo, hi, bins)
    stats = torch.stack([mean, std, rms, norm, lo, hi, nonfinite, zero_frac, torch.full_like(mean, n), lo, hi])
    return torch.cat([stats.to(torch.float64), counts.to(torch.float64)])


def histogram_counts(
    clean: torch.Tensor, finite: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int = HIST_BINS
) -> torch.Tensor:
    """Counts of the finite elements in `bins` equal bins over [lo, hi], on device.

    `torch.histc` would need lo/hi as Python numbers (a host sync per tensor);
    a scatter-add into a fixed-size vector needs none.
    """
    span = hi - lo
    width = torch.where(span > 0, span, torch.ones_like(span))
    low = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
    index = ((clean - low) / width * bins).floor().clamp_(0, bins - 1).long()
    counts = torch.zeros(bins, dtype=torch.int64, device=clean.device)
    return counts.scatter_add_(0, index, finite.long())


def update_ratio(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """||after - before|| / ||before|| on device (0-d float64).

    A zero `before` (e.g. a bias initialised to 0) gives inf when it moved and 0
    when it did not, rather than NaN.
    """
    delta = (after.detach().float() - before.float()).norm()
    base = before.float().norm()
    ratio = torch.where(base > 0, delta / torch.where(base > 0, base, torch.ones_like(base)), delta * float("inf"))
    ratio = torch.where(delta == 0, torch.zeros_like(ratio), ratio)
    return ratio.to(torch.float64)


def unpack_row(row: list[float]) -> tuple[dict[str, float], float, float, list[int]]:
    """Host side: split one summary row into (stats by name, lo, hi, counts)."""
    stats = dict(zip(STAT_FIELDS, row[: len(STAT_FIELDS)]))
    stats["nonfinite"] = int(stats["nonfinite"])
    stats["numel"] = int(stats["numel"])
    lo, hi = row[len(STAT_FIELDS)], row[len(STAT_FIELDS) + 1]
    counts = [int(c) for c in row[_HIST_OFFSET:]]
    return stats, lo, hi, counts
