"""The one settings object of a server process, validated when it is built.

A bad value fails at start-up with a message naming it, not at the first
request that happens to need it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from client_hook import wire


@dataclass(frozen=True)
class Settings:
    """Where to listen, where to store, and who may send."""

    host: str = "127.0.0.1"
    port: int = 8000
    db_url: str = "sqlite:///./layerwatch.db"
    token: str | None = None
    max_message_bytes: int = wire.MAX_MESSAGE_BYTES
    webhooks: list[str] = field(default_factory=list)

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
        if (
            not isinstance(self.max_message_bytes, int)
            or isinstance(self.max_message_bytes, bool)
            or self.max_message_bytes <= 0
        ):
            raise ValueError(f"max_message_bytes must be a positive integer, but got {self.max_message_bytes!r}")
        for url in self.webhooks:
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise ValueError(f"webhook {url!r} must be an http:// or https:// URL")
