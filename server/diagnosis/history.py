"""A bounded window of one run's data, in step order, as the rules read it.

Fed with the frames ingest stores (live) or with rows read back from the
database (replay), so a rule sees the same data either way: rules may only use
what is stored. Memory is bounded per run: the last MAX_STEPS steps and the
last MAX_SAMPLES sampled steps; what a rule needs from further back it keeps
in its own state.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from client_hook import wire

MAX_STEPS = 1000  # steps of scalars and signals kept per run
MAX_SAMPLES = 50  # sampled steps of per-layer statistics kept per run
# The per-layer statistics the rules read (of wire.LAYER_STAT_COLUMNS), kept compact.
KEPT_STATS: tuple[str, ...] = wire.LAYER_STATS

SeriesKey = tuple[str, str, str]  # (layer, param, kind)

_COLUMN = {name: i for i, name in enumerate(wire.LAYER_STAT_COLUMNS)}
_KEPT_AT = {name: _COLUMN[name] for name in KEPT_STATS}
_LAYER, _PARAM, _KIND = _COLUMN["layer"], _COLUMN["param"], _COLUMN["kind"]


class StatRow(Mapping[str, float]):
    """One layer-statistics row as the rules read it: the KEPT_STATS by name, as floats, NULL as NaN.

    It wraps the row as it came (a list in wire.LAYER_STAT_COLUMNS order) and converts
    a value when it is read: a 200-layer sample is 600 rows, and building a dict for
    each cost more than all the rules together (~20 ms a 4-step batch at ingest).
    """

    __slots__ = ("_row",)

    def __init__(self, row: Sequence[Any]) -> None:
        self._row = row

    def __getitem__(self, name: str) -> float:
        return _number(self._row[_KEPT_AT[name]])

    def get(self, name: str, default: Any = None) -> Any:
        at = _KEPT_AT.get(name)
        return default if at is None else _number(self._row[at])

    def __iter__(self) -> Iterator[str]:
        return iter(KEPT_STATS)

    def __len__(self) -> int:
        return len(KEPT_STATS)

    def __repr__(self) -> str:
        return f"StatRow({dict(self)!r})"


@dataclass
class StepRecord:
    """Everything stored for one step: scalars, always-on signals, and (on sampled steps) layer statistics."""

    step: int
    scalars: dict[str, float] = field(default_factory=dict)
    signals: dict[str, Any] = field(default_factory=dict)
    stats: dict[SeriesKey, StatRow] | None = None

    def stat(self, layer: str, param: str, kind: str, name: str) -> float | None:
        row = (self.stats or {}).get((layer, param, kind))
        return None if row is None else row.get(name)


def _number(value: Any) -> float:
    """Stored numbers as floats; NULL (how SQLite keeps NaN) reads back as NaN."""
    return math.nan if value is None else float(value)


class RunHistory:
    """The recent past of one run; `add_*` in any order within a step, steps ascending."""

    def __init__(
        self, run_id: str, model: dict[str, Any] | None, optimizer: dict[str, Any] | None, config: dict[str, Any] | None
    ):
        self.run_id = run_id
        self.describe(model, optimizer, config)
        self.records: OrderedDict[int, StepRecord] = OrderedDict()
        self.samples: deque[StepRecord] = deque(maxlen=MAX_SAMPLES)
        self.max_step = -1
        self.finished = False

    def describe(
        self, model: dict[str, Any] | None, optimizer: dict[str, Any] | None, config: dict[str, Any] | None
    ) -> None:
        self.model = model or {"modules": []}
        self.optimizer = optimizer
        self.config = config or {}

    def record(self, step: int) -> StepRecord:
        rec = self.records.get(step)
        if rec is None:
            rec = StepRecord(step)
            self.records[step] = rec
            if step < self.max_step:  # a late frame: keep the order ascending
                self.records = OrderedDict(sorted(self.records.items()))
            while len(self.records) > MAX_STEPS:
                self.records.popitem(last=False)
        self.max_step = max(self.max_step, step)
        return rec

    def add_scalars(self, step: int, values: dict[str, Any]) -> None:
        self.record(step).scalars.update({k: _number(v) for k, v in values.items()})

    def add_signals(self, step: int, signals: dict[str, Any]) -> None:
        self.record(step).signals.update({k: v for k, v in signals.items() if k in wire.SIGNAL_FIELDS})

    def add_stats(self, step: int, rows: list[Sequence[Any]]) -> None:
        """Rows as lists in wire.LAYER_STAT_COLUMNS order (as the wire has them)."""
        rec = self.record(step)
        if rec.stats is None:
            rec.stats = {}
            self.samples.append(rec)
            if len(self.samples) > 1 and self.samples[-2].step > step:
                self.samples = deque(sorted(self.samples, key=lambda r: r.step), maxlen=MAX_SAMPLES)
        for row in rows:
            rec.stats[(row[_LAYER], row[_PARAM], row[_KIND])] = StatRow(row)

    def add_frame(self, frame: dict[str, Any]) -> None:
        """One validated wire frame, as ingest stored it."""
        kind, step = frame["kind"], frame["step"]
        if kind == "run_start":
            self.describe(frame.get("model"), frame.get("optimizer"), frame.get("config"))
        elif kind == "scalars":
            self.add_scalars(step, frame["values"])
        elif kind == "signals":
            self.add_signals(step, frame)
        elif kind == "layer_stats":
            self.add_stats(step, frame["rows"])
        elif kind == "run_end":
            self.finished = True
