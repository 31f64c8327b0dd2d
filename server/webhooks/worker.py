"""The background sender: an asyncio task that claims due deliveries and POSTs them from threads.

Started and stopped by the app's lifespan. It sleeps until the next delivery
is due, at most `POLL_S`, and is woken at once when an ingest transaction that
enqueued deliveries commits. Database work and the blocking POSTs run in its
own small thread pool, so neither ingest's threads nor the event loop ever
wait on a receiver.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy.orm import Session, sessionmaker

from layerwatch.server.settings import Settings
from layerwatch.server.webhooks import destinations, outbox, payload, sender, signing
from layerwatch.server.webhooks import store as webhook_store

log = logging.getLogger(__name__)

POLL_S = 2.0  # the longest sleep: a delivery made by another process on this database waits at most this
SEND_THREADS = 4  # concurrent POSTs: one slow receiver does not hold up the others
CLAIM_BATCH = 8


class WebhookWorker:
    """Sends the outbox of one app. `write_lock` is the process's SQLite writer lock (ingest's)."""

    def __init__(self, *, sessions: sessionmaker[Session], settings: Settings, write_lock: threading.Lock) -> None:
        self.sessions = sessions
        self.settings = settings
        self.write_lock = write_lock
        self._task: asyncio.Task[None] | None = None
        self._event: asyncio.Event | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._stopping = False
        self._wake = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        self._pool = ThreadPoolExecutor(max_workers=SEND_THREADS, thread_name_prefix="layerwatch-webhook")
        event = self._event

        def wake() -> None:
            loop.call_soon_threadsafe(event.set)

        self._wake = wake
        outbox.add_wake_callback(wake)
        self._task = asyncio.create_task(self._run(), name="layerwatch-webhooks")

    async def stop(self) -> None:
        """Stop after the attempts in flight (each bounded by the request timeout)."""
        if self._task is None:
            return
        self._stopping = True
        if self._wake is not None:
            outbox.remove_wake_callback(self._wake)
        assert self._event is not None and self._pool is not None
        self._event.set()
        try:
            await asyncio.wait_for(self._task, timeout=self.settings.webhook_timeout_s + 5)
        except asyncio.TimeoutError:
            log.warning("webhook worker did not stop in time; pending deliveries resume at the next start")
        except asyncio.CancelledError:
            pass
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._event is not None and self._pool is not None
        while not self._stopping:
            self._event.clear()  # before looking: a wake-up during the look is not lost
            next_at: float | None = None
            try:
                due = await loop.run_in_executor(self._pool, self._claim)
                if due:
                    await asyncio.gather(*(loop.run_in_executor(self._pool, self._attempt, d) for d in due))
                    continue  # more may be due already
                next_at = await loop.run_in_executor(self._pool, self._next_due_at)
            except Exception:
                log.exception("webhook worker: reading or writing the outbox failed; trying again shortly")
            wait = POLL_S if next_at is None else min(POLL_S, max(0.01, next_at - time.time()))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._event.wait(), timeout=wait)

    # The methods below run in the worker's threads.

    def _claim(self) -> list[outbox.Due]:
        s = self.settings
        with self.write_lock, self.sessions() as session:
            return outbox.claim_due(
                session,
                now=time.time(),
                limit=CLAIM_BATCH,
                rate_limit=s.webhook_rate_limit,
                rate_window_s=s.webhook_rate_window_s,
                lease_s=s.webhook_timeout_s + outbox.CLAIM_GRACE_S,
            )

    def _next_due_at(self) -> float | None:
        with self.sessions() as session:
            return webhook_store.next_due_at(session)

    def _attempt(self, due: outbox.Due) -> None:
        s = self.settings
        answer = send(due, settings=s)
        with self.write_lock, self.sessions() as session:
            outcome = outbox.record_attempt(
                session,
                due=due,
                answer=answer,
                now=time.time(),
                backoff_s=s.webhook_backoff_s,
                backoff_max_s=s.webhook_backoff_max_s,
                retry_for_s=s.webhook_retry_for_s,
            )
        level = logging.INFO if outcome == "delivered" else logging.WARNING
        log.log(
            level,
            "webhook %s attempt %d for alert %s: %s (%s)",
            destinations.shown(due.url),  # the path of a Slack URL is a credential
            due.attempt,
            due.payload.get("alert_id"),
            outcome,
            answer.error or answer.status_code,
        )


def send(due: outbox.Due, *, settings: Settings) -> sender.Answer:
    """Render, sign and POST one attempt (blocking); not to an internal address unless allowed (checked
    now, on what the URL's host resolves to: a final failure, not retried)."""
    if not settings.webhook_allow_private:
        refused = destinations.delivery_refusal(due.url)
        if refused:
            return sender.Answer(None, 0.0, refused, final=True)
    body = payload.render(
        due.payload, delivery_id=due.id, sent_at=time.time(), base_url=settings.base_url, attempt=due.attempt
    )
    secret = due.secret or settings.webhook_secret
    headers = payload.headers(delivery_id=due.id, signature=signing.sign(body, secret) if secret else None)
    return sender.post(due.url, body, headers, timeout=settings.webhook_timeout_s)


def sample_delivery(url: str) -> outbox.Due:
    """A made-up critical alert for `layerwatch webhook test`, shaped exactly like a real one."""
    alert = payload.snapshot(
        alert_id=0,
        rule="loss_diverging",
        severity="critical",
        change="new",
        step=120,
        first_step=120,
        count=1,
        layer=None,
        message="This is a test alert from `layerwatch webhook test`: the loss rose 10x over 20 steps.",
        remedy="Nothing to do: if you can read this, the webhook works.",
        evidence=None,
        run="webhook-test",
        run_id="webhook-test",
        project="default",
    )
    return outbox.Due(id=str(uuid.uuid4()), webhook_id=None, url=url, secret=None, payload=alert, attempt=1)
