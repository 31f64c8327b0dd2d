"""Assembles the server: `create_app(settings)` wires storage, routers, access tokens, the live hub,
the webhook worker and the crashed-run sweeper."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from starlette.middleware.trustedhost import TrustedHostMiddleware

from layerwatch.server import __version__, auth, live
from layerwatch.server.db import WRITE_LOCK, init_db, make_engine, make_session_factory
from layerwatch.server.diagnosis.engine import Engine
from layerwatch.server.liveness import Sweeper
from layerwatch.server.routes import health, ingest, runs, web, webhooks
from layerwatch.server.routes import live as live_socket
from layerwatch.server.settings import Settings
from layerwatch.server.webhooks import store as webhook_store
from layerwatch.server.webhooks.worker import WebhookWorker

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
    worker = WebhookWorker(sessions=sessions, settings=settings, write_lock=WRITE_LOCK)
    hub = live.LiveHub()
    sweeper = Sweeper(sessions=sessions, hub=hub, write_lock=WRITE_LOCK, timeout_s=settings.heartbeat_timeout_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await worker.start()
        await sweeper.start()
        yield
        # By now uvicorn has closed the sockets and waited for the batches in flight to commit.
        await sweeper.stop()
        await worker.stop()
        engine.dispose()  # close pooled connections so SQLite checkpoints its WAL

    app = FastAPI(
        title="layerwatch", version=__version__, description="A live training monitor for PyTorch.", lifespan=lifespan
    )
    app.state.settings = settings
    # DNS rebinding: every request, websockets included, must name a host this server is served under.
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.hosts)
    app.state.engine = engine
    app.state.sessions = sessions
    app.state.webhooks = worker
    app.state.hub = hub
    app.state.diagnosis = Engine()  # one per process: the rules' per-run history lives here
    app.state.liveness = sweeper

    # With a token set, everything under /api wants it (auth.OPEN_PATHS excepted); the
    # websockets check it themselves, and the dashboard's files stay open so it can ask.
    token_required = [Depends(auth.require_token)]
    app.include_router(health.router)  # open: auth.OPEN_PATHS
    app.include_router(runs.router, dependencies=token_required)
    app.include_router(webhooks.router, dependencies=token_required)
    app.include_router(ingest.router)
    app.include_router(live_socket.router)
    app.include_router(web.router)
    return app
