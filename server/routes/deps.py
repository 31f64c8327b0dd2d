"""What the REST routes depend on, as named `Annotated` aliases: a session, the caller's access, a run.

`SessionDep` opens a session per request; `AccessDep` is what the request's token may see
(every project without access control; see `layerwatch.server.auth`); `RunDep` is the run of
the path's `run_id`, or a 404 that names it (another project's run is answered as absent).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session

from layerwatch.server import auth, store


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]

# What the request's token may see (every project without access control); see server/auth.py.
AccessDep = Annotated[auth.Access, Depends(auth.require_token)]


def get_run_or_404(session: SessionDep, access: AccessDep, run_id: str) -> store.RunInfo:
    run = store.get_run(session, run_id=run_id)
    # Another project's run is answered as absent: a project token learns nothing of it.
    if run is None or not access.allows(run.project):
        raise HTTPException(status_code=404, detail=f"no run with id {run_id!r}")
    return run


RunDep = Annotated[store.RunInfo, Depends(get_run_or_404)]
# Documented on every route that takes a run id, so the OpenAPI page lists the 404 it can answer.
RUN_NOT_FOUND: dict[int | str, dict] = {404: {"description": "No run with this id"}}
