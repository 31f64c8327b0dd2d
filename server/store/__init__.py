"""Storage: the data functions over the tables, by concern, and all of the server's SQL.

    writes.py   ingest_batch: one client batch, one transaction, idempotent per (run, rank, seq)
    runs.py     run rows: the runs list, one run, projects, scalar keys, stored series, mark_crashed
    series.py   scalar / heatmap / layer / histogram series, downsampled through the rollups
    rollup.py   the step rollups: kept current by writes.py, read by series.py, filled at init_db
    steps.py    a stored run read back by step (every rank's signals), for the diagnosis replay
    alerts.py   one alert per (run, rule, layer): upsert_alert, list_alerts
    codec.py    histogram bin counts packed as one blob per row

Keyword-only arguments, no HTTP. Value types (`Finding`, `RunInfo`, `AlertInfo`,
`IngestResult`, `StoredRun`) live in `layerwatch.server.records`, which rules, routes and
webhooks import without importing storage. Callers write `store.list_runs(...)`: every public
function is re-exported here, but for the rollup machinery, which is used as a module
(`from layerwatch.server.store import rollup`; its functions take a `rollup.Spec`).

Outside this package only `server/db.py` runs SQL (the SQLite PRAGMAs and the added columns
of engine setup), and one module holds storage: `layerwatch.server.webhooks.store`, all the
SQL on the webhook package's own tables (webhooks/tables.py), which no module here reads.
tests/test_layout.py keeps it so.
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
    StoredRun,
    UnknownRunError,
)
from layerwatch.server.store.alerts import list_alerts, upsert_alert
from layerwatch.server.store.codec import pack_counts, unpack_counts
from layerwatch.server.store.runs import (
    find_run,
    forward_order,
    get_run,
    list_runs,
    mark_crashed,
    run_name_and_project,
    run_projects,
    run_secret_hashes,
    run_series,
    scalar_keys,
    secret_hash,
)
from layerwatch.server.store.series import (
    DEFAULT_MAX_POINTS,
    HEATMAP_STATS,
    heatmap,
    histogram_series,
    layer_series,
    scalar_series,
)
from layerwatch.server.store.steps import StepData, read_steps, stored_run
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
    "StepData",
    "StoredRun",
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
    "mark_crashed",
    "pack_counts",
    "read_steps",
    "run_name_and_project",
    "run_projects",
    "run_secret_hashes",
    "run_series",
    "scalar_keys",
    "scalar_series",
    "secret_hash",
    "stored_run",
    "unpack_counts",
    "upsert_alert",
]
