"""The hooks: where statistics are taken during training, and how a sample is built.

Steps are optimizer steps. On a sampled step:
- activation hooks are *armed* (registered) just before that step's forward and
  removed when the model's first grad-enabled forward of the step ends, so
  unsampled steps pay nothing for them (not even PyTorch's hook dispatch);
- the optimizer's step pre-hook reads each gradient where the optimizer sees
  it (after unscaling and clipping) and snapshots the weights;
- the step post-hook measures ||w_after - w_before|| / ||w_before|| and the
  weights, stacks every summary row and makes the step's single device-to-host
  copy (non-blocking on CUDA; the sender thread waits for it, not training).

Everything runs under `torch.no_grad()` and only reads tensors: outputs,
gradients, weights and the RNG state are exactly what they would be without the
monitor. A hook that fails logs once and goes quiet.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from client_hook import stats
from client_hook.model_info import param_owners
from client_hook.sampling import Schedule
from client_hook.signals import StepSignals
from client_hook.tensors import HostCopy, first_float_tensor
from client_hook.wire import ACTIVATION_PARAM

log = logging.getLogger("layerwatch")

# Tensors larger than this get their update ratio from a fixed random subset of
# SUBSET_SIZE elements, so the pre-step copy stays small (DESIGN: bounded memory).
SUBSET_THRESHOLD = 1 << 22  # 4M elements = 16 MB in fp32
SUBSET_SIZE = 1 << 16

Row = tuple[str, str, str]  # (layer, param, kind)

# Saturating activations and the fraction of their outputs in the flat tails
# (DIAGNOSTICS `saturated_units`: |tanh| > 0.99, sigmoid outside [0.01, 0.99]).
SATURATION: dict[type, Callable[[torch.Tensor], torch.Tensor]] = {
    nn.Tanh: lambda t: (t.detach().abs() > 0.99).float().mean(),
    nn.Hardtanh: lambda t: (t.detach().abs() >= 0.99).float().mean(),
    nn.Softsign: lambda t: (t.detach().abs() > 0.99).float().mean(),
    nn.Sigmoid: lambda t: ((t.detach() < 0.01) | (t.detach() > 0.99)).float().mean(),
    nn.Hardsigmoid: lambda t: ((t.detach() <= 0.01) | (t.detach() >= 0.99)).float().mean(),
}


def _summarize_by_device(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """`stats.summarize` of each tensor, batched per device with `summarize_many` (ops grow with
    the number of size classes, not of tensors); rows in the order given."""
    rows: list[torch.Tensor | None] = [None] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    for indices in by_device.values():
        matrix = stats.summarize_many([tensors[i].detach() for i in indices])
        for i, row in zip(indices, matrix.unbind()):
            rows[i] = row
    return rows  # type: ignore[return-value]


class Sample:
    """One sampled step's summary rows, copied to the host once; decoded in the sender thread."""

    def __init__(
        self, step: int, every: int, rows: list[Row], summaries: list[torch.Tensor], extras: list[torch.Tensor]
    ):
        """`extras`: per row, [update_ratio, sat_frac] (NaN where they do not apply)."""
        self.step, self.every, self.rows = step, every, rows
        # The step's one device-to-host copy.
        self._copy = HostCopy(torch.cat([torch.stack(summaries), torch.stack(extras)], dim=1))

    def frames(self) -> list[tuple[str, int, dict[str, Any]]]:
        stat_rows, hist_rows = [], []
        for (layer, param, kind), values in zip(self.rows, self._copy.get().tolist()):
            summary, lo, hi, counts = stats.unpack_row(values[:-2])
            ratio, sat = (None if v != v else v for v in values[-2:])  # NaN: does not apply
            stat_rows.append([layer, param, kind, *summary.values(), ratio, sat])
            hist_rows.append([layer, param, kind, lo, hi, counts])
        return [
            ("layer_stats", self.step, {"rows": stat_rows, "every": self.every}),
            ("histograms", self.step, {"rows": hist_rows}),
        ]


class Collector:
    """The hooks on one model (and optionally its optimizer); hands `Sample`s to `emit`."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        *,
        schedule: Schedule,
        emit: Callable[[Any], None],
        on_forward_order: Callable[[list[str]], None],
    ) -> None:
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self._emit = emit
        self._on_forward_order = on_forward_order
        self.step = 0  # the step in progress = optimizer steps completed so far
        self.forward_order: list[str] | None = None
        self._names = {module: name for name, module in model.named_modules()}
        self._owners = param_owners(model)
        self._handles: list[RemovableHandle] = []  # for the whole attachment
        self._armed: list[RemovableHandle] = []  # activation hooks of the sampled step
        self._order_handles: list[RemovableHandle] = []
        self._seen_order: list[str] = []
        self._activations: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._grads: list[tuple[Row, torch.Tensor]] = []
        self._snapshots: dict[int, torch.Tensor] = {}
        self._subsets: dict[int, torch.Tensor] = {}
        self._ready: dict[torch.device, tuple[list[Row], list[torch.Tensor], list[torch.Tensor]]] = {}
        self._quiet: set[str] = set()
        self._watch_forward_order()
        labelled = [(f"{layer}.{name}" if layer else name, param) for (layer, name, _), param in self._parameters()]
        self.signals = StepSignals(model, self._names, labelled)
        if optimizer is not None:
            self.signals.optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
        # Always on, every step: two hooks on the top module only (see signals.py for the cost).
        before = self._guard("signals", self.signals.before_forward, training_only=True, timed=False)
        after = self._guard("signals", self.signals.after_forward, training_only=True, timed=False)
        self._handles.append(model.register_forward_pre_hook(before, with_kwargs=True))
        self._handles.append(model.register_forward_hook(after, with_kwargs=True))
        if optimizer is not None:
            norms = self._guard("signals", self.signals.read_grad_norms, timed=False)
            self._handles.append(optimizer.register_step_pre_hook(lambda *args: norms()))
            self._handles.append(optimizer.register_step_pre_hook(self._guard("optimizer", self._before_step)))
            # Not guarded like the others: counting steps must go on even if sampling went quiet.
            self._handles.append(optimizer.register_step_post_hook(self._after_step))
        self._arm_if_sampled()

    # ------------------------------------------------------------ public

    def is_sampled(self, step: int) -> bool:
        return self.schedule.is_due(step)

    def remove(self) -> None:
        """Remove every hook this collector registered; safe to call twice."""
        for handle in self._handles + self._armed + self._order_handles:
            handle.remove()
        self._handles, self._armed, self._order_handles = [], [], []
        self._snapshots.clear()
        self._activations.clear()
        self._grads.clear()

    @property
    def num_hooks(self) -> int:
        return len(self._handles) + len(self._armed) + len(self._order_handles)

    def finish_step_without_optimizer(self) -> None:
        """Without an optimizer, `mon.log(loss=...)` ends a step: sample it if due, then advance."""
        sampled = self.is_sampled(self.step)
        if "signals" not in self._quiet:
            self._timed(self.signals.read_grad_norms, part="signals")
        if sampled and "optimizer" not in self._quiet:
            self._timed(self._sample_without_optimizer)
        self.schedule.end_step(self.step, sampled)
        self._timed(self._emit_ready)
        self._end_signals()
        self.step += 1
        self._arm_if_sampled()

    def _end_signals(self) -> None:
        """Hand this step's always-on signals to the sender (every step, sampled or not)."""
        if "signals" in self._quiet:
            return
        try:
            self._emit(self.signals.end_step(self.step))
        except Exception:
            self._go_quiet("signals")

    def _sample_without_optimizer(self) -> None:
        self._read_grads()
        self._summarize_step(with_ratios=False)

    # ------------------------------------------------------------ forward order

    def _watch_forward_order(self) -> None:
        def record(module: nn.Module, args: Any) -> None:
            name = self._names.get(module)
            if name is not None and name not in self._seen_order:
                self._seen_order.append(name)

        def done(module: nn.Module, args: Any, output: Any) -> None:
            for handle in self._order_handles:
                handle.remove()
            self._order_handles = []
            self.forward_order = list(self._seen_order)
            self._on_forward_order(self.forward_order)

        for module in self._names:
            self._order_handles.append(module.register_forward_pre_hook(self._guard("order", record)))
        self._order_handles.append(self.model.register_forward_hook(self._guard("order", done)))

    # ------------------------------------------------------------ activations

    def _arm_if_sampled(self) -> None:
        if not self.is_sampled(self.step) or self._armed or "activation" in self._quiet:
            return
        self._activations = {}
        for module in self._names:
            owns_params = next(module.parameters(recurse=False), None) is not None
            is_leaf = next(module.children(), None) is None
            if module is not self.model and (is_leaf or owns_params):
                hook = self._guard("activation", self._activation_hook, training_only=True)
                self._armed.append(module.register_forward_hook(hook))
        self._armed.append(
            self.model.register_forward_hook(self._guard("activation", self._disarm, training_only=True))
        )

    def _activation_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        name = self._names[module]
        if name in self._activations:
            return  # a module called twice in one forward: its first call stands
        tensor = first_float_tensor(output)
        if tensor is not None:
            saturation = SATURATION.get(type(module))
            self._activations[name] = (stats.summarize(tensor), saturation(tensor) if saturation else None)

    def _disarm(self, module: nn.Module, args: Any, output: Any) -> None:
        for handle in self._armed:
            handle.remove()
        self._armed = []

    # ------------------------------------------------------------ optimizer step

    def _parameters(self) -> list[tuple[Row, nn.Parameter]]:
        params = []
        for param in self.model.parameters():
            layer, name = self._owners.get(id(param), ("", "?"))
            params.append(((layer, name, "grad"), param))
        return params

    def _read_grads(self) -> None:
        pairs = [(row, p.grad) for row, p in self._parameters() if p.grad is not None and not p.grad.is_sparse]
        self._grads = list(zip([row for row, _ in pairs], _summarize_by_device([g for _, g in pairs])))

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self.is_sampled(self.step):
            return
        self._read_grads()
        self._snapshots = {}
        for _, param in self._parameters():
            if param.requires_grad:
                self._snapshots[id(param)] = self._subset(param).clone()

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        sampled = self.is_sampled(self.step)
        if sampled and "optimizer" not in self._quiet:
            self._timed(self._summarize_step, with_ratios=True)
        self._snapshots = {}
        self.schedule.end_step(self.step, sampled)
        # Emitted after planning, so the sample carries the interval now in force.
        self._timed(self._emit_ready)
        self._end_signals()
        self.step += 1
        try:
            self._arm_if_sampled()
        except Exception:
            self._go_quiet("activation")

    def _update_ratios(self, params: list[tuple[Row, nn.Parameter]]) -> dict[int, torch.Tensor]:
        """id(param) -> ||w_after - w_before|| / ||w_before||, a few multi-tensor ops per device."""
        by_device: dict[torch.device, list[nn.Parameter]] = {}
        for _, param in params:
            if id(param) in self._snapshots:
                by_device.setdefault(param.device, []).append(param)
        out: dict[int, torch.Tensor] = {}
        for group in by_device.values():
            ratios = stats.update_ratios([self._snapshots[id(p)] for p in group], [self._subset(p) for p in group])
            out.update(zip((id(p) for p in group), ratios.unbind()))
        return out

    def _subset(self, param: torch.Tensor) -> torch.Tensor:
        flat = param.detach().reshape(-1)
        if flat.numel() <= SUBSET_THRESHOLD:
            return flat
        index = self._subsets.get(id(param))
        if index is None or index.device != flat.device:
            # A private generator: the user's RNG stream is never touched.
            generator = torch.Generator().manual_seed(id(param) & 0xFFFF)
            index = torch.randperm(flat.numel(), generator=generator)[:SUBSET_SIZE].to(flat.device)
            self._subsets[id(param)] = index
        return flat[index]

    def _summarize_step(self, *, with_ratios: bool) -> None:
        """Summary rows of this step's activations, gradients and weights, still on device."""
        by_device: dict[torch.device, tuple[list[Row], list[torch.Tensor], list[torch.Tensor]]] = {}

        def add(row: Row, summary: torch.Tensor, ratio: torch.Tensor | None = None, sat: torch.Tensor | None = None):
            bucket = by_device.setdefault(summary.device, ([], [], []))
            bucket[0].append(row)
            bucket[1].append(summary)
            nan = torch.full((), float("nan"), dtype=torch.float64, device=summary.device)
            bucket[2].append(torch.stack([nan if v is None else v.to(torch.float64) for v in (ratio, sat)]))

        for name, (summary, sat) in self._activations.items():
            add((name, ACTIVATION_PARAM, "activation"), summary, sat=sat)
        for row, summary in self._grads:
            add(row, summary)
        params = self._parameters()
        ratios = self._update_ratios(params) if with_ratios else {}
        summaries = _summarize_by_device([param for _, param in params])
        for ((layer, pname, _), param), summary in zip(params, summaries):
            add((layer, pname, "weight"), summary, ratios.get(id(param)))
        self._activations, self._grads = {}, []
        self._ready = by_device

    def _emit_ready(self) -> None:
        """Hand the summarized step to the sender: one device-to-host copy per device, usually one."""
        ready, self._ready = self._ready, {}
        for rows, summaries, ratios in ready.values():
            self._emit(Sample(self.step, self.schedule.every, rows, summaries, ratios))

    # ------------------------------------------------------------ failure policy

    def _guard(
        self, part: str, fn: Callable[..., None], *, training_only: bool = False, timed: bool = True
    ) -> Callable[..., None]:
        """Wrap a hook: no gradient tracking, never raise, go quiet after a failure.

        `training_only` hooks ignore forwards run with gradients off (evaluation
        under `torch.no_grad()` between steps is not the training step).
        """

        def hook(*args: Any) -> None:
            if part in self._quiet or (training_only and not torch.is_grad_enabled()):
                return None
            if timed:
                self._timed(fn, *args, part=part)
            else:  # always-on hooks: not part of a sample's cost
                try:
                    with torch.no_grad():
                        fn(*args)
                except Exception:
                    self._go_quiet(part)
            return None  # hooks only observe: returning None leaves outputs untouched

        return hook

    def _timed(self, fn: Callable[..., None], *args: Any, part: str = "optimizer", **kwargs: Any) -> None:
        """Run hook work under no_grad, never raising; its time feeds the adaptive budget."""
        started = time.perf_counter()  # ~0.1 µs; nothing synchronises with the device
        try:
            with torch.no_grad():
                fn(*args, **kwargs)
        except Exception:
            self._go_quiet(part)
        self.schedule.add_hook_time(time.perf_counter() - started)

    def _go_quiet(self, part: str) -> None:
        self._quiet.add(part)
        log.exception("layerwatch: the %s hook failed and is now off for this run (training is unaffected)", part)
