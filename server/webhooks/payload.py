"""What a webhook POSTs: the alert as JSON, with a one-line `text` so a Slack incoming-webhook URL works as is.

`snapshot` freezes the alert when it is raised (into the outbox row);
`render` adds what belongs to one attempt (the delivery id, `sent_at`, the
dashboard link) and returns the exact bytes that are signed and sent.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from layerwatch.server import __version__
from layerwatch.server.schemas import json_safe
from layerwatch.server.webhooks.signing import IDEMPOTENCY_HEADER, SIGNATURE_HEADER

# A Slack message line stays readable up to about this long.
MAX_TEXT_MESSAGE = 300


def snapshot(
    *,
    alert_id: int,
    rule: str,
    severity: str,
    change: str,
    step: int,
    first_step: int,
    count: int,
    layer: str | None,
    message: str,
    remedy: str,
    evidence: dict[str, Any] | None,
    run: str,
    run_id: str,
    project: str,
) -> dict[str, Any]:
    """The alert's fields as the outbox stores them; NaN and ±Infinity in evidence become null."""
    return {
        "alert_id": alert_id,
        "rule": rule,
        "severity": severity,
        "change": change,  # "new" or "escalated"
        "step": step,
        "first_step": first_step,
        "count": count,
        "layer": layer,
        "message": message,
        "remedy": remedy,
        "evidence": json_safe(evidence),
        "run": run,
        "run_id": run_id,
        "project": project,
    }


def run_link(base_url: str, run_id: str) -> str:
    return f"{base_url.rstrip('/')}/#/run/{run_id}"


def text_line(alert: dict[str, Any], link: str) -> str:
    """'[critical] loss_diverging in run 'x' at step 120: the loss rose 10x … <link>' on one line."""
    message = " ".join(str(alert["message"]).split())  # one line, whatever the rule wrote
    if len(message) > MAX_TEXT_MESSAGE:
        message = message[: MAX_TEXT_MESSAGE - 1] + "…"
    where = f" (layer {alert['layer']})" if alert.get("layer") else ""
    escalated = " (escalated)" if alert.get("change") == "escalated" else ""
    return (
        f"[{alert['severity']}]{escalated} {alert['rule']} in run '{alert['run']}'{where}"
        f" at step {alert['step']}: {message} {link}"
    )


def iso_utc(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def render(alert: dict[str, Any], *, delivery_id: str, sent_at: float, base_url: str, attempt: int = 1) -> bytes:
    """The exact body of one attempt: compact, sorted keys, UTF-8, never NaN."""
    link = run_link(base_url, alert["run_id"])
    body = {
        **alert,
        "url": link,
        "text": text_line(alert, link),
        "sent_at": iso_utc(sent_at),
        "delivery_id": delivery_id,
        "attempt": attempt,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def headers(*, delivery_id: str, signature: str | None) -> dict[str, str]:
    out = {
        "Content-Type": "application/json",
        "User-Agent": f"layerwatch/{__version__}",
        IDEMPOTENCY_HEADER: delivery_id,
    }
    if signature is not None:
        out[SIGNATURE_HEADER] = signature
    return out
