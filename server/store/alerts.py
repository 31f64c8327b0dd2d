"""Alerts: one per (run, rule, layer), created or updated from a finding; a run's alerts in order.

The store only writes the alert row. Whoever raises the alert queues its webhook deliveries
(`layerwatch.server.alerting.raise_alert`), in the same transaction, so no storage module
imports the webhooks."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from client_hook import wire
from layerwatch.server.records import (
    ALERT_ESCALATED,
    ALERT_NEW,
    ALERT_UPDATED,
    AlertInfo,
    Finding,
)
from layerwatch.server.tables import Alert


def list_alerts(session: Session, *, run_id: str) -> list[AlertInfo]:
    """A run's alerts in the order they first fired."""
    alerts = session.scalars(select(Alert).where(Alert.run_id == run_id).order_by(Alert.first_step, Alert.id))
    return [_alert_info(a) for a in alerts]


def _alert_info(a: Alert) -> AlertInfo:
    return AlertInfo(
        id=a.id,
        run_id=a.run_id,
        rule=a.rule,
        severity=a.severity,
        layer=a.layer,
        first_step=a.first_step,
        last_step=a.last_step,
        count=a.count,
        message=a.message,
        remedy=a.remedy,
        evidence=a.evidence,
        created_at=a.created_at,
        updated_at=a.updated_at,
    )


def upsert_alert(
    session: Session, *, run_id: str, finding: Finding, now: float, first_step: int | None = None
) -> tuple[AlertInfo, str]:
    """One alert per (run, rule, layer): create it, or update it with the latest finding.

    An update keeps the first step, extends the last, counts, and takes the
    newest message and evidence; severity only ever rises (a rise is
    ALERT_ESCALATED, which webhooks send again). `first_step` (default: the
    finding's step) is where a finding merged over several steps began. Not
    committed here, and no webhook queued: callers raise alerts through
    `alerting.raise_alert`, which queues the deliveries in the same transaction.
    """
    layer_match = Alert.layer.is_(None) if finding.layer is None else Alert.layer == finding.layer
    alert = session.scalar(select(Alert).where(Alert.run_id == run_id, Alert.rule == finding.rule, layer_match))
    if alert is None:
        alert = Alert(
            run_id=run_id,
            rule=finding.rule,
            severity=finding.severity,
            layer=finding.layer,
            first_step=finding.step if first_step is None else first_step,
            last_step=finding.step,
            count=1,
            message=finding.message,
            remedy=finding.remedy,
            evidence=finding.evidence,
            created_at=now,
            updated_at=now,
        )
        session.add(alert)
        change = ALERT_NEW
    else:
        escalated = wire.severity_rank(finding.severity) > wire.severity_rank(alert.severity)
        alert.severity = finding.severity if escalated else alert.severity
        alert.first_step = min(alert.first_step, finding.step if first_step is None else first_step)
        alert.last_step = max(alert.last_step, finding.step)
        alert.count += 1
        alert.message, alert.remedy, alert.evidence = finding.message, finding.remedy, finding.evidence
        alert.updated_at = now
        change = ALERT_ESCALATED if escalated else ALERT_UPDATED
    session.flush()  # for the id
    return _alert_info(alert), change
