"""GET /api/health: whether a layerwatch server answers, its version and wire protocol, and
whether it wants a token. Never needs one (`auth.OPEN_PATHS`): clients and the dashboard ask
it first.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from client_hook import wire
from layerwatch.server import __version__
from layerwatch.server.schemas import HealthPublic

router = APIRouter(prefix="/api")


@router.get("/health")
def health(request: Request) -> HealthPublic:
    """Whether a layerwatch server answers here, which wire protocol it speaks, and whether it wants a token."""
    wanted = "token" if request.app.state.settings.auth_required else None
    return HealthPublic(status="ok", version=__version__, protocol=wire.PROTOCOL_VERSION, auth=wanted)
