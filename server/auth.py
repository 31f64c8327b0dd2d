"""Access tokens: who may read runs (REST, /ws/live) and who may send them (/ws/ingest).

A server started with a token (`layerwatch serve --token T`, env
LAYERWATCH_TOKEN) requires it everywhere data goes in or out; project tokens
(`--project-token vision=T2`, env LAYERWATCH_PROJECT_TOKENS) open one project
each. Either kind turns access control on:

- the server token sees and sends every project, and manages webhooks;
- a project token sees only its project's runs (the others answer 404, as if
  absent, and the run list and /ws/live leave them out), sends only runs of
  its project (a run_start naming another project, or frames for another
  project's run, are refused), and may not manage webhooks (they reach
  every project's alerts): 403; it reads its own runs' deliveries.

Where tokens are read:

- REST under /api: `Authorization: Bearer T`, else 401 with a JSON `detail`
  and `WWW-Authenticate: Bearer`. `/api/health` stays open (it is what
  start-up checks poll); its body has `"auth": "token"` when one is required.
- websockets: the same header, or `?token=T`, because a browser cannot set
  headers on a websocket. A refused /ws/live is closed with CLOSE_UNAUTHORIZED.

The dashboard's own files (HTML/JS/CSS, plotly.min.js) need no token: the page
must load to ask for one. Tokens are compared with hmac.compare_digest, each
one every time, so the time a wrong guess takes says nothing about how much of
it was right, nor which token it came close to.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
import socket
import urllib.parse
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, WebSocket, status

from layerwatch.server.settings import Settings

# Open even when a token is set: start-up checks and load balancers poll it.
OPEN_PATHS = frozenset({"/api/health"})

# Application close code for a websocket refused for its token (4000-4999 are the
# application's own; 4401 reads as HTTP 401). Browsers see it in CloseEvent.code.
CLOSE_UNAUTHORIZED = 4401

TOKEN_REQUIRED = "this server requires an access token: send 'Authorization: Bearer <token>'"
TOKEN_WRONG = "the access token is wrong"


@dataclass(frozen=True)
class Access:
    """What a request may read and send: every project (`project` None), or one project's runs."""

    project: str | None = None

    def allows(self, project: str) -> bool:
        return self.project is None or self.project == project

    def refusal(self, run_id: str, project: str) -> str:
        """Why this access may not send to run `run_id` of `project` (which it does not allow)."""
        return (
            f"this token is for project {self.project!r} only, but run {run_id!r} belongs to project "
            f"{project!r}: use that project's token (or the server's) to send it"
        )


EVERYTHING = Access()


class Refused(Exception):
    """A token that opens nothing here; the message says what is wrong, never the token."""


def access_for(offered: str | None, settings: Settings) -> Access:
    """The access `offered` (a token, or None) opens on a server with `settings`; else Refused."""
    if not settings.auth_required:
        return EVERYTHING
    if not offered:
        raise Refused(TOKEN_REQUIRED)
    given = offered.encode()
    granted: Access | None = None
    # Every token compared, match or not: the time taken is the same whichever one matches.
    if settings.token is not None and hmac.compare_digest(given, settings.token.encode()):
        granted = EVERYTHING
    for project, token in settings.project_tokens.items():
        if hmac.compare_digest(given, token.encode()):
            granted = granted or Access(project)
    if granted is None:
        raise Refused(TOKEN_WRONG)
    return granted


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None without the header.

    Any other scheme is a ValueError that names the scheme (never the credential).
    """
    if not authorization:
        return None
    scheme, _, credential = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise ValueError(f"expected 'Authorization: Bearer <token>', but got an authorization of scheme {scheme!r}")
    return credential.strip()


def require_token(request: Request) -> Access:
    """FastAPI dependency for the REST routers: what this request may see, else 401.

    Routes take it again as `AccessDep`; FastAPI runs it once per request.
    """
    settings: Settings = request.app.state.settings
    route = request.scope.get("route")
    if not settings.auth_required or getattr(route, "path", None) in OPEN_PATHS:
        return EVERYTHING
    try:
        return access_for(bearer_token(request.headers.get("authorization")), settings)
    except (ValueError, Refused) as exc:
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED, detail=str(exc), headers={"WWW-Authenticate": "Bearer"}
        ) from None


def require_every_project(access: Annotated[Access, Depends(require_token)]) -> None:
    """FastAPI dependency for what reaches every project (webhooks): 403 for a project token.

    It reads the token through `require_token`, which FastAPI then runs once per request
    for the router and the route alike."""
    if access.project is not None:
        raise HTTPException(
            status_code=status.HTTP_403_FORBIDDEN,
            detail=(
                f"this token is for project {access.project!r} only; webhooks receive every project's "
                "alerts, so managing them needs the server's token (layerwatch serve --token)"
            ),
        )


def websocket_access(websocket: WebSocket, settings: Settings) -> Access:
    """As access_for, for a websocket: the Authorization header, else `?token=`; Refused if neither opens."""
    if not settings.auth_required:
        return EVERYTHING
    try:
        offered = bearer_token(websocket.headers.get("authorization"))
    except ValueError as exc:
        raise Refused(str(exc)) from None
    if offered is None:
        offered = websocket.query_params.get("token")
    return access_for(offered, settings)


def is_loopback(host: str) -> bool:
    """Whether listening on `host` is reachable from this machine only.

    A name is resolved (that costs a lookup, once at start-up); it counts as loopback
    only if every address it resolves to is. An unresolvable name does not.
    """
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def exposure_warning(host: str, port: int, token: str | None, project_tokens: bool = False) -> str | None:
    """The start-up warning for a server others can reach that asks them for no token; else None."""
    if token is not None or project_tokens or is_loopback(host):
        return None
    where = "all interfaces" if host in ("0.0.0.0", "::", "") else "a non-loopback address"
    return (
        f"WARNING: listening on {host}:{port} ({where}) without an access token: anyone who can reach it "
        "can read every run and send data to this server. Start it with --token <secret> (or set "
        "LAYERWATCH_TOKEN), and pass the same token to monitor.attach(..., token=...) and the dashboard."
    )


class RedactTokens(logging.Filter):
    """A logging filter that blanks `token=...` in query strings (uvicorn logs every websocket's
    path with its query, and a dashboard's /ws/live carries the token there), whatever way the key is
    spelt: the server reads `?%74oken=T` (percent-encoded) as `?token=T`, so the filter does too."""

    _PATTERN = re.compile(r"([?&])([^=&\s\"']{1,64})=([^&\s\"']*)")

    def filter(self, record: logging.LogRecord) -> bool:
        # Argument by argument, keeping their shape: uvicorn's access formatter unpacks them.
        if isinstance(record.args, tuple):
            record.args = tuple(self._redact(arg) for arg in record.args)
        record.msg = self._redact(record.msg)
        return True

    def _redact(self, value: Any) -> Any:
        if not isinstance(value, str) or "=" not in value:
            return value
        return self._PATTERN.sub(self._blank, value)

    @staticmethod
    def _blank(match: re.Match[str]) -> str:
        key = urllib.parse.unquote_plus(match.group(2)).strip().lower()
        return f"{match.group(1)}{match.group(2)}=***" if key == "token" else match.group(0)
