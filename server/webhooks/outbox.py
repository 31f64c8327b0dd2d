"""The outbox: deliveries are written with the alert that needs them, then claimed, sent and recorded.

`enqueue` runs in the caller's transaction, so an alert and its deliveries
commit together (or not at all) and a restart finds every pending delivery
still there. The worker then `claim_due`s what is due (respecting each
webhook's rate limit), sends it, and `record_attempt`s the answer, which
decides between delivered, another try later, and failed. No HTTP here, and
no SQL: the rows are read and written by `webhooks.store` (the run's name by
`store`); this module decides.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session

from client_hook import wire
from layerwatch.server import store
from layerwatch.server.records import ALERT_ESCALATED, ALERT_NEW, AlertInfo, RunInfo
from layerwatch.server.webhooks import payload
from layerwatch.server.webhooks import store as webhook_store
from layerwatch.server.webhooks.sender import Answer
from layerwatch.server.webhooks.tables import DELIVERED, FAILED, PENDING, WebhookDelivery

log = logging.getLogger(__name__)

SEND_ON = (ALERT_NEW, ALERT_ESCALATED)  # an update is never sent again
# A claimed delivery is not handed out again for this long past its timeout:
# if the process dies mid-send, it is sent again after that (at least once).
CLAIM_GRACE_S = 30.0


# ---------------------------------------------------------------- wake-ups

_wake_lock = threading.Lock()
_wake_callbacks: list[Callable[[], None]] = []


def add_wake_callback(callback: Callable[[], None]) -> None:
    """Call `callback` (from any thread) after a transaction that enqueued deliveries commits."""
    with _wake_lock:
        _wake_callbacks.append(callback)


def remove_wake_callback(callback: Callable[[], None]) -> None:
    with _wake_lock:
        if callback in _wake_callbacks:
            _wake_callbacks.remove(callback)


def _wake_all(session: Session) -> None:
    with _wake_lock:
        callbacks = list(_wake_callbacks)
    for callback in callbacks:
        try:
            callback()
        except Exception:  # a closed loop in a stopped app: nothing to wake
            log.debug("webhook wake-up callback failed", exc_info=True)


# ---------------------------------------------------------------- enqueue


def enqueue(session: Session, *, alert: AlertInfo, change: str, now: float, run: RunInfo | None = None) -> int:
    """Add one pending delivery of `alert` per webhook that wants it; return how many.

    Only a new or escalated alert is sent (`change` from `store.upsert_alert`, via `alerting.raise_alert`);
    a webhook wants it when the alert's severity is at least its
    `min_severity` and it is for every project or the run's. `run` (a
    `store.RunInfo`) saves a lookup; without it the run's name and project
    are read by `alert.run_id`. Not committed here: call inside the transaction
    that upserted the alert, before its commit.
    """
    if change not in SEND_ON:
        return 0
    webhooks = webhook_store.list_webhooks(session)
    if not webhooks:
        return 0  # the common case: one query, nothing else
    named = (run.name, run.project) if run is not None else store.run_name_and_project(session, run_id=alert.run_id)
    if named is None:
        raise ValueError(f"alert {alert.id} is for run {alert.run_id!r}, which is not stored")
    run_name, project = named
    rank = wire.severity_rank(alert.severity)
    wanted = [
        w
        for w in webhooks
        if wire.severity_rank(w.min_severity) <= rank and (w.project is None or w.project == project)
    ]
    if not wanted:
        return 0
    already = webhook_store.queued_webhook_ids(session, alert_id=alert.id, severity=alert.severity)
    body = payload.snapshot(
        alert_id=alert.id,
        rule=alert.rule,
        severity=alert.severity,
        change=change,
        step=alert.last_step,
        first_step=alert.first_step,
        count=alert.count,
        layer=alert.layer,
        message=alert.message,
        remedy=alert.remedy,
        evidence=alert.evidence,
        run=run_name,
        run_id=alert.run_id,
        project=project,
    )
    fresh = [w for w in wanted if w.id not in already]  # the same alert at the same severity: sent once
    if fresh:
        webhook_store.add_deliveries(
            session,
            webhooks=fresh,
            alert_id=alert.id,
            run_id=alert.run_id,
            severity=alert.severity,
            payload=body,
            now=now,
        )
        event.listen(session, "after_commit", _wake_all, once=True)
    return len(fresh)


# ---------------------------------------------------------------- claim


@dataclass(frozen=True)
class Due:
    """A delivery handed to the worker for one attempt."""

    id: str
    webhook_id: int | None
    url: str
    secret: str | None  # the webhook's own; None: the server-wide one, if any
    payload: dict[str, Any]
    attempt: int


def claim_due(
    session: Session,
    *,
    now: float,
    limit: int,
    rate_limit: int,
    rate_window_s: float,
    lease_s: float,
) -> list[Due]:
    """Up to `limit` pending deliveries due by `now`, oldest first, leased for `lease_s`; commits.

    A webhook that has had `rate_limit` attempts in the last `rate_window_s`
    gets no more now: its due deliveries are moved to when the window has room
    (deferred, never dropped). A delivery whose webhook was deleted fails.
    """
    rows = webhook_store.due_deliveries(session, now=now, limit=limit * 4)  # room for some deferred by the rate limit
    recent: dict[int, list[float]] = {}
    taken: dict[int, int] = defaultdict(int)
    claimed: list[Due] = []
    for delivery, webhook in rows:
        if webhook is None:
            _finish(delivery, FAILED, now, error="the webhook was deleted before this alert was delivered")
            continue
        if webhook.id not in recent:
            recent[webhook.id] = webhook_store.attempt_times(session, webhook_id=webhook.id, since=now - rate_window_s)
        times = recent[webhook.id]
        used = len(times) + taken[webhook.id]
        if used >= rate_limit or len(claimed) >= limit:
            if used >= rate_limit:
                # The k-th over the limit goes when the k-th attempt in the window leaves it.
                k = used - rate_limit
                delivery.next_attempt_at = (times[k] if k < len(times) else now) + rate_window_s
                taken[webhook.id] += 1
            continue
        taken[webhook.id] += 1
        delivery.next_attempt_at = now + lease_s
        claimed.append(
            Due(
                id=delivery.id,
                webhook_id=webhook.id,
                url=delivery.url,
                secret=webhook.secret,
                payload=dict(delivery.payload),
                attempt=delivery.attempts + 1,
            )
        )
    session.commit()
    return claimed


# ---------------------------------------------------------------- record


def retry_delay(attempt: int, *, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Seconds before attempt `attempt + 1`: base·2^(attempt-1) capped at max_s, times a jitter in [0.5, 1].

    The jitter spreads a burst of failures (a receiver that was down for all of
    them) so their retries do not arrive together.
    """
    delay = min(max_s, base_s * 2 ** (attempt - 1))
    return delay * (0.5 + 0.5 * (rng or random).random())


def retryable(answer: Answer) -> bool:
    """No answer, 429 and 5xx are worth another try; any other 4xx (or a 3xx) will not change."""
    code = answer.status_code
    return not answer.final and (code is None or code == 429 or code >= 500)


def record_attempt(
    session: Session,
    *,
    due: Due,
    answer: Answer,
    now: float,
    backoff_s: float,
    backoff_max_s: float,
    retry_for_s: float,
) -> str:
    """Store one attempt and move its delivery on; return the outcome (delivered, retry or failed); commits.

    A failure worth retrying is retried until `retry_for_s` after the alert was
    raised; the attempt that would come later than that is not made.
    """
    delivery = webhook_store.get_delivery(session, delivery_id=due.id)
    if delivery is None or delivery.status != PENDING:
        return delivery.status if delivery is not None else FAILED  # deleted meanwhile
    delivery.attempts = due.attempt
    delivery.last_status_code = answer.status_code
    delivery.last_error = answer.error
    if answer.ok:
        outcome = DELIVERED
        _finish(delivery, DELIVERED, now)
    elif retryable(answer):
        wait = retry_delay(due.attempt, base_s=backoff_s, max_s=backoff_max_s)
        if answer.retry_after_s is not None:
            wait = max(wait, answer.retry_after_s)  # the receiver said when; sooner would be refused again
        if now + wait > delivery.created_at + retry_for_s:
            outcome = FAILED
            _finish(delivery, FAILED, now, error=f"{answer.error} (gave up after {due.attempt} attempts)")
        else:
            outcome = "retry"
            delivery.next_attempt_at = now + wait
    else:
        outcome = FAILED
        _finish(delivery, FAILED, now, error=answer.error)
    webhook_store.add_attempt(
        session,
        delivery_id=due.id,
        webhook_id=due.webhook_id,
        number=due.attempt,
        at=now,
        status_code=answer.status_code,
        latency_ms=answer.latency_ms,
        error=answer.error,
        outcome=outcome,
    )
    session.commit()
    return outcome


def _finish(delivery: WebhookDelivery, status: str, now: float, error: str | None = None) -> None:
    delivery.status = status
    delivery.finished_at = now
    if error is not None:
        delivery.last_error = error
