"""The webhook tables: configured receivers, the outbox of deliveries, and every attempt.

They share `server.tables.Base`, so `init_db`'s create_all makes them as long
as this module is imported first (`server.webhooks.outbox` imports it, and
`server.store` imports that).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Double, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from layerwatch.server.tables import NAME, Base

URL = String(2048)

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
SOURCE_CONFIG, SOURCE_API = "config", "api"


class Webhook(Base):
    """A receiver. `source` says where it came from: `config` (--webhook, re-read at every
    start-up) or `api` (POST /api/webhooks). `project` None means every project."""

    __tablename__ = "webhooks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    url: Mapped[str] = mapped_column(URL)
    project: Mapped[str | None] = mapped_column(NAME)
    min_severity: Mapped[str] = mapped_column(String(16))
    # Write-only over REST. None: signed with the server-wide secret, if there is one.
    secret: Mapped[str | None] = mapped_column(String(512))
    source: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[float] = mapped_column(Double)


class WebhookDelivery(Base):
    """One alert (at one severity) for one webhook: the outbox row, pending until sent or given up.

    The unique key is what keeps an alert from being sent twice to a receiver:
    an update finds the row there already; an escalation has a new severity.
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("alert_id", "webhook_id", "severity", name="uq_webhook_deliveries_alert_webhook_severity"),
        Index("ix_webhook_deliveries_status_due", "status", "next_attempt_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # the delivery id receivers see (a uuid4)
    # SET NULL: deleting a webhook keeps the history of what was sent to it.
    webhook_id: Mapped[int | None] = mapped_column(ForeignKey("webhooks.id", ondelete="SET NULL"), index=True)
    alert_id: Mapped[int] = mapped_column(ForeignKey("alerts.id", ondelete="CASCADE"), index=True)
    run_id: Mapped[str] = mapped_column(NAME, index=True)
    url: Mapped[str] = mapped_column(URL)
    severity: Mapped[str] = mapped_column(String(16))
    # The alert as it was when raised; sent_at, the link and the id are added per attempt.
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Double)
    next_attempt_at: Mapped[float] = mapped_column(Double)
    finished_at: Mapped[float | None] = mapped_column(Double)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)


class WebhookAttempt(Base):
    """One POST (or try at one): what the receiver answered, how long it took, what went wrong."""

    __tablename__ = "webhook_attempts"
    # The rate limit counts a webhook's attempts in the last window.
    __table_args__ = (Index("ix_webhook_attempts_webhook_at", "webhook_id", "at"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True)
    webhook_id: Mapped[int | None] = mapped_column(Integer)
    number: Mapped[int] = mapped_column(Integer)  # 1 for the first attempt
    at: Mapped[float] = mapped_column(Double)
    status_code: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float | None] = mapped_column(Double)
    error: Mapped[str | None] = mapped_column(Text)
    outcome: Mapped[str] = mapped_column(String(16))  # delivered | retry | failed
