"""The wire schema: every message the client and the server exchange.

Written once, here, and imported by both sides (the server through
`server.ingest`). Pure standard library: no torch, no pydantic, so the server
never imports torch and the client needs nothing beyond torch and websockets.

A websocket text message from the client is one *batch*:

    {"protocol": 1, "frames": [frame, ...]}

and every frame carries `protocol`, `kind`, `run_id` (client-generated),
`seq` (per run, from 0, no gaps) and `step` (optimizer steps, from 0). The
server stores a batch in one transaction, then answers
`{"kind": "ack", "seqs": {run_id: [seq, ...]}}`, preceded by one
`{"kind": "alert", "alert": {...}}` per alert the batch raised or escalated
(the diagnosis runs after the commit, before the ack). A frame that fails
validation is refused alone: the ack lists it under `"refused": [{"index": i,
"error": "..."}]` (never stored, never acked; `split_batch`). A message that is
not a batch is answered `{"kind": "error", "error": "..."}` and the connection
is closed; `"retry": true` in it says the server could not store it for a
passing reason of its own (storage full): the client sends it again later.
Numbers are JSON numbers; NaN and ±Infinity are allowed where they are data
(a NaN loss is a finding, not a bad frame).

A run belongs to the client that started it: its run_start carries a
`secret` (random, per run; the same on every rank), of which the server keeps
only a hash. The first run_start of a run sets it; on each connection, the
frames of such a run are taken only after a run_start with that secret came
over that same connection (a client sends its run_start first on every
connect), else they are refused by name and never take a sequence number. A
run started without a secret (an older client) is written as before.

A distributed training (DDP) is one run sent by each of its processes: every
frame of rank r > 0 carries `rank` (rank 0 may, and a process outside any
process group never does), and each rank numbers its own frames, so a run's
idempotency key is (run_id, rank, seq), rank 0 being the frames without one.
Rank 0 sends everything; a rank r > 0 sends only what differs per rank
(`RANK_KINDS`: its run_start, which joins the run without replacing rank 0's
description, its scalars, its signals, heartbeats and its run_end). Its
frames are acknowledged under `"ranks": {run_id: {"<rank>": [seq, ...]}}` in
the ack; the server stores its scalars under `rank_key(key, rank)`
("loss/rank1") and its signals beside rank 0's, by rank.

Per-layer statistics travel as rows in the column order of
`LAYER_STAT_COLUMNS`, histograms as rows of `HISTOGRAM_COLUMNS`: the same
names are the database columns and the REST field names.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable
from typing import Any

PROTOCOL_VERSION = 1

# Tensor statistics, in the order `client_hook.training.stats.tensor_stats` returns them.
# mean/std/rms/norm/min/max are over the finite elements (std is the population
# std); nonfinite counts NaN/±Inf; zero_frac is the fraction of exact zeros.
STAT_FIELDS: tuple[str, ...] = ("mean", "std", "rms", "norm", "min", "max", "nonfinite", "zero_frac", "numel")

# What a per-layer statistic describes. `weight` rows are parameter values after
# the optimizer step and carry `update_ratio` = ||w_after - w_before|| / ||w_before||.
# Activation rows of saturating modules (Tanh, Sigmoid, ...) carry `sat_frac`, the
# fraction of outputs in the flat tails: |tanh| > 0.99, sigmoid outside [0.01, 0.99].
TENSOR_KINDS: tuple[str, ...] = ("weight", "grad", "activation")
ACTIVATION_PARAM = "output"  # the `param` of an activation row: the module's output

# Every statistic a layer_stats row holds: STAT_FIELDS, then the update ratio (parameters)
# and the saturated fraction (Tanh/Sigmoid outputs). The one list: the tables, the rollups,
# the REST `stat` parameter and the dashboard (served as /static/vocabulary.js) take it.
LAYER_STATS: tuple[str, ...] = (*STAT_FIELDS, "update_ratio", "sat_frac")
LAYER_STAT_COLUMNS: tuple[str, ...] = ("layer", "param", "kind", *LAYER_STATS)
HISTOGRAM_COLUMNS: tuple[str, ...] = ("layer", "param", "kind", "lo", "hi", "counts")
HIST_BINS = 32  # fixed bin count; edges are lo + (hi - lo) * i / HIST_BINS, i = 0..HIST_BINS

# Adding a frame kind: the places that must know it (tests/test_layout.py fails when one does not):
#   1. FRAME_KINDS below, and its fields in _REQUIRED and _OPTIONAL (validation, both sides);
#   2. client_hook/sending/spool.py DROP_ORDER: where it stands when the spool is full;
#   3. server/store/writes.py `_ingest`: the rows it stores (an unstored kind raises there);
#   4. server/diagnosis/history.py, if the rules read it; server/live.py, if dashboards hear it;
#   5. the client code that sends it (client_hook/monitor.py or sending/sender.py), and an example in
#      tests/reliability/badframes.py valid_frames (the fuzzers and the layout test use it);
#   6. the protocol's docs: this module's docstring and README's "REST and websockets".
FRAME_KINDS: tuple[str, ...] = (
    "run_start",
    "scalars",
    "signals",
    "layer_stats",
    "histograms",
    "findings",
    "heartbeat",
    "run_end",
)
# A client sends a `heartbeat` every HEARTBEAT_S seconds while attached (its `step`
# is the latest step, its `time` the client's clock). The server marks a `running`
# run `crashed` when nothing of it arrived for its heartbeat timeout, and `running`
# again if frames come back. `dropped` (on heartbeat and run_end) is the client's
# running count of frames it had to drop, by kind or reason: the run's record of gaps.
HEARTBEAT_S = 10.0
SEVERITIES: tuple[str, ...] = ("info", "warning", "critical")  # rising order: the one definition


def severity_rank(severity: str) -> int:
    """0 for info, 1 for warning, 2 for critical: escalation and webhook minimums compare these."""
    return SEVERITIES.index(severity)


FINDING_FIELDS: tuple[str, ...] = ("rule", "severity", "layer", "message", "remedy", "evidence")

# The always-on per-step signals of a `signals` frame (every optimizer step,
# sampled or not), as the diagnosis rules read them. Each is optional; absent
# means "not observed at this step".
#   training         model.training at the step's (last grad-enabled) forward
#   input_mean/std   of the first floating tensor argument of the model's forward (finite values)
#   input_nonfinite  NaN/Inf count in that input
#   input_fingerprint a cheap hash of that input batch (equal strings: the same batch)
#   output_nonfinite the model's output held NaN/Inf
#   first_nonfinite  the first module, in forward order, whose output went non-finite ("input" if the batch was)
#   grad_norm        global L2 norm of all gradients as the optimizer saw them
#   nonfinite_grads  "layer.param" labels of gradients holding NaN/Inf
#   grads_stale      at the first backward after the previous step, .grad still held that step's values
#   target_counts    {class: count} of the targets logged with mon.log(targets=...)
#   skipped          true: the step's optimizer step did not run (AMP's GradScaler found inf/NaN gradients)
#   grad_norms       every parameter's gradient L2 norm, aligned with run_start's model["tensors"] labels
#                    (model.parameters() order, "layer.param"); null where the parameter had no gradient
#                    (None, or sparse) at this step; NaN/Infinity where it held non-finite values
#   update_ratios    every parameter's ||w_after - w_before|| / ||w_before|| across this optimizer step, from a
#                    fixed subset of its elements, aligned like grad_norms; null where frozen. On a fixed schedule
#                    of steps (every step of the first 50, then every 10th), so the same steps on every machine
#   output_info      the model's output at this step (the first steps, then now and then): {"shape": [...]}, and
#                    for an output with a class (last) dimension "min", "max", "row_sum_error" (max |row sum - 1|),
#                    "logsumexp", "p_max", "p_min" (row means) over its first rows; once the backward reached it,
#                    what its gradient g says of the loss: "grad_row_sum" (max |row sum of g| / mean row |g| sum:
#                    ~0 when the loss applies a softmax), and of the targets t = softmax(rows) - n*g (the cross-
#                    entropy's inverse; "reduction" "mean": n the output's row count, "sum": n = 1) the smallest
#                    element "targets_min", the rows' mean largest "targets_peak", the largest second "targets_second"
#   target_info      from log(targets=...): {"shape": [...], "float": bool}; in the first steps "loss_matches"
#                    (which of "cross_entropy", "nll_of_log" of probability outputs equal the logged loss) or,
#                    for float targets of another shape than the output, "broadcast_matches" and
#                    "aligned_matches" (which of "mse", "l1", "smooth_l1" equal it, broadcast or reshaped)
SIGNAL_FIELDS: tuple[str, ...] = (
    "training",
    "input_mean",
    "input_std",
    "input_nonfinite",
    "input_fingerprint",
    "output_nonfinite",
    "first_nonfinite",
    "grad_norm",
    "nonfinite_grads",
    "grads_stale",
    "target_counts",
    "skipped",
    "grad_norms",
    "update_ratios",
    "output_info",
    "target_info",
)
RUN_END_STATUSES: tuple[str, ...] = ("finished", "crashed")
# What the training's loss is, as `attach(objective=...)` declares it in run_start's config: "minimize"
# (one loss driven down, the default) or "adversarial" (one side of a GAN-like game, whose loss may rise
# while the game goes well: the loss-curve rules do not judge it).
OBJECTIVES: tuple[str, ...] = ("minimize", "adversarial")
# What a rank r > 0 of a distributed training sends: what differs per rank. Per-layer statistics,
# histograms and findings are rank 0's alone (gradients are all-reduced: the same on every rank).
RANK_KINDS: tuple[str, ...] = ("run_start", "scalars", "signals", "heartbeat", "run_end")
MAX_RANK = 2**20 - 1  # far beyond any process group; a bigger "rank" is a bug, not a cluster
MAX_NAME_LEN = 256
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # default server limit for one batch
MAX_COUNT = 2**63 - 1  # seqs, steps and counts are stored as 64-bit signed database integers
# Objects and lists inside a frame (a config, a model description) nest at most this deep: a flattened
# Hydra config is 2-5 levels; 1,000 made Python's repr and JSON encoding of the value itself fail.
MAX_DEPTH = 64
MAX_STEP = 2**53 - 1  # steps beyond are not exact JavaScript numbers: a chart of them collapses


class SchemaError(ValueError):
    """A message that does not follow this schema; the text names what is wrong."""


# ---------------------------------------------------------------- field checks


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _number(v: Any) -> str | None:
    return None if _is_number(v) else "a number"


def _number_or_null(v: Any) -> str | None:
    return None if v is None or _is_number(v) else "a number or null"


def _finite_number(v: Any) -> str | None:
    return None if _is_number(v) and math.isfinite(v) else "a finite number"


def _count(v: Any) -> str | None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        return "a non-negative integer"
    return None if v <= MAX_COUNT else "a non-negative integer below 2**63 (a 64-bit database integer)"


def _step(v: Any) -> str | None:
    problem = _count(v)
    if problem is None and v > MAX_STEP:
        return f"a non-negative integer up to 2**53 - 1 (the dashboard draws steps as JavaScript numbers), not {v}"
    return problem


def _rank(v: Any) -> str | None:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_RANK:
        return f"a process rank: an integer from 0 to {MAX_RANK}"
    return None


def _is_protocol(v: Any) -> bool:
    return type(v) is int and v == PROTOCOL_VERSION  # not True or 1.0, which equal 1 in Python


def _name(v: Any) -> str | None:
    if not isinstance(v, str) or len(v) > MAX_NAME_LEN:
        return f"a string of at most {MAX_NAME_LEN} characters"
    return None if _valid_text(v) else "valid Unicode text (it holds a lone surrogate)"


def _nonempty_name(v: Any) -> str | None:
    if not isinstance(v, str) or not 0 < len(v) <= MAX_NAME_LEN:
        return f"a non-empty string of at most {MAX_NAME_LEN} characters"
    return None if _valid_text(v) else "valid Unicode text (it holds a lone surrogate)"


def _object(v: Any) -> str | None:
    return None if isinstance(v, dict) else "an object"


def _object_or_null(v: Any) -> str | None:
    if v is not None and not isinstance(v, dict):
        return "an object or null"
    return _shallow(v)


def _shallow(v: Any) -> str | None:
    """None when `v` nests at most MAX_DEPTH objects and lists deep and holds only strings that are
    valid Unicode (no lone surrogate: a `\\ud800` escape would make every later answer about its run
    fail to encode); else what is wrong. Iterative: a deep value cannot exhaust the stack here."""
    stack = [(v, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            items = list(value.keys()) + list(value.values())
        elif isinstance(value, list):
            items = value
        elif isinstance(value, str):
            if not _valid_text(value):
                return f"valid Unicode text (a string holds a lone surrogate: {ascii(value[:40])})"
            continue
        else:
            continue
        if depth > MAX_DEPTH:
            return f"at most {MAX_DEPTH} levels of objects and lists deep"
        stack.extend((item, depth + 1) for item in items)
    return None


def _valid_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _one_of(options: tuple[str, ...]) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in options else f"one of {list(options)}"

    return check


def _scalar_values(v: Any) -> str | None:
    if not isinstance(v, dict) or not v:
        return "a non-empty object of name -> number"
    for key, value in v.items():
        if _nonempty_name(key) or not (value is None or _is_number(value)):
            return f"an object of name -> number (entry {key!r}: {value!r} is not)"
    return None


def _model(v: Any) -> str | None:
    if not isinstance(v, dict) or not isinstance(v.get("modules"), list):
        return "an object with a 'modules' list"
    for i, module in enumerate(v["modules"]):
        if not isinstance(module, dict) or _name(module.get("name")) or _name(module.get("type")):
            return f"an object whose modules each have string 'name' and 'type' (module {i} is {_short(module)})"
        params = module.get("params", [])
        if not isinstance(params, list):
            return f"an object whose modules have a 'params' list (module {i} has {_short(params)})"
        for p in params:
            if not (isinstance(p, str) or (isinstance(p, dict) and isinstance(p.get("name"), str))):
                return f"an object whose params are names or objects with a 'name' (module {i} has {_short(p)})"
    if "tensors" in v and _names(v["tensors"]):
        return f"an object whose 'tensors' is a list of names (got {_short(v['tensors'])})"
    deep = _shallow(v)
    return f"an object {deep}" if deep else None


def _rows(
    columns: tuple[str, ...],
    cell_checks: dict[str, Callable[[Any], str | None]],
    plainly_valid: Callable[[list[Any]], bool],
) -> Callable[[Any], str | None]:
    """A check of a list of rows: `plainly_valid` passes the common case in one tight loop;
    anything it doubts goes through `cell_checks`, which accept the same rows and name the bad cell."""

    def check(v: Any) -> str | None:
        if not isinstance(v, list):
            return f"a list of rows [{', '.join(columns)}]"
        if plainly_valid(v):
            return None
        for i, row in enumerate(v):
            if not isinstance(row, list) or len(row) != len(columns):
                return f"a list of rows of {len(columns)} cells [{', '.join(columns)}] (row {i} is {_short(row)})"
            for column, cell in zip(columns, row):
                problem = cell_checks[column](cell)
                if problem:
                    header = ", ".join(columns)
                    return f"a list of rows [{header}] (row {i}: {column!r} must be {problem}, but got {cell!r})"
        return None

    return check


def _bool_or_null(v: Any) -> str | None:
    return None if v is None or isinstance(v, bool) else "true, false or null"


def _name_or_null(v: Any) -> str | None:
    return None if v is None else _name(v)


def _names(v: Any) -> str | None:
    if not isinstance(v, list) or any(_name(n) for n in v):
        return "a list of names"
    return None


def _norms(v: Any) -> str | None:
    if not isinstance(v, list) or any(x is not None and not _is_number(x) for x in v):
        return "a list of numbers or nulls (one per model tensor)"
    return None


def _class_counts(v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, dict) or any(_name(k) or _count(c) for k, c in v.items()):
        return "an object of class -> non-negative integer count, or null"
    return None


def _drop_counts(v: Any) -> str | None:
    if not isinstance(v, dict) or any(_nonempty_name(k) or _count(c) for k, c in v.items()):
        return "an object of {reason: count}"
    return None


def _findings(v: Any) -> str | None:
    """Findings the client made itself (preflight): stored as alerts at the frame's step."""
    if not isinstance(v, list):
        return f"a list of findings {{{', '.join(FINDING_FIELDS)}}}"
    for i, finding in enumerate(v):
        problem = None
        if not isinstance(finding, dict):
            problem = "is not an object"
        elif _nonempty_name(finding.get("rule")):
            problem = "has no 'rule' name"
        elif finding.get("severity") not in SEVERITIES:
            problem = f"has severity {finding.get('severity')!r}, not one of {list(SEVERITIES)}"
        elif _name_or_null(finding.get("layer")):
            problem = "has a 'layer' that is not a name or null"
        elif not isinstance(finding.get("message"), str) or not isinstance(finding.get("remedy"), str):
            problem = "needs string 'message' and 'remedy'"
        elif _object_or_null(finding.get("evidence")):
            problem = "has 'evidence' that is not an object or null"
        if problem:
            return f"a list of findings (finding {i} {problem})"
    return None


def _counts(v: Any) -> str | None:
    if not isinstance(v, list) or len(v) != HIST_BINS or any(_count(c) for c in v):
        return f"a list of {HIST_BINS} non-negative integers"
    return None


# The fast paths of the row checks. Ingest validates every cell of every row (a
# 200-layer model sends ~1,200 rows a step), and a Python call per cell cost more
# than storing the row: these look at whole columns with C-level loops (set(map(type,
# column))). They accept a subset of what the cell checks accept (exact types only),
# so rows they turn down are judged again, cell by cell, for the message.
_NUMBER_OR_NULL_TYPES = frozenset((int, float, type(None)))
_STAT_WIDTH = len(LAYER_STAT_COLUMNS)
_STAT_COUNT_CELLS = tuple(LAYER_STAT_COLUMNS.index(name) for name in ("nonfinite", "numel"))
_HIST_WIDTH = len(HISTOGRAM_COLUMNS)
_KINDS = frozenset(TENSOR_KINDS)


def _plain_names(column: tuple[Any, ...]) -> bool:
    return set(map(type, column)) == {str} and max(map(len, column)) <= MAX_NAME_LEN and _valid_text("".join(column))


def _plain_keys(columns: list[tuple[Any, ...]]) -> bool:
    """The layer, param and kind columns: names, and kinds this schema knows."""
    layers, params, kinds = columns[0], columns[1], columns[2]
    return _plain_names(layers) and _plain_names(params) and set(map(type, kinds)) == {str} and _KINDS >= set(kinds)


def _plain_table(rows: list[Any], width: int) -> list[tuple[Any, ...]] | None:
    """The rows' columns when every row is a list of `width` cells, else None."""
    if set(map(type, rows)) != {list} or set(map(len, rows)) != {width}:
        return None
    return list(zip(*rows))


def _plain_counts(column: tuple[Any, ...]) -> bool:
    return set(map(type, column)) == {int} and min(column) >= 0 and max(column) <= MAX_COUNT


def _plain_stat_rows(rows: list[Any]) -> bool:
    if not rows:
        return True
    columns = _plain_table(rows, _STAT_WIDTH)
    if columns is None or not _plain_keys(columns):
        return False
    if not all(_NUMBER_OR_NULL_TYPES.issuperset(map(type, column)) for column in columns[3:]):
        return False
    return all(_plain_counts(columns[i]) for i in _STAT_COUNT_CELLS)


def _plain_histogram_rows(rows: list[Any]) -> bool:
    if not rows:
        return True
    columns = _plain_table(rows, _HIST_WIDTH)
    if columns is None or not _plain_keys(columns):
        return False
    lo, hi, counts = columns[3], columns[4], columns[5]
    if not _NUMBER_OR_NULL_TYPES.issuperset(map(type, lo)) or not _NUMBER_OR_NULL_TYPES.issuperset(map(type, hi)):
        return False
    if set(map(type, counts)) != {list} or set(map(len, counts)) != {HIST_BINS}:
        return False
    return _plain_counts(tuple(itertools.chain.from_iterable(counts)))


_STAT_CELLS: dict[str, Callable[[Any], str | None]] = {
    "layer": _name,
    "param": _name,
    "kind": _one_of(TENSOR_KINDS),
    **{f: _number_or_null for f in STAT_FIELDS},
    "nonfinite": _count,
    "numel": _count,
    "update_ratio": _number_or_null,
    "sat_frac": _number_or_null,
}
_HIST_CELLS: dict[str, Callable[[Any], str | None]] = {
    "layer": _name,
    "param": _name,
    "kind": _one_of(TENSOR_KINDS),
    "lo": _number_or_null,
    "hi": _number_or_null,
    "counts": _counts,
}

_COMMON: dict[str, Callable[[Any], str | None]] = {
    "protocol": lambda v: (
        None if _is_protocol(v) else f"{PROTOCOL_VERSION} (this server speaks protocol {PROTOCOL_VERSION})"
    ),
    "kind": _one_of(FRAME_KINDS),
    "run_id": _nonempty_name,
    "seq": _count,
    "step": _step,
}

# Required fields per frame kind, beyond the common ones. Optional fields are
# listed in `_OPTIONAL` and checked when present.
_REQUIRED: dict[str, dict[str, Callable[[Any], str | None]]] = {
    "run_start": {"name": _nonempty_name, "project": _nonempty_name, "time": _finite_number, "model": _model},
    "scalars": {"values": _scalar_values, "time": _finite_number},
    "signals": {},
    "findings": {"findings": _findings},
    "layer_stats": {"rows": _rows(LAYER_STAT_COLUMNS, _STAT_CELLS, _plain_stat_rows)},
    "histograms": {"rows": _rows(HISTOGRAM_COLUMNS, _HIST_CELLS, _plain_histogram_rows)},
    "heartbeat": {"time": _finite_number},
    "run_end": {"status": _one_of(RUN_END_STATUSES), "time": _finite_number},
}
_OPTIONAL: dict[str, dict[str, Callable[[Any], str | None]]] = {
    "run_start": {"optimizer": _object_or_null, "config": _object_or_null, "secret": _nonempty_name},
    "scalars": {},
    "signals": {
        "training": _bool_or_null,
        "input_mean": _number_or_null,
        "input_std": _number_or_null,
        "input_nonfinite": _count,
        "input_fingerprint": _name_or_null,
        "output_nonfinite": _bool_or_null,
        "first_nonfinite": _name_or_null,
        "grad_norm": _number_or_null,
        "nonfinite_grads": _names,
        "grads_stale": _bool_or_null,
        "skipped": _bool_or_null,
        "target_counts": _class_counts,
        "grad_norms": _norms,
        "update_ratios": _norms,
        "output_info": _object_or_null,
        "target_info": _object_or_null,
    },
    "findings": {},
    "layer_stats": {"every": _count},
    "histograms": {},
    "heartbeat": {"dropped": _drop_counts},
    "run_end": {"dropped": _drop_counts},
}


def _short(value: Any, limit: int = 80) -> str:
    try:
        text = ascii(value)  # ASCII: a lone surrogate quoted in an error must not break sending it
    except RecursionError:
        return f"a {type(value).__name__} nested too deeply to show"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate_frame(frame: Any) -> dict[str, Any]:
    """Check one frame; return it unchanged or raise SchemaError naming the problem."""
    if not isinstance(frame, dict):
        raise SchemaError(f"a frame must be an object, but got {_short(frame)}")
    for field, check in _COMMON.items():
        if field not in frame:
            raise SchemaError(f"missing field {field!r}")
        problem = check(frame[field])
        if problem:
            raise SchemaError(f"field {field!r} must be {problem}, but got {_short(frame[field])}")
    kind = frame["kind"]
    for field, check in _REQUIRED[kind].items():
        if field not in frame:
            raise SchemaError(f"{kind!r} frame is missing field {field!r}")
        problem = check(frame[field])
        if problem:
            raise SchemaError(f"{kind!r} frame: field {field!r} must be {problem}, but got {_short(frame[field])}")
    for field, check in _OPTIONAL[kind].items():
        if field in frame:
            problem = check(frame[field])
            if problem:
                raise SchemaError(f"{kind!r} frame: field {field!r} must be {problem}, but got {_short(frame[field])}")
    if "rank" in frame:
        problem = _rank(frame["rank"])
        if problem:
            raise SchemaError(f"field 'rank' must be {problem}, but got {_short(frame['rank'])}")
        if frame["rank"] > 0 and kind not in RANK_KINDS:
            raise SchemaError(
                f"{kind!r} frames come from rank 0 only (a rank > 0 sends {', '.join(RANK_KINDS)}: "
                f"what differs per rank), but got rank {frame['rank']}"
            )
    return frame


def validate_batch(message: Any) -> list[dict[str, Any]]:
    """Check a whole client message; return its frames or raise SchemaError.

    The error names the frame's index and kind, so a client author can find it.
    """
    frames, refused = split_batch(message)
    if refused:
        raise SchemaError(refused[0]["error"])
    return frames


def split_batch(message: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A client message's valid frames, and one `refused` entry per invalid frame: {"index", "error"}
    (and its "run_id", "seq" and "rank" where those are valid). Raises SchemaError only when the message
    itself is not a batch (not an object, another protocol, no frames): one bad frame never sinks the
    others of its batch (a run is not lost for one bad name)."""
    valid, refused = split_batch_indexed(message)
    return [frame for _, frame in valid], refused


def split_batch_indexed(message: Any) -> tuple[list[tuple[int, dict[str, Any]]], list[dict[str, Any]]]:
    """`split_batch`, each valid frame with its index in the batch (what a later refusal names)."""
    if not isinstance(message, dict):
        raise SchemaError(
            f"a message must be an object {{'protocol': {PROTOCOL_VERSION}, 'frames': [...]}}, "
            f"but got {_short(message)}"
        )
    if not _is_protocol(message.get("protocol")):
        raise SchemaError(
            f"unsupported protocol version {message.get('protocol')!r}: this server speaks protocol {PROTOCOL_VERSION}"
        )
    frames = message.get("frames")
    if not isinstance(frames, list) or not frames:
        raise SchemaError(f"'frames' must be a non-empty list, but got {_short(frames)}")
    valid: list[tuple[int, dict[str, Any]]] = []
    refused: list[dict[str, Any]] = []
    for i, frame in enumerate(frames):
        try:
            validate_frame(frame)
        except SchemaError as exc:
            kind = frame.get("kind") if isinstance(frame, dict) else None
            entry: dict[str, Any] = {
                "index": i,
                "error": f"frame {i}" + (f" ({kind!r})" if isinstance(kind, str) else "") + f": {exc}",
            }
            if isinstance(frame, dict):
                for key, check in (("run_id", _nonempty_name), ("seq", _count), ("rank", _rank)):
                    if key in frame and check(frame[key]) is None:
                        entry[key] = frame[key]
            refused.append(entry)
        else:
            valid.append((i, frame))
    # A run whose run_start was refused here does not exist: its other frames of the batch go with it
    # (a run_start of an unknown run stored later, or never, is the client's to resend).
    lost = {(r["run_id"], r.get("rank") or 0): r["index"] for r in refused if _was_run_start(frames[r["index"]], r)}
    if lost:
        kept = []
        for i, frame in valid:
            start = lost.get((frame["run_id"], frame.get("rank") or 0))
            if start is not None and start < i:
                refused.append(
                    {
                        "index": i,
                        "error": f"frame {i} ({frame['kind']!r}): the run_start of run {frame['run_id']!r} "
                        f"(frame {start}) was refused",
                        **{k: frame[k] for k in ("run_id", "seq", "rank") if k in frame},
                    }
                )
            else:
                kept.append((i, frame))
        valid = kept
        refused.sort(key=lambda r: r["index"])
    return valid, refused


def _was_run_start(frame: Any, refusal: dict[str, Any]) -> bool:
    return isinstance(frame, dict) and frame.get("kind") == "run_start" and "run_id" in refusal


# ---------------------------------------------------------------- names made valid (client side)
# A run is never lost for a name: the client fits every name it sends to the limits above
# before the frame is numbered. Deterministic, so the same long module path is the same
# fitted name in run_start, every row and every signal.

EMPTY_NAME = "(empty)"  # what an empty name that must not be empty is sent as (a scalar key "")


def fit_name(name: str, *, nonempty: bool = False) -> str:
    """`name` within MAX_NAME_LEN: a longer one keeps its start and ends in "~" and 8 hex digits of
    its SHA-1 (stable, and two long names sharing a start stay apart); an empty one where a name
    must not be empty is EMPTY_NAME; a lone surrogate becomes "?"."""
    if not _valid_text(name):
        name = name.encode("utf-8", "replace").decode("utf-8")
    if len(name) > MAX_NAME_LEN:
        digest = hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        return name[: MAX_NAME_LEN - 9] + "~" + digest
    return EMPTY_NAME if nonempty and not name else name


def _fit(value: Any, nonempty: bool, fixed: list[tuple[str, str]]) -> Any:
    if not isinstance(value, str) or (len(value) <= MAX_NAME_LEN and (value or not nonempty) and _valid_text(value)):
        return value
    fitted = fit_name(value, nonempty=nonempty)
    fixed.append((value, fitted))
    return fitted


def _fit_rows(rows: Any, fixed: list[tuple[str, str]]) -> Any:
    """layer_stats / histograms rows with their layer and param names fitted (one len() pass when all fit)."""
    if not isinstance(rows, list) or all(isinstance(r, list) and len(r) > 2 and _short_names(r[0], r[1]) for r in rows):
        return rows
    out = []
    for row in rows:
        if isinstance(row, list) and len(row) > 2:
            row = [_fit(row[0], False, fixed), _fit(row[1], False, fixed), *row[2:]]
        out.append(row)
    return out


def _short_names(*names: Any) -> bool:
    return all(not isinstance(n, str) or len(n) <= MAX_NAME_LEN for n in names)


def fit_names(kind: str, fields: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """A frame's fields with every name the server would refuse made valid (`fit_name`), and the
    (old, new) pairs changed. Fields are copied only where something changed."""
    fixed: list[tuple[str, str]] = []
    out = dict(fields)
    if kind == "run_start":
        for key in ("name", "project"):
            if key in out:
                out[key] = _fit(out[key], True, fixed)
        model = out.get("model")
        if isinstance(model, dict) and isinstance(model.get("modules"), list):
            modules = []
            for m in model["modules"]:
                if isinstance(m, dict):
                    m = {**m, "name": _fit(m.get("name"), False, fixed), "type": _fit(m.get("type"), False, fixed)}
                    if isinstance(m.get("params"), list):
                        m["params"] = [
                            {**p, "name": _fit(p.get("name"), False, fixed)} if isinstance(p, dict) else p
                            for p in m["params"]
                        ]
                modules.append(m)
            model = {**model, "modules": modules}
            if isinstance(model.get("tensors"), list):
                model["tensors"] = [_fit(t, False, fixed) for t in model["tensors"]]
            out["model"] = model
    elif kind == "scalars" and isinstance(out.get("values"), dict):
        out["values"] = {_fit(k, True, fixed): v for k, v in out["values"].items()}
    elif kind in ("layer_stats", "histograms"):
        out["rows"] = _fit_rows(out.get("rows"), fixed)
    elif kind == "signals":
        for key in ("first_nonfinite", "input_fingerprint"):
            if key in out:
                out[key] = _fit(out[key], False, fixed)
        if isinstance(out.get("nonfinite_grads"), list):
            out["nonfinite_grads"] = [_fit(n, False, fixed) for n in out["nonfinite_grads"]]
        if isinstance(out.get("target_counts"), dict):
            out["target_counts"] = {_fit(k, False, fixed): c for k, c in out["target_counts"].items()}
    elif kind == "findings" and isinstance(out.get("findings"), list):
        out["findings"] = [
            {**f, "layer": _fit(f.get("layer"), False, fixed)} if isinstance(f, dict) else f for f in out["findings"]
        ]
    return (out, fixed) if fixed else (fields, fixed)


# ---------------------------------------------------------------- constructors
# The client builds frames only through these, so field names live here alone.


def frame(kind: str, *, run_id: str, seq: int, step: int, rank: int | None = None, **fields: Any) -> dict[str, Any]:
    """One frame of `kind` with the common fields filled in (`rank` only for a process of a process group)."""
    head = {"protocol": PROTOCOL_VERSION, "kind": kind, "run_id": run_id, "seq": seq, "step": step}
    if rank is not None:
        head["rank"] = rank
    return {**head, **fields}


def batch(frames: list[dict[str, Any]]) -> dict[str, Any]:
    """The envelope of one client message."""
    return {"protocol": PROTOCOL_VERSION, "frames": frames}


def ack(
    seqs: dict[str, list[int]],
    ranks: dict[str, dict[str, list[int]]] | None = None,
    refused: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The server's answer once a batch is committed: rank 0's seqs (and those of frames without a
    rank) by run, and, when the batch held any, the seqs of ranks > 0 by run and rank, and the frames
    it refused (`split_batch`: by index in the batch, with the reason; never stored, never acked)."""
    return {
        "kind": "ack",
        "seqs": seqs,
        **({"ranks": ranks} if ranks else {}),
        **({"refused": refused} if refused else {}),
    }


def acked_seqs(message: dict[str, Any], run_id: str, rank: int | None = None) -> list[int]:
    """The seqs an ack message commits for one sender: `run_id`'s frames of `rank` (None or 0: rank 0's)."""
    if not rank:
        return list((message.get("seqs") or {}).get(run_id, []))
    return list(((message.get("ranks") or {}).get(run_id) or {}).get(str(rank), []))


def rank_key(key: str, rank: int | None) -> str:
    """The stored name of a scalar a rank logged: `key` for rank 0, "key/rank<r>" for a rank r > 0."""
    return f"{key}/rank{rank}" if rank else key


def key_rank(key: str) -> tuple[str, int]:
    """`rank_key` undone: ("loss", 1) for "loss/rank1", (key, 0) for a key of rank 0."""
    base, _, tail = key.rpartition("/rank")
    if base and tail.isdigit() and str(int(tail)) == tail:
        return base, int(tail)
    return key, 0


def error(text: str, *, retry: bool = False) -> dict[str, Any]:
    """The server's answer to a message it did not store, sent just before it closes the connection.
    `retry`: the failure is the server's and passing (its storage full or locked, its database away):
    the client keeps the frames and sends them again later. Without it the message itself is refused."""
    return {"kind": "error", "error": text, **({"retry": True} if retry else {})}


def hist_edges(lo: float, hi: float, bins: int = HIST_BINS) -> list[float]:
    """The bin edges of a histogram row: `bins + 1` evenly spaced values from lo to hi."""
    return [lo + (hi - lo) * i / bins for i in range(bins + 1)]
