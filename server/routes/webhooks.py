"""REST: alert webhooks and their deliveries, under /api/webhooks.

Routes translate between HTTP and `server.webhooks.store`; they hold no SQL.
A webhook's secret can be set here but is never returned.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Response, status

from client_hook import wire
from server.ingest import WRITE_LOCK
from server.routes.runs import SessionDep
from server.webhooks import store
from server.webhooks.schemas import AlertDeliveriesPublic, DeliveryPublic, WebhookCreate, WebhookPublic

router = APIRouter(prefix="/api/webhooks", tags=["webhooks"])

# Ids are 64-bit database integers: one past that range is a 422, not a database overflow (a 500).
AlertIdQuery = Annotated[int | None, Query(ge=0, le=wire.MAX_COUNT)]
WebhookIdPath = Annotated[int, Path(ge=0, le=wire.MAX_COUNT)]


@router.post("", status_code=status.HTTP_201_CREATED, responses={400: {"description": "The body is not valid JSON"}})
def create_webhook(session: SessionDep, body: WebhookCreate) -> WebhookPublic:
    """Post this server's alerts (of `project`, or all when null) at `min_severity` or above to `url`."""
    with WRITE_LOCK:
        webhook = store.create_webhook(
            session,
            url=body.url,
            project=body.project,
            min_severity=body.min_severity,
            secret=body.secret,
            now=time.time(),
        )
    return WebhookPublic.model_validate(webhook)


@router.get("")
def list_webhooks(session: SessionDep) -> list[WebhookPublic]:
    """Every webhook: those from the configuration (`source` "config") and those added here ("api")."""
    return [WebhookPublic.model_validate(w) for w in store.list_webhooks(session)]


@router.get("/deliveries")
def list_deliveries(
    session: SessionDep, run_id: str | None = None, alert_id: AlertIdQuery = None
) -> list[DeliveryPublic]:
    """Deliveries, newest first, each with every attempt: status code, latency, error."""
    return [DeliveryPublic.model_validate(d) for d in store.list_deliveries(session, run_id=run_id, alert_id=alert_id)]


@router.get("/summary")
def alert_summary(session: SessionDep, run_id: str) -> list[AlertDeliveriesPublic]:
    """Per alert of a run with deliveries: delivered, pending and failed counts (the dashboard's webhook column)."""
    return [AlertDeliveriesPublic.model_validate(s) for s in store.alert_summaries(session, run_id=run_id)]


@router.delete(
    "/{webhook_id}", status_code=status.HTTP_204_NO_CONTENT, responses={404: {"description": "No webhook with this id"}}
)
def delete_webhook(session: SessionDep, webhook_id: WebhookIdPath) -> Response:
    """Remove a webhook added over REST; its undelivered alerts are marked failed."""
    try:
        with WRITE_LOCK:
            found = store.delete_webhook(session, webhook_id=webhook_id, now=time.time())
    except store.ConfiguredWebhookError as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None
    if not found:
        raise HTTPException(status_code=404, detail=f"no webhook with id {webhook_id}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)
