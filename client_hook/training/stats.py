"""Tensor statistics and histograms: pure functions, tensor in, tensor out.

Everything here runs on the tensor's own device and never copies to the host
(no `.item()`, no Python-side shapes that depend on values), so a whole sample
of many tensors can be stacked and copied to the host once, in
`client_hook.training.collector`. A summary row is, in this order,

    STAT_FIELDS (wire.py) | lo, hi | HIST_BINS counts

as float64 (counts are exact integers in float64 up to 2**53 elements).
Definitions: mean, std (population), rms, norm (L2), min, max are taken over the
finite elements only; nonfinite counts NaN and ±Inf; zero_frac is the fraction
of elements exactly 0 among all elements; the histogram has HIST_BINS equal bins
from the finite min to the finite max and counts finite elements only (a
constant tensor puts everything in the first bin).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

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

    Costs about ten elementwise passes over `x` on its device plus a
    scatter-add; nothing is synchronised with the host. For many tensors at
    once, `summarize_many` gives the same rows with far fewer ops.
    """
    n = x.numel()  # static shape: no device sync
    if n == 0:
        return empty_summary(x.device)
    flat = _stat_dtype(x.detach().reshape(-1))
    finite = torch.isfinite(flat)  # pass 1
    n_finite = finite.sum()  # pass 2
    has_finite = n_finite > 0
    count = n_finite.clamp(min=1).to(flat.dtype)
    clean = torch.where(finite, flat, torch.zeros((), dtype=flat.dtype, device=flat.device))  # pass 3
    total = clean.sum()  # pass 4
    norm = torch.linalg.vector_norm(clean)  # pass 5: sum of squares, fused
    mean = total / count
    # Non-finite elements replaced by the mean: they then move neither min/max nor std.
    filled = torch.where(finite, flat, mean)  # pass 6
    lo, hi = torch.aminmax(filled)  # pass 7: both ends in one pass
    std = torch.linalg.vector_norm(filled - mean) / count.sqrt()  # passes 8-9
    rms = norm / count.sqrt()
    nan = torch.full((), float("nan"), dtype=flat.dtype, device=flat.device)
    mean, std, rms, norm, lo, hi = (torch.where(has_finite, v, nan) for v in (mean, std, rms, norm, lo, hi))
    nonfinite = (n - n_finite).to(flat.dtype)
    zero_frac = (n - torch.count_nonzero(flat)).to(flat.dtype) / n  # pass 10 (NaN counts as non-zero)

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
    # Halves: hi - lo of +-3e38 overflows float32 to inf (and inf / inf is a NaN index). Divided by the
    # width, not multiplied by bins / width: that is inf for a subnormal width. NaN, if any is left, to bin 0.
    half_span = hi * 0.5 - lo * 0.5
    width = torch.where(half_span > 0, half_span, torch.ones_like(half_span))
    low = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo)) * 0.5
    index = ((clean * 0.5 - low) / width * bins).nan_to_num_(nan=0.0).floor_().clamp_(0, bins - 1).long()
    counts = torch.zeros(bins, dtype=torch.int64, device=clean.device)
    return counts.scatter_add_(0, index, finite.long())


# Tensors up to BATCH_MAX_NUMEL elements are summarized together: padded with NaN
# to the next power of two (at most 2x the elements) and reduced row-wise, so a
# sample of a hundred small tensors costs ~25 ops per size class instead of ~25
# per tensor (each op ~5-10 us of dispatch on CPU, more as a CUDA launch). A
# batch holds at most BATCH_CHUNK_NUMEL elements (16 MB in float64): bounded memory.
BATCH_MAX_NUMEL = 1 << 13  # past ~16K elements one tensor alone is cheaper (measured, CPU)
BATCH_CHUNK_NUMEL = 1 << 21


@torch.no_grad()
def summarize_many(tensors: list[torch.Tensor], bins: int = HIST_BINS) -> torch.Tensor:
    """`summarize` of every tensor, as one [len(tensors), ROW_WIDTH] float64 matrix.

    All tensors must be on one device. The number of ops grows with the number
    of size classes (powers of two), not with the number of tensors; nothing is
    synchronised with the host.
    """
    if not tensors:
        return torch.empty((0, ROW_WIDTH), dtype=torch.float64)
    device = tensors[0].device
    rows: list[torch.Tensor | None] = [None] * len(tensors)
    groups: dict[tuple[int, torch.dtype], list[int]] = {}
    for i, x in enumerate(tensors):
        n = x.numel()  # static shape: no device sync
        if n == 0:
            rows[i] = empty_summary(device)
        elif n > BATCH_MAX_NUMEL:
            rows[i] = summarize(x, bins)
        else:
            width = 1 << (n - 1).bit_length()
            dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            groups.setdefault((width, dtype), []).append(i)
    for (width, _), members in groups.items():
        per_chunk = max(1, BATCH_CHUNK_NUMEL // width)
        for start in range(0, len(members), per_chunk):
            chunk = members[start : start + per_chunk]
            flats = [_stat_dtype(tensors[i].detach().reshape(-1)) for i in chunk]
            # One op builds the padded [k, width] matrix; NaN padding counts as non-finite
            # and is subtracted again in _summarize_rows.
            padded = torch.nn.utils.rnn.pad_sequence(flats, batch_first=True, padding_value=float("nan"))
            if padded.shape[1] < width:
                padded = torch.nn.functional.pad(padded, (0, width - padded.shape[1]), value=float("nan"))
            matrix = _summarize_rows(padded, [f.numel() for f in flats], bins)
            for j, i in enumerate(chunk):
                rows[i] = matrix[j]
    return torch.stack(rows)  # type: ignore[arg-type]


def _stat_dtype(x: torch.Tensor) -> torch.Tensor:
    """Statistics in float32 at least (bf16/fp16 sums lose too much); float64 stays."""
    return x.float() if x.dtype not in (torch.float32, torch.float64) else x


def _summarize_rows(
    matrix: torch.Tensor, numels: list[int], bins: int, numel_of_rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Summary rows of each row of `matrix` [k, L], whose row i holds numels[i] elements then NaN padding.

    Every reduction is along dim 1: about twenty-five passes over the matrix and a
    bincount, whatever k is. Only float arithmetic touches the [k, L] matrix:
    on the CPU, boolean masks and `torch.where`/`isfinite` over it cost 10-50x
    a float op of the same size (measured, torch 2.13, one thread).
    """
    k, width = matrix.shape
    device, dtype = matrix.device, matrix.dtype
    # A host list -> CUDA tensor is a blocking copy: summarize_subsets passes its cached copy.
    numel = torch.tensor(numels, dtype=dtype, device=device) if numel_of_rows is None else numel_of_rows.to(dtype)
    # Three [k, L] buffers, reused in place: on the CPU a fresh buffer of this size is a
    # fresh mmap whose page faults cost more than the arithmetic done in it.
    # bad: 1.0 where an element is NaN/Inf (or padding), 0.0 where finite (x - x is NaN exactly there).
    bad = torch.sub(matrix, matrix).nan_to_num_(nan=1.0)  # passes 1-2
    n_finite = width - bad.sum(dim=1)  # pass 3
    has_finite = n_finite > 0
    count = n_finite.clamp(min=1)
    clean = torch.nan_to_num(matrix, nan=0.0, posinf=0.0, neginf=0.0)  # pass 4
    total = clean.sum(dim=1)  # pass 5
    norm = torch.linalg.vector_norm(clean, dim=1)  # pass 6: sum of squares, fused
    scratch = torch.sign(clean).abs_()  # passes 7-8: 1.0 for each finite non-zero element
    zero_frac = (n_finite - scratch.sum(dim=1)) / numel.clamp(min=1)  # pass 9: finite zeros among all
    mean = total / count
    # Non-finite elements (and padding) replaced by the row mean: they then move
    # neither min/max nor std.
    filled = clean.addcmul_(bad, mean[:, None])  # pass 10
    lo, hi = filled.amin(dim=1), filled.amax(dim=1)  # passes 11-12 (aminmax along a dim is slower)
    std = torch.linalg.vector_norm(torch.sub(filled, mean[:, None], out=scratch), dim=1) / count.sqrt()  # 13-14
    rms = norm / count.sqrt()
    nonfinite = numel - n_finite

    # Histograms: bins equal bins over [lo, hi]; non-finite elements and padding go
    # to one extra bin past the end that is dropped. One bincount over row-offset
    # indices: `torch.histc` would need lo/hi on the host (a sync per tensor).
    # As in histogram_counts: halves (a +-3e38 range overflows), divided by the width (bins / width is
    # inf for a subnormal one: gradients of a loss times 1e-39), and a NaN left by an overflowed row
    # mean to bin 0 rather than to an index of -2**63.
    half_span = hi * 0.5 - lo * 0.5
    width_of_row = torch.where(half_span > 0, half_span, torch.ones_like(half_span))[:, None]
    low = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))[:, None] * 0.5
    index = torch.mul(filled, 0.5, out=scratch).sub_(low).div_(width_of_row).mul_(bins)  # passes 15-18
    index = index.nan_to_num_(nan=0.0).floor_().clamp_(0, bins - 1)  # passes 19-21
    index = torch.maximum(index, bad.mul_(bins), out=scratch)  # passes 22-23: non-finite -> the dropped bin
    index.add_(torch.arange(k, dtype=dtype, device=device)[:, None] * (bins + 1))  # pass 24: row offsets
    # scatter_add_ into a fixed size, not bincount: CUDA's bincount reads the max index on the host (a sync).
    flat_index = index.reshape(-1).long()  # pass 25
    ones = torch.ones((), dtype=torch.int64, device=device).expand(flat_index.numel())
    counts = torch.zeros(k * (bins + 1), dtype=torch.int64, device=device).scatter_add_(0, flat_index, ones)
    counts = counts.reshape(k, bins + 1)  # pass 26
    nan = torch.full((), float("nan"), dtype=dtype, device=device)
    moments = torch.where(has_finite[:, None], torch.stack([mean, std, rms, norm, lo, hi], dim=1), nan)
    stats = torch.cat([moments, torch.stack([nonfinite, zero_frac, numel], dim=1), moments[:, 4:6]], dim=1)
    return torch.cat([stats.to(torch.float64), counts[:, :bins].to(torch.float64)], dim=1)


# A sampled tensor larger than SUBSET_SIZE elements is summarized from a fixed strided
# subset of at most SUBSET_SIZE of them: mean, std and zero fraction are estimated to
# about 1/sqrt(1024) ~ 3% (the rules' thresholds are 50-90% fractions and factors of
# 10), the histogram's shape from ~30 elements per bin; and a sample then costs about the
# same for a 10K- or a 100M-element layer. A full pass per statistic over every weight,
# gradient and activation of a small CNN costs several times its training step on one
# CPU core; at 1024 a sample's fixed op count dominates (measured: 4096 costs ~1.5x).
SUBSET_SIZE = 1 << 10


def subset_stride(shape: tuple[int, ...]) -> int:
    """The stride of the fixed subset of a tensor of `shape` (at most SUBSET_SIZE elements): `prime_stride`."""
    return prime_stride(shape, SUBSET_SIZE)


@functools.lru_cache(maxsize=4096)
def prime_stride(shape: tuple[int, ...], size: int) -> int:
    """The stride of a fixed strided subset of at most `size` elements of a tensor of `shape`: 1 (every
    element) up to `size` elements, else the smallest prime >= numel / size that divides none of the
    dimensions, so the subset walks through every row and column instead of repeating one column (a
    stride of 784 on [256, 784] would; 196 on [64, 1, 28, 28] would read only each image's border)."""
    numel = math.prod(shape)
    if numel <= size:
        return 1
    stride = max(2, -(-numel // size))
    while not _is_prime(stride) or any(d % stride == 0 for d in shape if d > 1):
        stride += 1
    return stride


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def subset(x: torch.Tensor) -> torch.Tensor:
    """A 1-D view of the fixed subset of `x` (`x` itself flattened when it is small); a copy only if
    `x` is not contiguous."""
    flat = x.detach().reshape(-1)
    stride = subset_stride(tuple(x.shape))
    return flat if stride == 1 else flat[::stride]


@torch.no_grad()
def summarize_subsets(
    parts: list[torch.Tensor], numels: list[int], norms: torch.Tensor | None = None, bins: int = HIST_BINS
) -> torch.Tensor:
    """Summary rows of tensors given by their subsets: a [len(parts), ROW_WIDTH] float64 matrix, one op chain.

    `parts[i]` is the 1-D `subset` of a tensor of `numels[i]` elements (the whole
    tensor when it is small: then its row equals `summarize`'s). `norms[i]`, when
    given and not negative (-1: unknown), is that tensor's exact L2 norm (e.g. from one fused
    `_foreach_norm`). For a true subset, mean, std, min, max, zero_frac and the
    histogram (counts of the subset's elements) are estimates; `numel` is the
    tensor's; `norm` and `rms` are exact where `norms` gives them (and the
    tensor is then known to hold no NaN/Inf when its norm is finite, and to be
    all zeros when it is 0), else scaled from the subset; `nonfinite` is the
    subset's count scaled to the tensor.
    All parts share one device; the op count does not grow with their number.
    """
    if not parts:
        return torch.empty((0, ROW_WIDTH), dtype=torch.float64)
    device = parts[0].device
    lengths = [p.numel() for p in parts]
    # One flat vector of every part (cat promotes mixed dtypes), a NaN slot, then one gather
    # into a [k, widest] matrix padded with NaN (padding counts as non-finite and is subtracted
    # in _summarize_rows): 4 ops for any number of parts. Small parts (biases) padded to the
    # widest waste elements, but a second matrix would cost ~35 more ops than they do.
    flat = torch.cat([p.reshape(-1) for p in parts])
    flat = _stat_dtype(flat)
    padded = torch.cat([flat, torch.full((1,), float("nan"), dtype=flat.dtype, device=device)])
    layout = _layout(tuple(lengths), tuple(numels), device)
    matrix = padded.index_select(0, layout.index.reshape(-1)).view(layout.index.shape)  # faster than [index]
    matrix = _summarize_rows(matrix, lengths, bins, layout.lengths)
    if all(n == t for n, t in zip(lengths, numels)):
        return matrix  # every tensor taken whole: the rows are exact
    return _scale_to_tensors(matrix, layout, norms)


class _Layout(NamedTuple):
    """What summarize_subsets needs to know about a list of parts, on their device."""

    index: torch.Tensor  # [k, widest]: positions in the concatenated parts; padding -> the NaN slot past them
    lengths: torch.Tensor  # elements in each part
    numels: torch.Tensor  # elements in each part's whole tensor
    sampled: torch.Tensor  # the part is a true subset
    scale: torch.Tensor  # numels / lengths


@functools.lru_cache(maxsize=16)
def _layout(lengths: tuple[int, ...], numels: tuple[int, ...], device: torch.device) -> _Layout:
    """Built once per model layout and device: every sample of a run has the same parts, and a
    host -> CUDA copy of these small tensors at each sample would be a blocking copy (a sync)."""
    width = max(max(lengths), 1)
    starts = torch.tensor([0, *itertools.accumulate(lengths)][:-1])[:, None]
    columns = torch.arange(width)[None, :]
    index = torch.where(columns < torch.tensor(lengths)[:, None], starts + columns, sum(lengths))
    f64 = torch.float64
    return _Layout(
        index=index.to(device),
        lengths=torch.tensor(lengths, dtype=f64).to(device),
        numels=torch.tensor(numels, dtype=f64).to(device),
        sampled=torch.tensor([n != t for n, t in zip(lengths, numels)]).to(device),
        scale=torch.tensor([t / max(n, 1) for n, t in zip(lengths, numels)], dtype=f64).to(device),
    )


def _scale_to_tensors(matrix: torch.Tensor, layout: _Layout, norms: torch.Tensor | None) -> torch.Tensor:
    """Rows of subsets -> rows of their whole tensors (see `summarize_subsets`); whole rows unchanged."""
    device, numel, scale, sampled = matrix.device, layout.numels, layout.scale, layout.sampled
    unknown = torch.full((len(numel),), -1.0, dtype=torch.float64, device=device)
    exact = unknown if norms is None else norms.to(device=device, dtype=torch.float64)
    known = ~(exact < 0)  # NaN (a NaN element) is known, and not clean
    clean = known & torch.isfinite(exact)  # a finite exact norm: no NaN/Inf anywhere in the tensor
    old = matrix[:, : len(STAT_FIELDS)]
    col = dict(zip(STAT_FIELDS, old.unbind(1)))
    estimate = (col["nonfinite"] * scale).round()
    nonfinite = torch.where(clean, 0.0, torch.where(known, estimate.clamp(min=1), estimate))
    rms = torch.where(clean, exact / numel.sqrt(), col["rms"])
    norm = torch.where(clean, exact, col["rms"] * (numel - nonfinite).clamp(min=1).sqrt())
    zero_frac = torch.where(clean & (exact == 0), 1.0, col["zero_frac"])  # all zeros, exactly
    col.update(rms=rms, norm=norm, nonfinite=nonfinite, zero_frac=zero_frac, numel=numel)
    new = torch.where(sampled[:, None], torch.stack([col[f] for f in STAT_FIELDS], dim=1), old)
    return torch.cat([new, matrix[:, len(STAT_FIELDS) :]], dim=1)


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


@torch.no_grad()
def update_ratios(befores: list[torch.Tensor], afters: list[torch.Tensor]) -> torch.Tensor:
    """`update_ratio` of each (before, after) pair as one float64 vector, with `torch._foreach_*`:
    three multi-tensor ops for any number of tensors instead of ~8 ops each."""
    if not befores:
        return torch.empty(0, dtype=torch.float64)
    befores = [b.float() for b in befores]  # no copy when already float32
    afters = [a.detach().float() for a in afters]
    delta = torch.stack(torch._foreach_norm(torch._foreach_sub(afters, befores)))
    base = torch.stack(torch._foreach_norm(befores))
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
