"""Reads a layerwatch SQLite database directly, bypassing the server: what was really committed."""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path


def _query(db_path: Path, sql: str, *args: object) -> list[tuple]:
    # Read-only URI: the test can never change what it is checking. WAL readers see the
    # last committed transaction, also while a server is writing.
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
        return db.execute(sql, args).fetchall()


def received_seqs(db_path: Path, run_id: str) -> list[int]:
    """The idempotency ledger's seqs for one run, ascending (duplicates would show twice)."""
    return [seq for (seq,) in _query(db_path, "SELECT seq FROM received_frames WHERE run_id = ? ORDER BY seq", run_id)]


def ledger_gaps(seqs: list[int]) -> tuple[list[int], list[int]]:
    """(missing, duplicated) seqs of a ledger that should hold 0..max exactly once."""
    counts = Counter(seqs)
    top = max(seqs, default=-1)
    return [s for s in range(top + 1) if s not in counts], sorted(s for s, n in counts.items() if n > 1)


def frames_of_other_runs(db_path: Path, run_id: str) -> int:
    """Ledger rows of any run but `run_id`, in one query (a live writer cannot slip in between counts)."""
    return _query(db_path, "SELECT COUNT(*) FROM received_frames WHERE run_id != ?", run_id)[0][0]


def run_status(db_path: Path, run_id: str) -> str | None:
    rows = _query(db_path, "SELECT status FROM runs WHERE id = ?", run_id)
    return rows[0][0] if rows else None


def run_ids(db_path: Path) -> set[str]:
    return {run_id for (run_id,) in _query(db_path, "SELECT id FROM runs")}


def scalar_steps(db_path: Path, run_id: str, key: str) -> list[int]:
    return [
        s
        for (s,) in _query(db_path, "SELECT step FROM scalars WHERE run_id = ? AND key = ? ORDER BY step", run_id, key)
    ]


def rows_per_step(db_path: Path, table: str, run_id: str) -> dict[int, int]:
    """step -> stored rows of `table` (layer_stats, histograms) for one run."""
    assert table in ("layer_stats", "histograms", "step_signals"), table  # never interpolate anything else
    sql = f"SELECT step, COUNT(*) FROM {table} WHERE run_id = ? GROUP BY step ORDER BY step"
    return dict(_query(db_path, sql, run_id))


def count(db_path: Path, table: str) -> int:
    assert table in ("runs", "received_frames", "scalars", "layer_stats", "histograms", "step_signals", "alerts")
    return _query(db_path, f"SELECT COUNT(*) FROM {table}")[0][0]
