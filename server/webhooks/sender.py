"""The one blocking POST of a webhook attempt, with the standard library's urllib.

Runs in the webhook worker's threads, never on the event loop. Redirects are
not followed: a signed POST re-sent somewhere else (or turned into a GET) is
not what the receiver's owner configured, so a 3xx is reported as it is.
"""

from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import timezone
from email.utils import parsedate_to_datetime

# What of an error response's body is kept with the attempt.
MAX_ERROR_BODY = 300


@dataclass(frozen=True)
class Answer:
    """What one attempt got: a status code, or an error with none (connection refused, timeout)."""

    status_code: int | None
    latency_ms: float
    error: str | None = None
    retry_after_s: float | None = None  # a 429's or 503's Retry-After, in seconds from now
    final: bool = False  # never worth another try (a destination the server refuses to post to)

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # urllib then raises the 3xx as an HTTPError


_OPENER = urllib.request.build_opener(_NoRedirect)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> Answer:
    """POST `body` to `url`; never raises for what the network or the receiver does."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    start = time.perf_counter()
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            response.read(MAX_ERROR_BODY)  # let the receiver finish its answer
            return Answer(response.status, _ms(start))
    except urllib.error.HTTPError as exc:
        latency = _ms(start)
        try:
            text = exc.read(MAX_ERROR_BODY).decode("utf-8", "replace").strip()
        except OSError:
            text = ""
        # The body's length only: an internal service's answer is not echoed back to whoever added the URL.
        error = f"HTTP {exc.code} {exc.reason}" + (f" ({len(text)} bytes of body)" if text else "")
        retry_after = parse_retry_after(exc.headers.get("Retry-After")) if exc.headers else None
        return Answer(exc.code, latency, error, retry_after)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(reason, TimeoutError):
            reason = f"no answer within {timeout:g} s"
        return Answer(None, _ms(start), f"{type(exc).__name__}: {reason}")


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 1)
