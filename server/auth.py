"""Access tokens: who may read runs (REST, /ws/live) and who may send them (/ws/ingest).

A server started with a token (`layerwatch serve --token T`, env
LAYERWATCH_TOKEN) requires it everywhere data goes in or out:

- REST under /api: `Authorization: Bearer T`, else 401 with a JSON `detail`
  and `WWW-Authenticate: Bearer`. `/api/health` stays open (it is what
  start-up checks poll); its body has `"auth": "token"` when one is required.
- websockets: the same header, or `?token=T`, because a browser cannot set
  headers on a websocket. A refused /ws/live is closed with CLOSE_UNAUTHORIZED.

The dashboard's own files (HTML/JS/CSS, plotly.min.js) need no token: the page
must load to ask for one. Tokens are compared with hmac.compare_digest, so the
time a wrong guess takes says nothing about how much of it was right.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
import socket
from typing import Any

from fastapi import HTTPException, Request, WebSocket, status

# Open even when a token is set: start-up checks and load balancers poll it.
OPEN_PATHS = frozenset({"/api/health"})

# Application close code for a websocket refused for its token (4000-4999 are the
# application's own; 4401 reads as HTTP 401). Browsers see it in CloseEvent.code.
CLOSE_UNAUTHORIZED = 4401

TOKEN_REQUIRED = "this server requires an access token: send 'Authorization: Bearer <token>'"
TOKEN_WRONG = "the access token is wrong"


def token_problem(offered: str | None, expected: str | None) -> str | None:
    """None if `offered` may pass a server whose token is `expected`; else what is wrong, in words."""
    if expected is None:
        return None
    if not offered:
        return TOKEN_REQUIRED
    if not hmac.compare_digest(offered.encode(), expected.encode()):
        return TOKEN_WRONG
    return None


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


def require_token(request: Request) -> None:
    """FastAPI dependency for the REST routers: 401 unless the request carries the server's token."""
    expected = request.app.state.settings.token
    route = request.scope.get("route")
    if expected is None or getattr(route, "path", None) in OPEN_PATHS:
        return
    try:
        problem = token_problem(bearer_token(request.headers.get("authorization")), expected)
    except ValueError as exc:
        problem = str(exc)
    if problem is not None:
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED, detail=problem, headers={"WWW-Authenticate": "Bearer"}
        )


def websocket_token_problem(websocket: WebSocket, expected: str | None) -> str | None:
    """As token_problem, for a websocket: the Authorization header, else `?token=`."""
    if expected is None:
        return None
    try:
        offered = bearer_token(websocket.headers.get("authorization"))
    except ValueError as exc:
        return str(exc)
    if offered is None:
        offered = websocket.query_params.get("token")
    return token_problem(offered, expected)


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


def exposure_warning(host: str, port: int, token: str | None) -> str | None:
    """The start-up warning for a server others can reach that asks them for no token; else None."""
    if token is not None or is_loopback(host):
        return None
    where = "all interfaces" if host in ("0.0.0.0", "::", "") else "a non-loopback address"
    return (
        f"WARNING: listening on {host}:{port} ({where}) without an access token: anyone who can reach it "
        "can read every run and send data to this server. Start it with --token <secret> (or set "
        "LAYERWATCH_TOKEN), and pass the same token to monitor.attach(..., token=...) and the dashboard."
    )


class RedactTokens(logging.Filter):
    """A logging filter that blanks `token=...` in query strings (uvicorn logs every websocket's
    path with its query, and a dashboard's /ws/live carries the token there)."""

    _PATTERN = re.compile(r"([?&]token=)[^&\s\"']*")

    def filter(self, record: logging.LogRecord) -> bool:
        # Argument by argument, keeping their shape: uvicorn's access formatter unpacks them.
        if isinstance(record.args, tuple):
            record.args = tuple(self._redact(arg) for arg in record.args)
        record.msg = self._redact(record.msg)
        return True

    def _redact(self, value: Any) -> Any:
        return self._PATTERN.sub(r"\1***", value) if isinstance(value, str) and "token=" in value else value
