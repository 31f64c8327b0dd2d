"""Webhook signatures: `X-Layerwatch-Signature: sha256=<hex HMAC-SHA256 of the raw body>`.

The body carries `sent_at` and `delivery_id`, so the signature covers both: a
receiver that checks the signature, the age of `sent_at` and whether it has
seen the `delivery_id` (also sent as `Idempotency-Key`) rejects replays and
drops duplicates.
"""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_HEADER = "X-Layerwatch-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
PREFIX = "sha256="


def sign(body: bytes, secret: str) -> str:
    """The signature header's value for `body`."""
    return PREFIX + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def verify(body: bytes, secret: str, header: str | None) -> bool:
    """Whether `header` is the signature of `body` under `secret` (in constant time)."""
    return header is not None and hmac.compare_digest(sign(body, secret), header)
