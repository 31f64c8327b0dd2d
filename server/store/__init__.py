"""Storage: the data functions over the tables, by concern, and all of the server's run SQL.

    writes.py   ingest_batch: one client batch, one transaction, idempotent per (run, seq)
    runs.py     run reads: the runs list, one run, projects, scalar keys, stored series
    series.py   scalar / heatmap / layer / histogram series, downsampled through the rollups
    alerts.py   one alert per (run, rule, layer): upsert_alert, list_alerts
    codec.py    histogram bin counts packed as one blob per row

Keyword-only arguments, no HTTP. Value types (`Finding`, `RunInfo`, `AlertInfo`,
`IngestResult`) live in `layerwatch.server.records`, which rules, routes and webhooks import
without importing storage. The step rollups are `layerwatch.server.rollup`; the webhook
outbox keeps its own tables and SQL in `layerwatch.server.webhooks.store`. Callers write
`store.list_runs(...)`: every public function is re-exported here.
"""

from client_hook.wire import SEVERITIES
from layerwatch.server.records import (
    ALERT_ESCALATED,
    ALERT_NEW,
    ALERT_UPDATED,
    AlertInfo,
    Finding,
    IngestResult,
    RunInfo,
    UnknownRunError,
)
from layerwatch.server.store.alerts import list_alerts, upsert_alert
from layerwatch.server.store.codec import pack_counts, unpack_counts
from layerwatch.server.store.runs import (
    find_run,
    forward_order,
    get_run,
    list_runs,
    run_projects,
    run_series,
    scalar_keys,
)
from layerwatch.server.store.series import (
    DEFAULT_MAX_POINTS,
    HEATMAP_STATS,
    heatmap,
    histogram_series,
    layer_series,
    scalar_series,
)
from layerwatch.server.store.writes import RaiseAlert, ingest_batch

__all__ = [
    "ALERT_ESCALATED",
    "ALERT_NEW",
    "ALERT_UPDATED",
    "DEFAULT_MAX_POINTS",
    "HEATMAP_STATS",
    "SEVERITIES",
    "AlertInfo",
    "Finding",
    "IngestResult",
    "RaiseAlert",
    "RunInfo",
    "UnknownRunError",
    "find_run",
    "forward_order",
    "get_run",
    "heatmap",
    "histogram_series",
    "ingest_batch",
    "layer_series",
    "list_alerts",
    "list_runs",
    "pack_counts",
    "run_projects",
    "run_series",
    "scalar_keys",
    "scalar_series",
    "unpack_counts",
    "upsert_alert",
]
