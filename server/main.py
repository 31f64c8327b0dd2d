"""Assembles the server: `create_app(settings)` wires storage, routers and the live hub."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server import __version__, ingest, live
from server.db import init_db, make_engine, make_session_factory
from server.routes import runs, web
from server.settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """A layerwatch server for `settings`; the tables are created here if missing."""
    settings = settings or Settings()
    engine = make_engine(settings.db_url)
    init_db(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.dispose()  # close pooled connections so SQLite checkpoints its WAL

    app = FastAPI(
        title="layerwatch", version=__version__, description="A live training monitor for PyTorch.", lifespan=lifespan
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = make_session_factory(engine)
    app.state.hub = live.LiveHub()

    app.include_router(runs.router)
    app.include_router(ingest.router)
    app.include_router(live.router)
    app.include_router(web.router)
    return app
