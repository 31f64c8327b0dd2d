"""The webhook REST shapes: `WebhookCreate` comes in; the `...Public` ones go out (never a secret)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from client_hook import wire
from layerwatch.server.settings import check_webhook_url

Severity = Literal[wire.SEVERITIES]  # type: ignore[valid-type]


class WebhookCreate(BaseModel):
    url: str = Field(max_length=2048, examples=["https://hooks.slack.com/services/T000/B000/XXXX"])
    project: str | None = Field(default=None, max_length=wire.MAX_NAME_LEN, description="null: every project")
    min_severity: Severity = "warning"
    secret: str | None = Field(
        default=None, min_length=1, max_length=512, description="signs the POSTs; write-only, never returned"
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        return check_webhook_url(url)  # its ValueError becomes a 422 naming the URL


class WebhookPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    url: str
    project: str | None
    min_severity: str
    signed: bool
    source: str  # "config" (--webhook) or "api"
    created_at: float


class AttemptPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    number: int
    at: float
    status_code: int | None
    latency_ms: float | None
    error: str | None
    outcome: str  # delivered | retry | failed


class DeliveryPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    webhook_id: int | None
    alert_id: int
    run_id: str
    url: str
    severity: str
    rule: str
    status: str  # pending | delivered | failed
    attempts: int
    created_at: float
    next_attempt_at: float | None
    finished_at: float | None
    last_status_code: int | None
    last_error: str | None
    attempt_log: list[AttemptPublic]


class AlertDeliveriesPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    alert_id: int
    state: str  # failed if any failed, else pending if any is, else delivered
    delivered: int
    pending: int
    failed: int
