"""What a rule sees: a run's history as of one step, with the model's description.

Rules are plain functions `check(view, state) -> list[Finding]`; the view gives
them windows over the past (never the future: everything is cut at `step`),
the model as the client described it (modules in forward order, parameters,
optimizer), and `finding(...)` to phrase a result with the catalogue's remedy.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from client_hook.catalog import RULES
from layerwatch.server.diagnosis.history import RunHistory, StepRecord
from layerwatch.server.jsonvalues import json_text
from layerwatch.server.records import Finding


class RunView:
    def __init__(self, history: RunHistory, step: int) -> None:
        self.history = history
        self.step = step
        modules = history.model.get("modules", [])
        self.modules: list[dict[str, Any]] = modules
        self.module_index = {m["name"]: i for i, m in enumerate(modules)}

    # ------------------------------------------------------------ the present

    @property
    def record(self) -> StepRecord:
        return self.history.records.get(self.step) or StepRecord(self.step)

    @property
    def sample(self) -> StepRecord | None:
        """This step's layer statistics, if this step was sampled."""
        rec = self.history.records.get(self.step)
        return rec if rec is not None and rec.stats is not None else None

    @property
    def finished(self) -> bool:
        return self.history.finished and self.step >= self.history.max_step

    # ------------------------------------------------------------ the past

    def records(self, last: int | None = None) -> list[StepRecord]:
        """The last `last` stored steps up to and including this one, oldest first."""
        return self._recent(lambda r: True, last)

    def _recent(self, keep: Any, last: int | None) -> list[StepRecord]:
        # Walks back from the newest step and stops after `last`: the cost of a rule
        # is its window, not the run's length.
        out: list[StepRecord] = []
        for rec in reversed(self.history.records.values()):
            if rec.step > self.step or not keep(rec):
                continue
            out.append(rec)
            if last is not None and len(out) >= last:
                break
        return out[::-1]

    def series(self, key: str, last: int | None = None) -> list[tuple[int, float]]:
        """(step, value) of a scalar over the last `last` steps that logged it, oldest first."""
        out: list[tuple[int, float]] = []
        for rec in reversed(self.history.records.values()):
            if rec.step > self.step or key not in rec.scalars:
                continue
            out.append((rec.step, rec.scalars[key]))
            if last is not None and len(out) >= last:
                break
        return out[::-1]

    def signals(self, last: int | None = None) -> list[StepRecord]:
        """The last `last` steps that carried signals, oldest first."""
        return self._recent(lambda r: bool(r.signals), last)

    def samples(self, last: int | None = None) -> list[StepRecord]:
        """The last `last` sampled steps up to this one, oldest first."""
        out = [r for r in self.history.samples if r.step <= self.step]
        return out[-last:] if last else out

    def median_update_ratio(self, *, first: bool = False) -> float:
        """The latest median update-to-weight ratio over the model's weights (NaN without one): of the
        per-step readings (`update_ratios`), or for an older client of the latest sample.

        `first`: the run's first reading (or sample: step 0, sampled at any interval) instead; a
        verdict that reads it is the same whatever the sampling."""
        if self.history.per_step_updates:
            records = self.history.records.values()
            with_ratios = (r for r in (records if first else reversed(records)) if r.signals.get("update_ratios"))
            for rec in with_ratios:
                if rec.step <= self.step:
                    return median([x for x in rec.signals["update_ratios"] if x is not None and not math.isnan(x)])
                if first:
                    break
            return math.nan
        samples = self.samples()
        if not samples or not samples[-1].stats:
            return math.nan
        stats = (samples[0] if first else samples[-1]).stats or {}
        return median([row.get("update_ratio", math.nan) for (_, _, kind), row in stats.items() if kind == "weight"])

    def update_readings(self) -> list[UpdateReading] | None:
        """This step's update ratio of every parameter that has one, or None if the step has no reading.

        From the per-step `update_ratios` (a fixed schedule of steps: the same on every machine), with
        the step's per-tensor gradient RMS and each weight's RMS at attach; for a client that sends no
        per-step ratios, from the sampled statistics (ratio, gradient and weight RMS of the sample)."""
        signals = self.record.signals
        ratios, tensors = signals.get("update_ratios"), self.history.tensor_info()
        if ratios and len(ratios) == len(tensors):
            norms = signals.get("grad_norms")
            norms = norms if norms and len(norms) == len(tensors) else [None] * len(tensors)
            out = []
            for tensor, ratio, norm in zip(tensors, ratios, norms):
                if ratio is None or math.isnan(ratio):
                    continue
                numel = tensor.description.get("numel")
                grad = norm / math.sqrt(numel) if norm is not None and numel else None
                weight = tensor.description.get("rms")
                out.append(UpdateReading(tensor.layer, tensor.param, ratio, grad, weight, tensor.description))
            return out
        sample = self.sample
        if self.history.per_step_updates or sample is None or not sample.stats:
            return None
        described = {(layer, name): p for layer, name, p in self.params()}
        out = []
        for (layer, name, kind), row in sample.stats.items():
            ratio = row.get("update_ratio")
            if kind != "weight" or ratio is None or math.isnan(ratio):
                continue
            grad = sample.stats.get((layer, name, "grad"))
            grad_rms = grad.get("rms") if grad is not None else None
            reading = UpdateReading(layer, name, ratio, grad_rms, row.get("rms"), described.get((layer, name), {}))
            out.append(reading)
        return out

    def told(self, rule_id: str) -> bool:
        """Whether rule `rule_id` has found something in this run by this step: a rule whose remedy
        would contradict that finding's defers to it."""
        step = self.history.told.get(rule_id)
        return step is not None and step <= self.step

    # ------------------------------------------------------------ the model

    def module(self, name: str) -> dict[str, Any] | None:
        i = self.module_index.get(name)
        return None if i is None else self.modules[i]

    def params(self) -> Iterator[tuple[str, str, dict[str, Any]]]:
        """(layer, param name, description) of every parameter, in forward order of modules."""
        for module in self.modules:
            for p in param_descriptions(module):
                yield module["name"], p["name"], p

    def order(self, layer: str | None) -> int:
        """Position of a module in forward order (unknown names last)."""
        return self.module_index.get(layer or "", len(self.modules))

    def output_module(self) -> str | None:
        """The last module (other than the root) the forward called: the output layer, not a hidden one."""
        called = [m["name"] for m in self.modules if m["name"] and m.get("called") is not False]
        return called[-1] if called else None

    def module_type(self, name: str) -> str | None:
        m = self.module(name)
        return None if m is None else m.get("type")

    @property
    def adversarial(self) -> bool:
        """The run declared its loss one side of a game (`attach(objective="adversarial")`): a GAN's
        generator or discriminator, whose loss may rise while training goes well."""
        return self.history.config.get("objective") == "adversarial"

    @property
    def optimizer(self) -> dict[str, Any] | None:
        return self.history.optimizer

    # ------------------------------------------------------------ phrasing

    def finding(
        self,
        rule: str,
        message: str,
        *,
        layer: str | None = None,
        evidence: dict[str, Any] | None = None,
        severity: str | None = None,
        remedy: str | None = None,
    ) -> Finding:
        """A finding of `rule` at this step, with the catalogue's severity and remedy unless overridden
        (a rule overrides the remedy only where its evidence points one way: it says which evidence)."""
        info = RULES[rule]
        return Finding(
            rule=rule,
            severity=severity or info.severity,
            layer=layer,
            step=self.step,
            message=message,
            remedy=remedy or info.remedy,
            evidence=json_text(evidence) if evidence else None,  # stored as written: NaN reads back "NaN"
        )


def streak(state: dict[str, Any], key: str, held: bool, step: int) -> tuple[int, int]:
    """Count the consecutive samples for which `held` was true of `key`, in a rule's state.

    Returns (count, first step of the streak); a sample where it does not hold
    resets the count to 0.
    """
    runs: dict[str, int] = state.setdefault("runs", {})
    since: dict[str, int] = state.setdefault("since", {})
    if not held:
        runs[key] = 0
        return 0, step
    if not runs.get(key):
        since[key] = step
    runs[key] = runs.get(key, 0) + 1
    return runs[key], since[key]


def sustained(count: int, since: int, step: int, *, samples: int = 2, span_steps: int) -> bool:
    """A streak counts as sustained once it spans `span_steps` steps, seen on at least `samples` samples.

    Steps, not only samples: the adaptive interval depends on the machine's speed
    (a small model is sampled every 2 steps on one box, every 60 on another), and
    a streak of samples 2 steps apart is an initialisation transient that samples
    60 apart never see. Judged over the same span of steps, both agree.
    """
    return count >= samples and step - since >= span_steps


@dataclass(frozen=True)
class UpdateReading:
    """One parameter's update across one optimizer step, as `RunView.update_readings` gives it."""

    layer: str
    param: str
    ratio: float  # ||w_after - w_before|| / ||w_before||: 0 when the step left it unchanged
    grad_rms: float | None  # of its gradient at this step; None: it had none
    weight_rms: float | None  # of the weight (at attach, or at the sample)
    description: dict[str, Any]  # run_start's: shape, numel, requires_grad, in_optimizer

    @property
    def key(self) -> tuple[str, str]:
        return self.layer, self.param

    @property
    def label(self) -> str:
        return f"{self.layer}.{self.param}" if self.layer else self.param

    @property
    def is_matrix(self) -> bool:
        """A weight of two or more dimensions: not a bias, not a normalisation scale."""
        return len(self.description.get("shape") or []) >= 2


def fmt(value: float | None) -> str:
    """A measured value for a message: 3 significant digits, NaN/Inf spelled out."""
    if value is None:
        return "n/a"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.3g}"


def median(values: list[float]) -> float:
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return math.nan
    mid = len(finite) // 2
    return finite[mid] if len(finite) % 2 else (finite[mid - 1] + finite[mid]) / 2


def param_descriptions(module: dict[str, Any]) -> list[dict[str, Any]]:
    """A module's `params` as description dicts with a string `name`.

    The wire schema only asks for a list: the client sends {"name", "shape", ...}
    dicts, another client may send bare names ("weight"), which become {"name": ...}
    without a shape; anything else is skipped rather than failing a rule."""
    out = []
    for p in module.get("params") or []:
        if isinstance(p, str):
            out.append({"name": p})
        elif isinstance(p, dict) and isinstance(p.get("name"), str):
            out.append(p)
    return out
