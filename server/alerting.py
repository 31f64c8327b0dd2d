"""Raising an alert: the alert row and its webhook deliveries, in the caller's transaction.

The one place a finding becomes an alert that webhooks hear of: the diagnosis engine, the
ingest of a client's preflight findings and `layerwatch diagnose --store` all call
`raise_alert`. Storage writes the row (`store.upsert_alert`), the outbox queues the
deliveries (`webhooks.outbox.enqueue`, which sends only a new or escalated alert); storage
never imports the outbox, and both commit with the data that raised the alert.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from layerwatch.server import store
from layerwatch.server.records import AlertInfo, Finding
from layerwatch.server.webhooks import outbox


def raise_alert(
    session: Session, *, run_id: str, finding: Finding, now: float, first_step: int | None = None
) -> tuple[AlertInfo, str]:
    """Create or update the run's alert for `finding` and queue its webhooks; (alert, change)."""
    info, change = store.upsert_alert(session, run_id=run_id, finding=finding, now=now, first_step=first_step)
    outbox.enqueue(session, alert=info, change=change, now=now)
    return info, change
