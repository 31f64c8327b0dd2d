"""Neutral value types: what the store returns, the rules produce and the routes, the live push
and the webhooks pass on. No SQL, no HTTP: every layer imports these and none of them imports back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# What upsert_alert did with a finding (webhooks send on new and escalated only).
ALERT_NEW, ALERT_ESCALATED, ALERT_UPDATED = "new", "escalated", "updated"


class UnknownRunError(ValueError):
    """A frame for a run that was never started."""


@dataclass
class IngestResult:
    """What one committed batch did: the seqs to ack and what the live push should announce."""

    acked: dict[str, list[int]] = field(default_factory=dict)  # rank 0's seqs by run
    acked_ranks: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # a rank r > 0's, by run and rank
    changed_runs: list[str] = field(default_factory=list)
    # (run_id, key) -> (steps, values) of the points this batch stored, in arrival order.
    scalar_points: dict[tuple[str, str], tuple[list[int], list[float | None]]] = field(default_factory=dict)
    # run_id -> sorted steps that got new layer statistics or histograms.
    stat_steps: dict[str, list[int]] = field(default_factory=dict)
    stored_frames: int = 0
    replayed_frames: int = 0
    # Alerts this batch created or changed, with what happened to each (ALERT_NEW, ...).
    alerts: list[tuple[AlertInfo, str]] = field(default_factory=list)


@dataclass
class RunInfo:
    id: str
    name: str
    project: str
    status: str
    created_at: float
    updated_at: float
    finished_at: float | None
    last_step: int | None
    last_loss: float | None
    every: int | None
    alert_counts: dict[str, int]
    model: dict[str, Any]
    optimizer: dict[str, Any] | None
    config: dict[str, Any] | None
    dropped: dict[str, int] | None = None


@dataclass
class StoredRun:
    """A stored run as a replay starts it: how it describes itself, its status, and how far it got."""

    model: dict[str, Any] | None
    optimizer: dict[str, Any] | None
    config: dict[str, Any] | None
    status: str
    last_step: int  # the newest step with a scalar or signal stored, or the run's own last step; -1: none


@dataclass
class Finding:
    """One rule's verdict at one step: what an alert row is made from and updated by."""

    rule: str
    severity: str
    layer: str | None
    step: int
    message: str
    remedy: str
    evidence: dict[str, Any] | None = None


@dataclass
class AlertInfo:
    id: int
    run_id: str
    rule: str
    severity: str
    layer: str | None
    first_step: int
    last_step: int
    count: int
    message: str
    remedy: str
    evidence: dict[str, Any] | None
    created_at: float
    updated_at: float
