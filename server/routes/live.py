"""The dashboard's websocket, /ws/live: every change the hub publishes, as it happens.

A dashboard sends nothing; it hears run, scalar, stats and alert events for the projects its
token opens (`layerwatch.server.live.LiveHub` does the fan-out and the filtering).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from layerwatch.server import auth, origins
from layerwatch.server.live import LiveHub

log = logging.getLogger(__name__)
router = APIRouter()


@router.websocket("/ws/live")
async def live(websocket: WebSocket) -> None:
    hub: LiveHub = websocket.app.state.hub
    if not origins.origin_allowed(websocket, websocket.app.state.settings.allow_origins):
        log.warning("live from %s refused: origin %r", websocket.client, websocket.headers.get("origin"))
        await origins.refuse_origin(websocket)  # a page of another site: it learns nothing, not even why
        return
    try:
        access = auth.websocket_access(websocket, websocket.app.state.settings)
    except auth.Refused as exc:
        problem = str(exc)
        # Accepted first, then closed: a browser sees a refused handshake only as code 1006,
        # but it does see this close code and reason, and can ask for a token.
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            await websocket.accept()
            # A close reason is at most 123 bytes; the problem may quote a client's non-ASCII text.
            reason = problem.encode("utf-8", "replace")[:120].decode("utf-8", "ignore")
            await websocket.close(code=auth.CLOSE_UNAUTHORIZED, reason=reason)
        return
    # Subscribed before the handshake completes, so no event after it is missed.
    queue = hub.subscribe(access.project)
    sender: asyncio.Task[None] | None = None

    async def forward() -> None:
        while True:
            await websocket.send_text(await queue.get())

    try:
        await websocket.accept()
        sender = asyncio.create_task(forward())
        # Dashboards send nothing; reading is how a closed tab is noticed while no events flow.
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        hub.unsubscribe(queue)
        if sender is not None:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender
