"""The JSON shapes the server sends: REST response models and live-push events.

Suffixes say the direction (`RunPublic` goes out). Every float that leaves the
server passes `json_safe`/`Finite` (server/jsonvalues.py): NaN and ±Infinity become null, because a
browser's JSON.parse rejects them (a NaN loss is data to show, not a reason
for the dashboard to break).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict

from layerwatch.server.jsonvalues import json_safe

Finite = Annotated[float | None, BeforeValidator(json_safe)]
FiniteList = Annotated[list[float | None], BeforeValidator(json_safe)]
SafeJSON = Annotated[Any, BeforeValidator(json_safe)]


class AlertCounts(BaseModel):
    info: int = 0
    warning: int = 0
    critical: int = 0


class RunPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    project: str
    status: str
    created_at: Finite
    updated_at: Finite
    finished_at: Finite
    last_step: int | None
    last_loss: Finite
    every: int | None
    alert_counts: AlertCounts
    # Frames the client dropped, by kind or reason (null: none): where the record has gaps.
    dropped: dict[str, int] | None = None


class SeriesPublic(BaseModel):
    layer: str
    param: str
    kind: str


class RunDetail(RunPublic):
    # `model` is a field name pydantic reserves a prefix for; it is the wire's name.
    model_config = ConfigDict(from_attributes=True, protected_namespaces=())

    model: SafeJSON
    optimizer: SafeJSON
    config: SafeJSON
    scalar_keys: list[str]
    series: list[SeriesPublic]


class ScalarSeriesPublic(BaseModel):
    key: str
    steps: list[int]
    values: FiniteList


class HeatmapPublic(BaseModel):
    kind: str
    stat: str
    rows: list[str]
    layers: list[str]
    params: list[str]
    steps: list[int]
    z: list[FiniteList]


class LayerSeriesPublic(BaseModel):
    layer: str
    param: str
    kind: str
    steps: list[int]
    mean: FiniteList
    std: FiniteList
    rms: FiniteList
    norm: FiniteList
    min: FiniteList
    max: FiniteList
    nonfinite: list[int | None]
    zero_frac: FiniteList
    numel: list[int | None]
    update_ratio: FiniteList
    sat_frac: FiniteList


class HistogramSeriesPublic(BaseModel):
    layer: str
    param: str
    kind: str
    bins: int
    steps: list[int]
    lo: FiniteList
    hi: FiniteList
    counts: list[list[int]]


class AlertPublic(BaseModel):
    id: int
    rule: str
    severity: str
    step: int
    last_step: int
    count: int
    layer: str | None
    message: str
    remedy: str
    evidence: SafeJSON


class HealthPublic(BaseModel):
    status: str
    version: str
    protocol: int
    # "token" when /api and the websockets want `Authorization: Bearer` (this endpoint never does).
    auth: Literal["token"] | None = None
