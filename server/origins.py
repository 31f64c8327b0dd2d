"""Who may talk to this server from a browser: the `Host` it is reached by, and the `Origin` of a websocket.

Two attacks a token-less server on loopback (the default) was open to (red
team, issue #17 item 1):

- cross-site websocket hijacking: any web page the user visits may open
  `ws://127.0.0.1:8000/ws/live` (browsers do not apply the same-origin policy to
  websockets) and read every run, or `/ws/ingest` and store a run. A browser
  always sends `Origin`; a websocket is accepted only when that origin is the
  server's own (the dashboard's page: its `Origin` names the `Host` it was
  served from) or one the operator listed (`--allow-origin`). Clients that are
  not browsers send no `Origin` and are not affected.
- DNS rebinding: a page on `evil.example` whose name is made to resolve to
  127.0.0.1 is same-origin with itself while it reads this server. Its requests
  carry `Host: evil.example`; every request (REST, the dashboard's files and
  the websockets) is refused unless its `Host` is one the server is served
  under: by default the bind address, `localhost`, `127.0.0.1` and `::1`, the
  host of `--public-url`, and any host when bound to a wildcard address
  (0.0.0.0, ::) unless `--allowed-host` names them (Starlette's
  TrustedHostMiddleware answers 400).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from fastapi import WebSocket

WILDCARD_BINDS = ("0.0.0.0", "::")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def check_origin(origin: str) -> str:
    """An --allow-origin value as browsers send it (scheme://host[:port], lower case), or ValueError."""
    parts = urlsplit(origin.strip()) if isinstance(origin, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"allowed origin must be like http://host:port (no path), but got {origin!r}")
    if parts.query or parts.fragment or parts.username:
        raise ValueError(f"allowed origin must be like http://host:port (no path), but got {origin!r}")
    return f"{parts.scheme}://{parts.netloc.lower()}"


def check_host(host: str) -> str:
    """An --allowed-host value: a host name or address without a port, "*" or "*.domain", or ValueError."""
    if not isinstance(host, str) or not host.strip() or any(c in host for c in "/:@ ") and not _ipv6(host):
        raise ValueError(f"allowed host must be a host name or address without a port, but got {host!r}")
    host = host.strip().lower()
    if "*" in host[1:] or (host.startswith("*") and host != "*" and not host.startswith("*.")):
        raise ValueError(f"allowed host may only start with '*.' as a wildcard, but got {host!r}")
    return host


def _ipv6(host: str) -> bool:
    return ":" in host and all(c in "0123456789abcdefABCDEF:." for c in host.strip("[]"))


def default_hosts(bind: str, public_url: str | None) -> list[str]:
    """The hosts a server bound to `bind` is reached under, when the operator named none."""
    if bind in WILDCARD_BINDS:
        return ["*"]  # reachable under any of the machine's names: the operator names them to narrow it
    hosts = [bind.lower(), *LOOPBACK_NAMES]
    if public_url:
        name = urlsplit(public_url).hostname
        if name:
            hosts.append(name.lower())
    return list(dict.fromkeys(hosts))


def origin_allowed(websocket: WebSocket, allowed: list[str]) -> bool:
    """Whether a websocket's `Origin` may connect: none (not a browser), the server's own, or listed."""
    origin = websocket.headers.get("origin")
    if origin is None:
        return True
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False  # "null" (a sandboxed frame, a file:// page) and anything else that is no web origin
    own = websocket.headers.get("host", "").lower()
    return parts.netloc.lower() == own or f"{parts.scheme}://{parts.netloc.lower()}" in allowed


async def refuse_origin(websocket: WebSocket) -> None:
    """Close a websocket from a foreign origin before accepting it (the browser sees an HTTP 403)."""
    await websocket.close(code=1008, reason="origin not allowed")
