"""Assembles the server: `create_app(settings)` wires storage, routers, the live hub and the webhook worker."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server import __version__, ingest, live
from server.db import init_db, make_engine, make_session_factory
from server.routes import runs, web, webhooks
from server.settings import Settings
from server.webhooks import store as webhook_store
from server.webhooks.worker import WebhookWorker

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """A layerwatch server for `settings`; the tables are created here if missing."""
    settings = settings or Settings()
    engine = make_engine(settings.db_url)
    init_db(engine)
    sessions = make_session_factory(engine)
    with sessions() as session:
        webhook_store.sync_config_webhooks(
            session, urls=settings.webhooks, min_severity=settings.webhook_min_severity, now=time.time()
        )
    worker = WebhookWorker(sessions=sessions, settings=settings, write_lock=ingest.WRITE_LOCK)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await worker.start()
        yield
        await worker.stop()
        engine.dispose()  # close pooled connections so SQLite checkpoints its WAL

    app = FastAPI(
        title="layerwatch", version=__version__, description="A live training monitor for PyTorch.", lifespan=lifespan
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = sessions
    app.state.webhooks = worker
    app.state.hub = live.LiveHub()

    app.include_router(runs.router)
    app.include_router(webhooks.router)
    app.include_router(ingest.router)
    app.include_router(live.router)
    app.include_router(web.router)
    return app
