"""A bounded window of one run's data, in step order, as the rules read it.

Fed with the frames ingest stores (live) or with rows read back from the
database (replay), so a rule sees the same data either way: rules may only use
what is stored. Memory is bounded per run: the last MAX_STEPS steps and the
last MAX_SAMPLES sampled steps; what a rule needs from further back it keeps
in its own state.

A distributed run has a sender per rank: rank 0's scalars, signals and layer
statistics fill a step as a single process's would; a rank r > 0's scalars are
there under `wire.rank_key` ("loss/rank1") and its signals in `rank_signals[r]`.
A step is complete (`complete_upto`) once every rank has sent a later one or
ended, so a rule judges a step with every rank's data in it.
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
# A rank this many steps behind the newest step holds the others' diagnosis up no longer (its sender
# is away, or it stopped reporting): what it sends later for steps already judged is seen by a replay
# (`layerwatch diagnose`). DDP's ranks step together, so healthy ones are a batch window apart at most.
RANK_LAG_STEPS = 100
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


@dataclass(frozen=True)
class TensorInfo:
    """One model tensor of the signals' `grad_norms`: its label, layer, parameter name and description."""

    label: str
    layer: str
    param: str
    description: dict[str, Any]

    def trainable(self, optimizer_known: bool) -> bool:
        """requires_grad and, when the client knew the optimizer, stepped by it."""
        d = self.description
        return d.get("requires_grad", True) is not False and not (optimizer_known and d.get("in_optimizer") is False)

    @property
    def is_matrix(self) -> bool:
        """A weight of two or more dimensions: not a bias, not a normalisation scale."""
        return len(self.description.get("shape") or []) >= 2


@dataclass
class StepRecord:
    """Everything stored for one step: scalars, always-on signals, and (on sampled steps) layer statistics."""

    step: int
    scalars: dict[str, float] = field(default_factory=dict)
    signals: dict[str, Any] = field(default_factory=dict)
    stats: dict[SeriesKey, StatRow] | None = None
    rank_signals: dict[int, dict[str, Any]] = field(default_factory=dict)  # ranks r > 0 of a distributed run

    def stat(self, layer: str, param: str, kind: str, name: str) -> float | None:
        row = (self.stats or {}).get((layer, param, kind))
        return None if row is None else row.get(name)


def _kept_signals(signals: dict[str, Any]) -> dict[str, Any]:
    """The SIGNAL_FIELDS of a frame or a stored row; a stored non-finite norm ("NaN", "Infinity") as a float."""
    kept = {k: v for k, v in signals.items() if k in wire.SIGNAL_FIELDS}
    for key in ("grad_norms", "update_ratios"):
        norms = kept.get(key)
        if norms is not None and any(isinstance(n, str) for n in norms):
            kept[key] = [float(n) if isinstance(n, str) else n for n in norms]
    return kept


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
        self.rank_steps: dict[int, int] = {}  # the newest step each rank sent something for
        self.ended: set[int] = set()  # the ranks whose run_end came
        self.wait_for_ranks = True  # live; a replay has every rank's rows of a step at once
        self.first_loss: tuple[int, float] | None = None  # (step, value) of the first `loss` logged
        self.references: dict[str, Any] = {}  # what diagnosis.references worked out once for the run
        self.per_step_updates = False  # the client sends `update_ratios` (on its fixed steps)
        self.told: dict[str, int] = {}  # rule id -> the first step it found something at (the engine's)

    def describe(
        self, model: dict[str, Any] | None, optimizer: dict[str, Any] | None, config: dict[str, Any] | None
    ) -> None:
        self.model = model or {"modules": []}
        self.optimizer = optimizer
        self.config = config or {}
        self._tensor_info: list[TensorInfo] | None = None

    @property
    def world_size(self) -> int:
        """The ranks of a distributed run, as its run_start's config says (1 for a single process)."""
        world = self.config.get("world_size")
        return world if isinstance(world, int) and not isinstance(world, bool) and world > 1 else 1

    def complete_upto(self) -> int:
        """The newest step no more data can arrive for: before the newest step (all of them once the run
        ended), and before the newest step of each rank still sending, within RANK_LAG_STEPS."""
        if self.finished:
            return self.max_step
        last = self.max_step - 1
        if self.wait_for_ranks and self.world_size > 1:
            for rank in range(self.world_size):
                if rank not in self.ended:
                    last = min(last, self.rank_steps.get(rank, -1) - 1)
            last = max(last, self.max_step - RANK_LAG_STEPS)
        return last

    def _all_ended(self) -> bool:
        """Rank 0 ended, and every other rank ended or has sent rank 0's last step (its end may be on its way)."""
        if 0 not in self.ended:
            return False
        end = self.rank_steps.get(0, self.max_step)
        return all(r in self.ended or self.rank_steps.get(r, -1) >= end for r in range(1, self.world_size))

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
        if "loss" in values and (self.first_loss is None or step < self.first_loss[0]):
            self.first_loss = (step, _number(values["loss"]))

    def add_signals(self, step: int, signals: dict[str, Any]) -> None:
        kept = _kept_signals(signals)
        self.per_step_updates = self.per_step_updates or kept.get("update_ratios") is not None
        self.record(step).signals.update(kept)

    def add_rank_signals(self, step: int, rank: int, signals: dict[str, Any]) -> None:
        """The signals of a rank r > 0 of a distributed run."""
        self.record(step).rank_signals.setdefault(rank, {}).update(_kept_signals(signals))

    def tensor_info(self) -> list[TensorInfo]:
        """What the signals' `grad_norms` are aligned with: the model's `tensors`, each with its layer,
        parameter name and description (empty for a client that sends no `tensors`)."""
        if self._tensor_info is None:
            described = {
                (m.get("name"), p.get("name")): p
                for m in self.model.get("modules", [])
                if isinstance(m, dict)
                for p in m.get("params") or []
                if isinstance(p, dict)
            }
            labels = self.model.get("tensors")
            info = []
            for label in labels if isinstance(labels, list) else []:
                layer, _, param = label.rpartition(".")
                info.append(TensorInfo(label, layer, param, described.get((layer, param), {})))
            self._tensor_info = info
        return self._tensor_info

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
        """One validated wire frame, as ingest stored it (a rank r > 0's as ingest stored it too)."""
        kind, step, rank = frame["kind"], frame["step"], frame.get("rank") or 0
        self.rank_steps[rank] = max(self.rank_steps.get(rank, -1), step)
        if kind == "run_start":
            if rank == 0 or not self.model.get("modules"):  # another rank's describes the run until rank 0's
                self.describe(frame.get("model"), frame.get("optimizer"), frame.get("config"))
        elif kind == "scalars":
            self.add_scalars(step, {wire.rank_key(k, rank): v for k, v in frame["values"].items()})
        elif kind == "signals":
            if rank == 0:
                self.add_signals(step, frame)
            else:
                self.add_rank_signals(step, rank, frame)
        elif kind == "layer_stats":
            self.add_stats(step, frame["rows"])
        elif kind == "run_end":
            self.ended.add(rank)
        if self.ended:
            self.finished = self._all_ended()
