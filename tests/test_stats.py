"""client_hook.training.stats against a brute-force reference in plain Python/numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from client_hook.training import stats
from client_hook.wire import HIST_BINS, STAT_FIELDS


def reference(values: np.ndarray) -> tuple[dict[str, float], list[int]]:
    """Statistics and histogram counts by their definitions, element by element."""
    flat = [float(v) for v in values.reshape(-1)]
    finite = [v for v in flat if math.isfinite(v)]
    n, k = len(flat), len(finite)
    out: dict[str, float] = {"numel": n, "nonfinite": n - k, "zero_frac": sum(v == 0 for v in flat) / n}
    if k:
        mean = sum(finite) / k
        out.update(
            mean=mean,
            std=math.sqrt(sum((v - mean) ** 2 for v in finite) / k),
            rms=math.sqrt(sum(v * v for v in finite) / k),
            norm=math.sqrt(sum(v * v for v in finite)),
            min=min(finite),
            max=max(finite),
        )
        lo, hi = min(finite), max(finite)
        counts = [0] * HIST_BINS
        for v in finite:
            b = 0 if hi == lo else min(int((v - lo) / (hi - lo) * HIST_BINS), HIST_BINS - 1)
            counts[b] += 1
    else:
        out.update({f: float("nan") for f in ("mean", "std", "rms", "norm", "min", "max")})
        counts = [0] * HIST_BINS
    return out, counts


def check(tensor: torch.Tensor) -> None:
    row = stats.summarize(tensor).tolist()
    got, lo, hi, counts = stats.unpack_row(row)
    want, want_counts = reference(tensor.double().numpy())
    for field in STAT_FIELDS:
        if math.isnan(want[field]):
            assert math.isnan(got[field]), field
        else:
            assert got[field] == pytest.approx(want[field], rel=1e-5, abs=1e-6), field
    assert (lo, hi) == (pytest.approx(got["min"], nan_ok=True), pytest.approx(got["max"], nan_ok=True))
    assert sum(counts) == tensor.numel() - want["nonfinite"]
    # Bin edges computed in float32 on the device may move an element sitting on an
    # edge to the neighbouring bin; allow that, nothing more.
    assert sum(abs(a - b) for a, b in zip(counts, want_counts)) <= 2 * max(1, tensor.numel() // 1000)


@pytest.mark.parametrize("shape", [(1,), (7,), (32, 17), (4, 3, 5, 5)])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_tensors(shape: tuple[int, ...], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    check(torch.randn(shape, generator=g) * (seed + 1) * 3 + seed)


def test_nan_and_inf_are_counted_not_averaged() -> None:
    t = torch.tensor([1.0, float("nan"), 3.0, float("inf"), -float("inf"), 0.0])
    check(t)
    got, *_ = stats.unpack_row(stats.summarize(t).tolist())
    assert got["nonfinite"] == 3 and got["mean"] == pytest.approx(4 / 3)


def test_all_nonfinite_gives_nan_stats() -> None:
    check(torch.tensor([float("nan"), float("inf")]))


def test_zero_and_constant_tensors() -> None:
    check(torch.zeros(10))
    check(torch.full((5, 5), 2.5))
    got, lo, hi, counts = stats.unpack_row(stats.summarize(torch.zeros(10)).tolist())
    assert got["zero_frac"] == 1.0 and counts[0] == 10


def test_empty_tensor() -> None:
    got, lo, hi, counts = stats.unpack_row(stats.summarize(torch.empty(0, 3)).tolist())
    assert got["numel"] == 0 and got["nonfinite"] == 0 and math.isnan(got["mean"]) and sum(counts) == 0


def test_half_precision_is_upcast() -> None:
    t = torch.randn(100, generator=torch.Generator().manual_seed(3))
    a = stats.unpack_row(stats.summarize(t.half()).tolist())[0]
    b = stats.unpack_row(stats.summarize(t.half().float()).tolist())[0]
    assert a == b


def test_update_ratio() -> None:
    before = torch.tensor([3.0, 4.0])
    assert stats.update_ratio(before, torch.tensor([3.0, 4.5])).item() == pytest.approx(0.5 / 5)
    assert stats.update_ratio(before, before.clone()).item() == 0.0
    assert stats.update_ratio(torch.zeros(2), torch.zeros(2)).item() == 0.0
    assert stats.update_ratio(torch.zeros(2), torch.ones(2)).item() == float("inf")


def test_summarize_many_matches_the_reference_row_by_row() -> None:
    g = torch.Generator().manual_seed(5)
    tensors = [
        torch.randn(4, 3, 5, 5, generator=g) * 2 + 1,
        torch.randn(7, generator=g),
        torch.tensor([1.0, float("nan"), 3.0, float("inf"), -float("inf"), 0.0]),
        torch.tensor([float("nan"), float("inf")]),
        torch.empty(0, 3),
        torch.zeros(10),
        torch.full((5, 5), 2.5),
        torch.randn(100, generator=g).half(),
        torch.randn(33, generator=g, dtype=torch.float64),
        torch.randn(stats.BATCH_MAX_NUMEL + 1, generator=g),  # too big to batch: summarized alone
        torch.randn(1, generator=g),
    ]
    matrix = stats.summarize_many(tensors)
    assert matrix.shape == (len(tensors), stats.ROW_WIDTH) and matrix.dtype == torch.float64
    for tensor, row in zip(tensors, matrix):
        got, lo, hi, counts = stats.unpack_row(row.tolist())
        if tensor.numel() == 0:
            assert got["numel"] == 0 and got["nonfinite"] == 0 and math.isnan(got["mean"]) and sum(counts) == 0
            continue
        want, want_counts = reference(tensor.double().numpy())
        for field in STAT_FIELDS:
            if math.isnan(want[field]):
                assert math.isnan(got[field]), field
            else:
                assert got[field] == pytest.approx(want[field], rel=1e-5, abs=1e-6), field
        assert sum(counts) == tensor.numel() - want["nonfinite"]
        assert sum(abs(a - b) for a, b in zip(counts, want_counts)) <= 2 * max(1, tensor.numel() // 1000)


def test_summarize_many_chunks_and_empty_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stats, "BATCH_CHUNK_NUMEL", 64)  # forces several chunks per size class
    tensors = [torch.randn(30, generator=torch.Generator().manual_seed(i)) for i in range(9)]
    assert torch.allclose(stats.summarize_many(tensors), torch.stack([stats.summarize(t) for t in tensors]))
    assert stats.summarize_many([]).shape == (0, stats.ROW_WIDTH)


def test_update_ratios_match_update_ratio() -> None:
    befores = [torch.tensor([3.0, 4.0]), torch.zeros(2), torch.zeros(2), torch.tensor([3.0, 4.0])]
    afters = [torch.tensor([3.0, 4.5]), torch.zeros(2), torch.ones(2), torch.tensor([3.0, 4.0])]
    got = stats.update_ratios(befores, afters).tolist()
    want = [stats.update_ratio(b, a).item() for b, a in zip(befores, afters)]
    assert got == pytest.approx(want)


def test_summarize_subsets_whole_parts_equal_summarize_and_big_ones_are_estimated() -> None:
    g = torch.Generator().manual_seed(3)
    big = torch.randn(300, 301, generator=g) * 2 + 1  # 90300 elements: a strided subset of <= SUBSET_SIZE
    big_nan = torch.randn(200, 777, generator=g)
    big_nan[17, 3] = float("nan")  # one NaN that the subset may miss; the exact norm does not
    small = [torch.randn(7, generator=g), torch.empty(0), torch.tensor([1.0, float("nan"), 0.0])]
    tensors = [big, *small, big_nan, torch.zeros(500, 500)]
    parts = [stats.subset(t) for t in tensors]
    assert all(p.numel() <= stats.SUBSET_SIZE for p in parts) and parts[2].numel() == 0
    norms = torch.stack([t.double().norm() if t.numel() else torch.tensor(-1.0, dtype=torch.float64) for t in tensors])
    rows = [stats.unpack_row(r) for r in stats.summarize_subsets(parts, [t.numel() for t in tensors], norms).tolist()]
    for tensor, (got, _, _, _) in zip(small, rows[1:4]):  # whole parts: exactly summarize's rows
        want = stats.unpack_row(stats.summarize(tensor).tolist())[0]
        assert got == pytest.approx(want, nan_ok=True)
    got = rows[0][0]
    assert got["numel"] == big.numel() and got["nonfinite"] == 0
    assert got["norm"] == pytest.approx(big.double().norm().item(), rel=1e-6)  # exact, not estimated
    assert got["mean"] == pytest.approx(1.0, abs=0.2) and got["std"] == pytest.approx(2.0, rel=0.1)
    assert sum(rows[0][3]) == parts[0].numel()  # the histogram counts the subset
    assert rows[4][0]["nonfinite"] >= 1  # known from the exact norm even where the subset holds no NaN
    assert rows[5][0]["zero_frac"] == 1.0 and rows[5][0]["norm"] == 0.0


def test_subset_stride_walks_every_column() -> None:
    stride = stats.subset_stride((256, 784))
    assert 784 % stride and 256 % stride  # no dimension is a multiple: no column repeated alone
    columns = {i % 784 for i in range(0, 256 * 784, stride)}
    assert len(columns) > 700


# ---------------------------------------------------------------- fuzzed: never an exception, never a wrong count

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SPECIAL = [0.0, float("nan"), float("inf"), float("-inf"), 1e-45, -1e-45, 1e-39, 3e38, -3e38, 65504.0, 1e-7]


@st.composite
def hostile_tensors(draw) -> torch.Tensor:
    """Tensors of any float dtype whose values span subnormal to the dtype's largest, with NaN/Inf patterns:
    what a loss times 1e-39, an overflow, or a half-precision model puts in weights and gradients."""
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(1, 3000))
    scale = draw(st.sampled_from([1e-42, 1e-39, 1e-20, 1e-3, 1.0, 1e3, 6e4, 1e20, 3e38]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    values = torch.randn(n, generator=g, dtype=torch.float64) * scale
    specials = draw(st.lists(st.tuples(st.integers(0, n - 1), st.sampled_from(SPECIAL)), max_size=20))
    for i, v in specials:
        values[i] = v
    if draw(st.booleans()):
        values[:] = values[0]  # constant, possibly non-finite
    return values.to(dtype)  # out-of-range values of a narrow dtype become inf, tiny ones 0: as in training


def _finite_count(x: torch.Tensor) -> int:
    return int(torch.isfinite(x).sum())


@settings(max_examples=300, deadline=None)
@given(hostile_tensors())
def test_summarize_never_raises_and_counts_every_finite_element(x: torch.Tensor) -> None:
    got, lo, hi, counts = stats.unpack_row(stats.summarize(x).tolist())
    assert got["numel"] == x.numel() and got["nonfinite"] == x.numel() - _finite_count(x)
    assert sum(counts) == _finite_count(x) and all(c >= 0 for c in counts)


@settings(max_examples=200, deadline=None)
@given(st.lists(hostile_tensors(), min_size=1, max_size=6))
def test_batched_summaries_never_raise_and_count_every_finite_element(tensors: list[torch.Tensor]) -> None:
    """The batched paths (summarize_many, and summarize_subsets over each tensor's subset as a sample reads it)."""
    same = [t.float() for t in tensors]  # one matrix per call: the collector groups by device, rows in float32
    for (got, _, _, counts), x in zip(map(stats.unpack_row, stats.summarize_many(same).tolist()), same):
        assert got["nonfinite"] == x.numel() - _finite_count(x) and sum(counts) == _finite_count(x)
    parts = [stats.subset(x) for x in same]
    rows = stats.summarize_subsets(parts, [x.numel() for x in same]).tolist()
    for (_, _, _, counts), part in zip(map(stats.unpack_row, rows), parts):
        assert sum(counts) == _finite_count(part) and all(c >= 0 for c in counts)
