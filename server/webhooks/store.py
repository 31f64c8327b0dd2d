"""The webhook tables' data functions: receivers, deliveries, per-alert summaries, and the outbox's rows.

All SQL on the webhook tables (webhooks/tables.py) is here, and only that: this is the one
storage module outside `layerwatch.server.store` (tests/test_layout.py allows it by name),
because the webhooks package owns those tables, and it reads no run table (the outbox asks
`store` for a run's name). Keyword-only arguments, no HTTP. The REST routes and start-up get
plain dataclasses; the outbox (outbox.py, which decides what is sent, when and how often) is
handed the delivery rows it moves on, and commits them itself. A webhook's secret goes in and
is used for signing, but only the outbox's `Due` carries it out.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from layerwatch.server.webhooks.tables import (
    DELIVERED,
    FAILED,
    PENDING,
    SOURCE_API,
    SOURCE_CONFIG,
    Webhook,
    WebhookAttempt,
    WebhookDelivery,
)


class ConfiguredWebhookError(ValueError):
    """A webhook from the server's configuration, which only a restart without it removes."""


@dataclass
class WebhookInfo:
    id: int
    url: str
    project: str | None
    min_severity: str
    signed: bool  # has a secret of its own (the server-wide one may sign it too)
    source: str
    created_at: float


@dataclass
class AttemptInfo:
    number: int
    at: float
    status_code: int | None
    latency_ms: float | None
    error: str | None
    outcome: str


@dataclass
class DeliveryInfo:
    id: str
    webhook_id: int | None
    alert_id: int
    run_id: str
    url: str
    severity: str
    rule: str
    status: str
    attempts: int
    created_at: float
    next_attempt_at: float | None
    finished_at: float | None
    last_status_code: int | None
    last_error: str | None
    attempt_log: list[AttemptInfo] = field(default_factory=list)


@dataclass
class AlertDeliveries:
    """How an alert's deliveries stand: `state` is failed if any failed, else pending if any is, else delivered."""

    alert_id: int
    state: str
    delivered: int
    pending: int
    failed: int


def _info(w: Webhook) -> WebhookInfo:
    return WebhookInfo(
        id=w.id,
        url=w.url,
        project=w.project,
        min_severity=w.min_severity,
        signed=w.secret is not None,
        source=w.source,
        created_at=w.created_at,
    )


def create_webhook(
    session: Session, *, url: str, project: str | None, min_severity: str, secret: str | None, now: float
) -> WebhookInfo:
    webhook = Webhook(
        url=url, project=project, min_severity=min_severity, secret=secret, source=SOURCE_API, created_at=now
    )
    session.add(webhook)
    session.commit()
    return _info(webhook)


def list_webhooks(session: Session) -> list[WebhookInfo]:
    return [_info(w) for w in session.scalars(select(Webhook).order_by(Webhook.id))]


def delete_webhook(session: Session, *, webhook_id: int, now: float) -> bool:
    """Delete a webhook added over REST; its pending deliveries fail. False if there is none with this id."""
    webhook = session.get(Webhook, webhook_id)
    if webhook is None:
        return False
    if webhook.source == SOURCE_CONFIG:
        raise ConfiguredWebhookError(
            f"webhook {webhook_id} ({webhook.url!r}) comes from the server's configuration (--webhook or "
            "LAYERWATCH_WEBHOOKS): restart the server without it to remove it"
        )
    _fail_pending(session, webhook_id=webhook_id, now=now, error="the webhook was deleted before this was delivered")
    session.delete(webhook)
    session.commit()
    return True


def sync_config_webhooks(session: Session, *, urls: list[str], min_severity: str, now: float) -> None:
    """Make the configured webhooks (`--webhook`) the `config` rows: add new ones, drop unlisted ones; commits.

    A configured URL keeps its row (and so its pending deliveries) across
    restarts; one no longer configured has its pending deliveries failed.
    """
    existing = {w.url: w for w in session.scalars(select(Webhook).where(Webhook.source == SOURCE_CONFIG))}
    for url in dict.fromkeys(urls):
        webhook = existing.pop(url, None)
        if webhook is None:
            session.add(
                Webhook(
                    url=url, project=None, min_severity=min_severity, secret=None, source=SOURCE_CONFIG, created_at=now
                )
            )
        else:
            webhook.min_severity = min_severity
    for webhook in existing.values():
        _fail_pending(session, webhook_id=webhook.id, now=now, error="the webhook is no longer configured")
        session.delete(webhook)
    session.commit()


def _fail_pending(session: Session, *, webhook_id: int, now: float, error: str) -> None:
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.webhook_id == webhook_id, WebhookDelivery.status == PENDING)
        .values(status=FAILED, finished_at=now, last_error=error)
    )


def list_deliveries(
    session: Session, *, run_id: str | None = None, alert_id: int | None = None, limit: int = 500
) -> list[DeliveryInfo]:
    """Deliveries, newest first, each with every attempt (oldest first)."""
    query = select(WebhookDelivery)
    if run_id is not None:
        query = query.where(WebhookDelivery.run_id == run_id)
    if alert_id is not None:
        query = query.where(WebhookDelivery.alert_id == alert_id)
    deliveries = session.scalars(
        query.order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id).limit(limit)
    ).all()
    attempts: dict[str, list[AttemptInfo]] = defaultdict(list)
    if deliveries:
        rows = session.scalars(
            select(WebhookAttempt)
            .where(WebhookAttempt.delivery_id.in_([d.id for d in deliveries]))
            .order_by(WebhookAttempt.delivery_id, WebhookAttempt.number, WebhookAttempt.id)
        )
        for a in rows:
            attempts[a.delivery_id].append(
                AttemptInfo(
                    number=a.number,
                    at=a.at,
                    status_code=a.status_code,
                    latency_ms=a.latency_ms,
                    error=a.error,
                    outcome=a.outcome,
                )
            )
    return [
        DeliveryInfo(
            id=d.id,
            webhook_id=d.webhook_id,
            alert_id=d.alert_id,
            run_id=d.run_id,
            url=d.url,
            severity=d.severity,
            rule=_rule(d.payload),
            status=d.status,
            attempts=d.attempts,
            created_at=d.created_at,
            next_attempt_at=d.next_attempt_at if d.status == PENDING else None,
            finished_at=d.finished_at,
            last_status_code=d.last_status_code,
            last_error=d.last_error,
            attempt_log=attempts[d.id],
        )
        for d in deliveries
    ]


def _rule(body: dict[str, Any] | None) -> str:
    return str((body or {}).get("rule", ""))


def alert_summaries(session: Session, *, run_id: str) -> list[AlertDeliveries]:
    """Per alert of a run that has deliveries: how many are delivered, pending, failed."""
    counts: dict[int, dict[str, int]] = defaultdict(lambda: {DELIVERED: 0, PENDING: 0, FAILED: 0})
    rows = session.execute(
        select(WebhookDelivery.alert_id, WebhookDelivery.status).where(WebhookDelivery.run_id == run_id)
    )
    for alert_id, status in rows:
        counts[alert_id][status] = counts[alert_id].get(status, 0) + 1
    out = []
    for alert_id in sorted(counts):
        c = counts[alert_id]
        state = FAILED if c[FAILED] else PENDING if c[PENDING] else DELIVERED
        out.append(
            AlertDeliveries(
                alert_id=alert_id, state=state, delivered=c[DELIVERED], pending=c[PENDING], failed=c[FAILED]
            )
        )
    return out


# ---------------------------------------------------------------- the outbox's rows


def queued_webhook_ids(session: Session, *, alert_id: int, severity: str) -> set[int | None]:
    """The webhooks that have a delivery of this alert at this severity already (queued, sent or failed)."""
    return set(
        session.scalars(
            select(WebhookDelivery.webhook_id).where(
                WebhookDelivery.alert_id == alert_id, WebhookDelivery.severity == severity
            )
        )
    )


def add_deliveries(
    session: Session,
    *,
    webhooks: list[WebhookInfo],
    alert_id: int,
    run_id: str,
    severity: str,
    payload: dict[str, Any],
    now: float,
) -> None:
    """One pending delivery of `payload` per webhook, due now; flushed, not committed (the caller's transaction)."""
    for webhook in webhooks:
        session.add(
            WebhookDelivery(
                id=str(uuid.uuid4()),
                webhook_id=webhook.id,
                alert_id=alert_id,
                run_id=run_id,
                url=webhook.url,
                severity=severity,
                payload=payload,
                status=PENDING,
                attempts=0,
                created_at=now,
                next_attempt_at=now,
                finished_at=None,
            )
        )
    session.flush()


def next_due_at(session: Session) -> float | None:
    """When the earliest pending delivery is due (None: nothing pending)."""
    return session.scalar(
        select(WebhookDelivery.next_attempt_at)
        .where(WebhookDelivery.status == PENDING)
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(1)
    )


def due_deliveries(session: Session, *, now: float, limit: int) -> list[tuple[WebhookDelivery, Webhook | None]]:
    """Up to `limit` pending deliveries due by `now`, soonest due (then oldest) first, each with its
    webhook (None: deleted since). The rows are the outbox's to move on and commit."""
    rows = session.execute(
        select(WebhookDelivery, Webhook)
        .outerjoin(Webhook, WebhookDelivery.webhook_id == Webhook.id)
        .where(WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= now)
        .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.created_at)
        .limit(limit)
    )
    return [(delivery, webhook) for delivery, webhook in rows]


def attempt_times(session: Session, *, webhook_id: int, since: float) -> list[float]:
    """When a webhook's attempts after `since` were made, oldest first (its rate-limit window)."""
    return list(
        session.scalars(
            select(WebhookAttempt.at)
            .where(WebhookAttempt.webhook_id == webhook_id, WebhookAttempt.at > since)
            .order_by(WebhookAttempt.at)
        )
    )


def get_delivery(session: Session, *, delivery_id: str) -> WebhookDelivery | None:
    """One delivery's row, for the outbox to move on and commit; None if it is gone."""
    return session.get(WebhookDelivery, delivery_id)


def add_attempt(
    session: Session,
    *,
    delivery_id: str,
    webhook_id: int | None,
    number: int,
    at: float,
    status_code: int | None,
    latency_ms: float | None,
    error: str | None,
    outcome: str,
) -> None:
    """Store one attempt of a delivery; not committed (the outbox commits it with the delivery's new state)."""
    session.add(
        WebhookAttempt(
            delivery_id=delivery_id,
            webhook_id=webhook_id,
            number=number,
            at=at,
            status_code=status_code,
            latency_ms=latency_ms,
            error=error,
            outcome=outcome,
        )
    )
