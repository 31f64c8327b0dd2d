"""REST: alert webhooks and their deliveries, under /api/webhooks.

Routes translate between HTTP and `server.webhooks.store`; they hold no SQL.
A webhook's secret can be set here but is never returned. Webhooks reach every
project's alerts, so adding, listing and removing them takes the server's token
(403 for a project's); a project token reads the deliveries of its own runs
(another project's run answers 404, as on /api/runs).
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response, status

from client_hook import wire
from layerwatch.server import auth
from layerwatch.server.db import WRITE_LOCK
from layerwatch.server.routes.deps import AccessDep, SessionDep, get_run_or_404
from layerwatch.server.settings import check_webhook_destination
from layerwatch.server.webhooks import destinations, store
from layerwatch.server.webhooks.schemas import AlertDeliveriesPublic, DeliveryPublic, WebhookCreate, WebhookPublic

router = APIRouter(prefix="/api/webhooks", tags=["webhooks"])
# On the routes that manage webhooks (they reach every project's alerts).
EVERY_PROJECT = [Depends(auth.require_every_project)]

# Ids are 64-bit database integers: one past that range is a 422, not a database overflow (a 500).
AlertIdQuery = Annotated[int | None, Query(ge=0, le=wire.MAX_COUNT)]
WebhookIdPath = Annotated[int, Path(ge=0, le=wire.MAX_COUNT)]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={400: {"description": "The body is not valid JSON"}},
    dependencies=EVERY_PROJECT,
)
def create_webhook(session: SessionDep, body: WebhookCreate, request: Request) -> WebhookPublic:
    """Post this server's alerts (of `project`, or all when null) at `min_severity` or above to `url`."""
    try:
        check_webhook_destination(body.url, request.app.state.settings.webhook_allow_private)
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, detail=str(exc)) from None
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


@router.get("", dependencies=EVERY_PROJECT)
def list_webhooks(session: SessionDep) -> list[WebhookPublic]:
    """Every webhook: those from the configuration (`source` "config") and those added here ("api")."""
    return [WebhookPublic.model_validate(w) for w in store.list_webhooks(session)]


@router.get("/deliveries")
def list_deliveries(
    session: SessionDep, access: AccessDep, run_id: str | None = None, alert_id: AlertIdQuery = None
) -> list[DeliveryPublic]:
    """Deliveries, newest first, each with every attempt: status code, latency, error.

    A project token reads one of its runs' at a time (`run_id` required)."""
    if access.project is not None:
        if run_id is None:
            raise HTTPException(
                status_code=status.HTTP_403_FORBIDDEN,
                detail=f"this token is for project {access.project!r} only: pass run_id, one of its runs",
            )
        get_run_or_404(session, access, run_id)
    deliveries = [
        DeliveryPublic.model_validate(d) for d in store.list_deliveries(session, run_id=run_id, alert_id=alert_id)
    ]
    if access.project is not None:
        # A webhook's URL is a credential (a Slack URL's path) of whoever holds the server token: a project
        # token sees where its alerts went only as scheme://host/….
        deliveries = [d.model_copy(update={"url": destinations.shown(d.url)}) for d in deliveries]
    return deliveries


@router.get("/summary")
def alert_summary(session: SessionDep, access: AccessDep, run_id: str) -> list[AlertDeliveriesPublic]:
    """Per alert of a run with deliveries: delivered, pending and failed counts (the dashboard's webhook column)."""
    if access.project is not None:
        get_run_or_404(session, access, run_id)
    return [AlertDeliveriesPublic.model_validate(s) for s in store.alert_summaries(session, run_id=run_id)]


@router.delete(
    "/{webhook_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={404: {"description": "No webhook with this id"}},
    dependencies=EVERY_PROJECT,
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
