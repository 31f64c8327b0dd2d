"""The one settings object of a server process, validated when it is built.

A bad value fails at start-up with a message naming it, not at the first
request that happens to need it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from client_hook import wire
from layerwatch.server import origins
from layerwatch.server.webhooks import destinations


def check_webhook_url(url: object) -> str:
    """`url` if it is an absolute http(s) URL with a host; else ValueError naming it."""
    if not isinstance(url, str):
        raise ValueError(f"webhook URL must be a string, but got {url!r}")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError as exc:
        raise ValueError(f"webhook URL {url!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"webhook URL {url!r} must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None or any(c.isspace() for c in url):
        # Never deliverable as written (urllib sends no credentials from the URL), and a credential in it
        # would be shown wherever the URL is.
        raise ValueError(f"webhook URL {url!r} must have no user:password@ part and no spaces")
    return url


def check_webhook_destination(url: str, allow_private: bool) -> str:
    """`url` (check_webhook_url), refused with ValueError if it points at an internal address
    written out (destinations.refusal) unless `allow_private`."""
    check_webhook_url(url)
    problem = None if allow_private else destinations.refusal(url)
    if problem:
        raise ValueError(problem)
    return url


def check_project_tokens(project_tokens: object, server_token: str | None) -> None:
    """ValueError naming the project (never a token) unless every project has a distinct non-empty token."""
    if not isinstance(project_tokens, dict):
        raise ValueError(f"project_tokens must be a dict of project -> token, but got {type(project_tokens).__name__}")
    owners: dict[str, str] = {}
    for project, token in project_tokens.items():
        if not isinstance(project, str) or not project:
            raise ValueError(f"a project token's project must be a non-empty string, but got {project!r}")
        if not isinstance(token, str) or not token:
            raise ValueError(f"the token of project {project!r} must be a non-empty string")
        # One token, one meaning: a shared token would open whichever project was checked first.
        if token == server_token:
            raise ValueError(f"the token of project {project!r} is the server's token: give the project its own")
        if token in owners:
            raise ValueError(f"projects {owners[token]!r} and {project!r} have the same token: give each its own")
        owners[token] = project


def parse_project_tokens(entries: list[str]) -> dict[str, str]:
    """`["vision=T1", "nlp=T2"]` (--project-token, LAYERWATCH_PROJECT_TOKENS) as {project: token}.

    A bad entry is a ValueError that names its project part or position, never its token.
    """
    tokens: dict[str, str] = {}
    for position, entry in enumerate(entries, start=1):
        project, sep, token = entry.partition("=")
        project, token = project.strip(), token.strip()
        if not sep or not project or not token:
            shown = repr(project) if project else f"#{position}"
            raise ValueError(f"project token {shown} must be written PROJECT=TOKEN, both non-empty")
        if project in tokens:
            raise ValueError(f"project {project!r} is given a token twice")
        tokens[project] = token
    return tokens


@dataclass(frozen=True)
class Settings:
    """Where to listen, where to store, who may send, and where alerts are posted."""

    host: str = "127.0.0.1"
    port: int = 8000
    db_url: str = "sqlite:///./layerwatch.db"
    token: str | None = None
    # project -> its token: that project's runs only (see server/auth.py).
    project_tokens: dict[str, str] = field(default_factory=dict)
    max_message_bytes: int = wire.MAX_MESSAGE_BYTES
    webhooks: list[str] = field(default_factory=list)
    # Signs every webhook without a secret of its own (env LAYERWATCH_WEBHOOK_SECRET).
    webhook_secret: str | None = None
    webhook_min_severity: str = "warning"  # for the --webhook ones; REST webhooks say their own
    # How long an undelivered alert keeps being retried before it is marked failed.
    webhook_retry_for_s: float = 24 * 3600.0
    webhook_backoff_s: float = 1.0  # the first retry comes after up to this long; then doubling
    webhook_backoff_max_s: float = 600.0
    webhook_timeout_s: float = 10.0  # per request
    # At most this many requests to one webhook per window; the rest wait their turn.
    webhook_rate_limit: int = 30
    webhook_rate_window_s: float = 60.0
    # Where the dashboard is reached from outside, for the links in webhooks
    # (default http://{host}:{port}).
    public_url: str | None = None
    # A `running` run nothing arrived from for this long is marked `crashed` (clients send a
    # heartbeat every wire.HEARTBEAT_S seconds while attached; any later frame revives it).
    heartbeat_timeout_s: float = 60.0
    # The Host names requests may carry (DNS rebinding fails otherwise); None: origins.default_hosts.
    allowed_hosts: list[str] | None = None
    # Browser origins besides the server's own that may open its websockets (cross-site hijacking).
    allow_origins: list[str] = field(default_factory=list)
    # Webhooks may post to loopback, private and link-local addresses (a receiver on this machine or LAN).
    webhook_allow_private: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"host must be a non-empty string, but got {self.host!r}")
        # port 0 lets the OS pick a free port (handy in tests).
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be an integer from 0 to 65535, but got {self.port!r}")
        if not isinstance(self.db_url, str):
            raise ValueError(f"db_url must be a string, but got {self.db_url!r}")
        try:
            make_url(self.db_url)
        except ArgumentError as exc:
            raise ValueError(f"db_url {self.db_url!r} is not a database URL SQLAlchemy can parse: {exc}") from None
        if self.token is not None and (not isinstance(self.token, str) or not self.token):
            raise ValueError(f"token must be a non-empty string or None, but got {self.token!r}")
        check_project_tokens(self.project_tokens, self.token)
        if (
            not isinstance(self.max_message_bytes, int)
            or isinstance(self.max_message_bytes, bool)
            or self.max_message_bytes <= 0
        ):
            raise ValueError(f"max_message_bytes must be a positive integer, but got {self.max_message_bytes!r}")
        for url in self.webhooks:
            check_webhook_destination(url, self.webhook_allow_private)
        if self.webhook_secret is not None and (not isinstance(self.webhook_secret, str) or not self.webhook_secret):
            raise ValueError(f"webhook_secret must be a non-empty string or None, but got {self.webhook_secret!r}")
        if self.webhook_min_severity not in wire.SEVERITIES:
            raise ValueError(
                f"webhook_min_severity must be one of {list(wire.SEVERITIES)}, but got {self.webhook_min_severity!r}"
            )
        for name in (
            "webhook_retry_for_s",
            "webhook_backoff_s",
            "webhook_backoff_max_s",
            "webhook_timeout_s",
            "webhook_rate_window_s",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, but got {value!r}")
        timeout = self.heartbeat_timeout_s
        # Finite too: an infinite timeout would never mark a run crashed (and NaN never compares).
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout < math.inf:
            raise ValueError(f"heartbeat_timeout_s must be a positive, finite number of seconds, but got {timeout!r}")
        if (
            not isinstance(self.webhook_rate_limit, int)
            or isinstance(self.webhook_rate_limit, bool)
            or (self.webhook_rate_limit <= 0)
        ):
            raise ValueError(f"webhook_rate_limit must be a positive integer, but got {self.webhook_rate_limit!r}")
        if self.public_url is not None:
            parts = urlsplit(self.public_url) if isinstance(self.public_url, str) else None
            if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"public_url must be an http:// or https:// URL, but got {self.public_url!r}")
        # Normalised as browsers and Host headers spell them (frozen: set through object.__setattr__).
        if self.allowed_hosts is not None:
            object.__setattr__(self, "allowed_hosts", [origins.check_host(h) for h in self.allowed_hosts])
        object.__setattr__(self, "allow_origins", [origins.check_origin(o) for o in self.allow_origins])

    @property
    def hosts(self) -> list[str]:
        """The Host names this server answers to (`allowed_hosts`, else the defaults for its bind address)."""
        if self.allowed_hosts is not None:
            return self.allowed_hosts
        return origins.default_hosts(self.host, self.public_url)

    @property
    def auth_required(self) -> bool:
        """Whether every request must carry a token (the server's or a project's)."""
        return self.token is not None or bool(self.project_tokens)

    @property
    def base_url(self) -> str:
        """The dashboard's address as links in webhooks give it: public_url, else http://host:port."""
        if self.public_url:
            return self.public_url.rstrip("/")
        # A wildcard address is not one a receiver could follow back.
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"
