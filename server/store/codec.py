"""Histogram bin counts as one packed blob per row (little-endian uint32): the stored form, both ways."""

from __future__ import annotations

import struct
from collections.abc import Iterable

from client_hook import wire

_UINT32_MAX = 0xFFFFFFFF
_HIST_ROW = struct.Struct(f"<{wire.HIST_BINS}I")


def pack_counts(counts: Iterable[int]) -> bytes:
    """Histogram counts as little-endian uint32 (a count past 2**32 - 1 saturates)."""
    if isinstance(counts, list) and len(counts) == wire.HIST_BINS:
        try:  # the common case in one C call: ~1 us, where the clamping below costs ~10
            return _HIST_ROW.pack(*counts)
        except struct.error:
            pass  # a count past 2**32 - 1
    values = [min(int(c), _UINT32_MAX) for c in counts]
    return struct.pack(f"<{len(values)}I", *values)


def unpack_counts(blob: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(blob) // 4}I", blob))


# ---------------------------------------------------------------- writes
