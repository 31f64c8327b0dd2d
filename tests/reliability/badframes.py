"""Hypothesis strategies for ingest messages that must be refused, each with what the refusal must name.

A strategy here yields `Bad(message, expected, code)`: the websocket message
(str, or bytes for a binary one), the fragments the server's error text must
contain, and the close code. They are written from the wire schema's
contract (client_hook/wire.py's docstring and DESIGN.md), not from its code:
one valid batch of every frame kind, and one thing wrong with it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from client_hook import wire

MAX_NAME = wire.MAX_NAME_LEN


@dataclass
class Bad:
    message: str | bytes
    expected: tuple[str, ...]  # fragments the error text must contain
    code: int = 1008  # policy violation; 1009 for an oversize message

    def __repr__(self) -> str:  # what hypothesis prints for a failing example: short enough to read
        text = self.message if isinstance(self.message, str) else repr(self.message)
        shown = text if len(text) <= 600 else f"{text[:600]}... ({len(text)} chars)"
        return f"Bad(expected={self.expected!r}, code={self.code}, message={shown})"


# ------------------------------------------------------------------ one valid batch


def stat_row(layer: str, kind: str) -> list[Any]:
    cells = dict.fromkeys(wire.STAT_FIELDS, 0.5) | {"nonfinite": 0, "numel": 10, "update_ratio": None}
    cells |= {"layer": layer, "param": "output" if kind == "activation" else "weight", "kind": kind, "sat_frac": None}
    return [cells[c] for c in wire.LAYER_STAT_COLUMNS]


def valid_frames(run_id: str) -> list[dict[str, Any]]:
    """run_start, then one frame of every other kind: a batch the server would store."""
    model = {"modules": [{"name": "fc", "type": "Linear", "params": ["weight", "bias"]}]}
    finding = {"rule": "r", "severity": "info", "layer": None, "message": "m", "remedy": "r", "evidence": None}
    fields = [
        ("run_start", {"name": "n", "project": "p", "time": 1.0, "model": model, "optimizer": None, "config": {}}),
        ("scalars", {"values": {"loss": 1.0, "lr": math.nan}, "time": 1.0}),
        ("signals", {"training": True, "input_mean": 0.0, "input_std": 1.0, "input_nonfinite": 0,
                     "input_fingerprint": "ab", "output_nonfinite": False, "first_nonfinite": None,
                     "grad_norm": 1.0, "nonfinite_grads": [], "grads_stale": False, "target_counts": {"0": 3}}),
        ("layer_stats", {"rows": [stat_row("fc", "weight"), stat_row("fc", "grad"), stat_row("fc", "activation")],
                         "every": 1}),
        ("histograms", {"rows": [["fc", "weight", "grad", -1.0, 1.0, [1] * wire.HIST_BINS]]}),
        ("findings", {"findings": [finding]}),
        ("heartbeat", {"time": 2.0, "dropped": {"histograms": 1}}),
        ("run_end", {"status": "finished", "time": 3.0, "dropped": {}}),
    ]  # fmt: skip
    return [wire.frame(kind, run_id=run_id, seq=i, step=0, **f) for i, (kind, f) in enumerate(fields)]


# Required beyond protocol/kind/run_id/seq/step, per kind (DESIGN.md / wire docstring).
COMMON = ("protocol", "kind", "run_id", "seq", "step")
REQUIRED = {
    "run_start": ("name", "project", "time", "model"),
    "scalars": ("values", "time"),
    "signals": (),
    "layer_stats": ("rows",),
    "histograms": ("rows",),
    "findings": ("findings",),
    "heartbeat": ("time",),
    "run_end": ("status", "time"),
}

# ------------------------------------------------------------------ wrong values, by what a field must be

junk = st.one_of(st.text(max_size=4), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2),
                 st.integers(), max_size=1))  # fmt: skip
not_count = st.one_of(
    st.integers(max_value=-1), st.floats(), st.booleans(), st.none(), junk, st.integers(min_value=2**63)
)
not_finite = st.one_of(st.sampled_from([math.nan, math.inf, -math.inf]), st.booleans(), st.none(), junk)
long_name = st.text(min_size=MAX_NAME + 1, max_size=MAX_NAME + 40)
not_name = st.one_of(long_name, st.integers(), st.floats(), st.booleans(), st.lists(st.text(), max_size=1))
not_nonempty_name = st.one_of(st.just(""), st.none(), not_name)
not_name_or_null = not_name
not_number_or_null = st.one_of(st.booleans(), junk)  # NaN and ±Inf are numbers here: data
not_bool_or_null = st.one_of(st.integers(), st.floats(), junk)
not_object_or_null = st.one_of(st.integers(), st.booleans(), st.text(max_size=3), st.lists(st.integers(), max_size=2))
not_drop_counts = st.one_of(
    st.just({"": 1}),
    st.dictionaries(st.sampled_from(["x", "histograms"]), not_count, min_size=1),
    junk.filter(lambda v: not isinstance(v, dict)),
)
bad_protocol = st.one_of(
    st.integers().filter(lambda v: v != wire.PROTOCOL_VERSION),
    st.sampled_from([True, 1.0, "1", None, [1]]),  # equal to 1 in Python, but not the integer 1
)
bad_model = st.one_of(
    not_object_or_null,
    st.sampled_from([{}, {"modules": "fc"}, {"modules": [7]}, {"modules": [{"name": 1, "type": "Linear"}]},
                     {"modules": [{"name": "fc"}]}, {"modules": [{"name": "fc", "type": "L", "params": "weight"}]}]),
)  # fmt: skip
bad_values = st.one_of(
    st.just({}),
    not_object_or_null,
    st.fixed_dictionaries({"loss": st.one_of(st.booleans(), junk)}),
    st.just({"": 1.0}),
    long_name.map(lambda name: {name: 1.0}),
)
bad_counts_by_class = st.one_of(
    st.integers(), st.text(max_size=2), st.lists(st.integers(), max_size=1),
    st.fixed_dictionaries({"0": not_count}), long_name.map(lambda k: {k: 1}),
)  # fmt: skip
bad_findings = st.one_of(
    not_object_or_null.filter(lambda v: not isinstance(v, list)),
    st.just([5]),
    st.sampled_from(["rule", "severity", "layer", "message", "remedy", "evidence"]).flatmap(
        lambda key: {
            "rule": st.sampled_from(["", None, 3]),
            "severity": st.sampled_from(["fatal", None, "", "INFO"]),
            "layer": st.sampled_from([3, ["a"], "x" * (MAX_NAME + 1)]),
            "message": st.sampled_from([None, 3, ["m"]]),
            "remedy": st.sampled_from([None, 3, ["m"]]),
            "evidence": st.sampled_from([3, "e", [1]]),
        }[key].map(lambda v, key=key: [{**valid_frames("x")[5]["findings"][0], key: v}])
    ),
)

# Stat and histogram cells, by column.
_CELL = {
    "layer": not_name,
    "param": not_name,
    "kind": st.one_of(st.text(max_size=10).filter(lambda k: k not in wire.TENSOR_KINDS), st.none(), st.integers()),
    "nonfinite": not_count,
    "numel": not_count,
    "counts": st.one_of(
        st.lists(st.integers(0, 9), max_size=wire.HIST_BINS - 1),
        st.lists(st.integers(0, 9), min_size=wire.HIST_BINS + 1, max_size=wire.HIST_BINS + 3),
        st.tuples(st.integers(0, wire.HIST_BINS - 1), not_count).map(
            lambda iv: [iv[1] if i == iv[0] else 1 for i in range(wire.HIST_BINS)]
        ),
        st.none(),
    ),
}


@st.composite
def bad_rows(draw: st.DrawFn, rows: list[list[Any]], columns: tuple[str, ...]) -> tuple[list[Any], tuple[str, ...]]:
    """`rows` with one row broken: its length, its type, or one cell; and what the error must name."""
    rows = [list(r) for r in rows]
    i = draw(st.integers(0, len(rows) - 1))
    how = draw(st.sampled_from(["short", "long", "not a list", "cell"]))
    if how == "short":
        rows[i] = rows[i][: draw(st.integers(0, len(columns) - 1))]
    elif how == "long":
        rows[i] = rows[i] + [0.0]
    elif how == "not a list":
        rows[i] = draw(st.one_of(st.none(), st.integers(), st.text(max_size=3), st.just({"layer": "fc"})))
    else:
        c = draw(st.integers(0, len(columns) - 1))
        rows[i][c] = draw(_CELL.get(columns[c], not_number_or_null))
        return rows, (f"row {i}", repr(columns[c]))
    return rows, (f"row {i}",)


def wrong_value(kind: str, field: str) -> st.SearchStrategy[Any]:
    """Values `field` of a `kind` frame must never accept."""
    by_field: dict[str, st.SearchStrategy[Any]] = {
        "protocol": bad_protocol,
        "kind": st.one_of(st.text(max_size=12).filter(lambda k: k not in wire.FRAME_KINDS), st.none(), st.integers()),
        "run_id": not_nonempty_name,
        "seq": not_count,
        "step": not_count,
        "name": not_nonempty_name,
        "project": not_nonempty_name,
        "time": not_finite,
        "model": bad_model,
        "optimizer": not_object_or_null,
        "config": not_object_or_null,
        "values": bad_values,
        "training": not_bool_or_null,
        "output_nonfinite": not_bool_or_null,
        "grads_stale": not_bool_or_null,
        "input_mean": not_number_or_null,
        "input_std": not_number_or_null,
        "grad_norm": not_number_or_null,
        "input_nonfinite": not_count,
        "input_fingerprint": not_name_or_null,
        "first_nonfinite": not_name_or_null,
        "nonfinite_grads": st.one_of(st.none(), st.integers(), st.just([3]), long_name.map(lambda n: [n])),
        "target_counts": bad_counts_by_class,
        "every": not_count,
        "findings": bad_findings,
        "dropped": not_drop_counts,
        "status": st.one_of(st.text(max_size=10).filter(lambda s: s not in wire.RUN_END_STATUSES), st.none()),
    }
    return by_field[field]


@st.composite
def one_bad_field(draw: st.DrawFn) -> Bad:
    """A valid batch of a fresh run with one field of one frame missing or wrong."""
    run_id = f"bad-{draw(st.uuids()).hex}"
    frames = valid_frames(run_id)
    i = draw(st.integers(0, len(frames) - 1))
    frame = frames[i]
    kind = frame["kind"]
    field = draw(st.sampled_from(sorted(frame)))
    expected: tuple[str, ...] = (f"frame {i}", repr(field))
    if field in COMMON + REQUIRED[kind] and draw(st.booleans()):
        del frame[field]
        expected += ("missing field",)
    elif field == "rows":
        columns = wire.LAYER_STAT_COLUMNS if kind == "layer_stats" else wire.HISTOGRAM_COLUMNS
        if draw(st.booleans()):
            frame["rows"], where = draw(bad_rows(frame["rows"], columns))
        else:  # not a list of rows at all (an empty list is a valid, empty sample)
            frame["rows"], where = draw(junk.filter(lambda v: v != [])), ()
        expected += where
    else:
        frame[field] = draw(wrong_value(kind, field))
        expected += ("must be",)
    return Bad(json.dumps(wire.batch(frames)), expected)


# ------------------------------------------------------------------ messages that are not batches at all

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10))
json_value = st.recursive(
    json_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)  # fmt: skip


def _not_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return True
    return False


def nested(depth: int, opener: str, closer: str) -> str:
    return opener * depth + closer * depth


def not_a_batch(limit: int) -> st.SearchStrategy[Bad]:
    """Non-JSON, binary, oversize, too deep, non-object, wrong protocol, no frames. (Frames that are not
    objects are a batch with bad frames: refused one by one, see test_fuzz_ingest.)"""
    run_start = valid_frames("bad-start")[0]
    return st.one_of(
        st.text(max_size=60).filter(_not_json).map(lambda t: Bad(t, ("not valid JSON",))),
        st.binary(max_size=60).map(lambda b: Bad(b, ("binary messages are not accepted",))),
        st.integers(limit + 1, 3 * limit).map(
            lambda n: Bad(json.dumps(wire.batch([run_start] * (n // 200 + 1))), ("over this server's limit",), 1009)
        ),
        # 3,000 to 10,000 levels: far past any parser recursion limit, within the 64 KiB message limit.
        st.tuples(st.integers(3_000, 10_000), st.sampled_from([("[", "]"), ('{"a":', "}")])).map(
            lambda d: Bad(nested(d[0], *d[1]).replace('{"a":}', '{"a":1}'), ("nested too deeply",))
        ),
        json_value.filter(lambda v: not isinstance(v, dict)).map(lambda v: Bad(json.dumps(v), ("must be an object",))),
        bad_protocol.map(lambda p: Bad(json.dumps({"protocol": p, "frames": [run_start]}), ("protocol version",))),
        st.one_of(st.just([]), json_leaf, st.dictionaries(st.text(max_size=3), json_leaf, max_size=2)).map(
            lambda f: Bad(json.dumps({"protocol": wire.PROTOCOL_VERSION, "frames": f}), ("'frames' must be",))
        ),
    )


# ------------------------------------------------------------------ frames of random content


def frame_fields() -> st.SearchStrategy[dict[str, Any]]:
    """Frames whose fields are each either plausible or random JSON, of any kind but run_start:
    even a frame that happens to be valid names a run that was never started."""
    plausible = {
        "protocol": st.just(wire.PROTOCOL_VERSION),
        "kind": st.sampled_from([k for k in wire.FRAME_KINDS if k != "run_start"]),
        "run_id": st.uuids().map(lambda u: f"bad-{u.hex}"),
        "seq": st.integers(0, 2**70),
        "step": st.integers(-2, 2**70),
        "time": st.floats(),
        "values": st.dictionaries(st.text(max_size=5), st.floats() | st.none(), max_size=2),
        "rows": st.lists(st.lists(json_leaf, max_size=15), max_size=2),
        "findings": st.lists(st.dictionaries(st.sampled_from(["rule", "severity", "message"]), json_leaf), max_size=2),
        "status": st.sampled_from(["finished", "crashed", "x"]),
        "dropped": st.dictionaries(st.text(max_size=3), st.integers(-1, 2**70), max_size=2),
        "every": st.integers(-1, 2**70),
        "input_nonfinite": st.integers(-1, 2**70),
    }
    return st.fixed_dictionaries(
        {}, optional={key: st.one_of(value, json_value) for key, value in plausible.items()}
    ).filter(lambda f: f.get("kind") != "run_start")
