"""Callbacks that put layerwatch on a training framework's own loop, in one line.

    from layerwatch.integrations.lightning import LayerwatchCallback     # pytorch_lightning / lightning.pytorch
    from layerwatch.integrations.huggingface import LayerwatchCallback   # transformers.Trainer

    trainer = Trainer(..., callbacks=[LayerwatchCallback(run="bert-lr3e-4", every=10)])

The keyword arguments are `layerwatch.attach`'s (all but the model and the optimizer,
which the callback takes from the trainer). Each callback module imports its own
framework only, never the other, and the monitor only when training starts; this
package imports neither (nor torch).

`StepRecorder` is what both callbacks do once a framework has said what happened:
attach on rank 0, one loss per optimizer step (its micro-batches combined), evaluation
metrics at the latest step, close as finished or crashed. Each module's docstring says
how its framework's `global_step` maps to the dashboard's steps.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import logging
import numbers
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

    from layerwatch import Monitor

log = logging.getLogger("layerwatch")

# Names `Monitor.log` takes as its own arguments: a metric so named would be read as the
# training loss (advancing a step) or as class labels, so it is not forwarded.
RESERVED_KEYS = frozenset({"loss", "targets"})

_Method = TypeVar("_Method", bound=Callable[..., Any])


def _never_raises(method: _Method) -> _Method:
    """A recorder method that logs its first failure and is off from then on (training goes on)."""
    name = method.__name__

    @functools.wraps(method)
    def guarded(self: StepRecorder, *args: Any, **kwargs: Any) -> Any:
        if name in self._quiet:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception:
            self._quiet.add(name)
            log.exception(
                "layerwatch: the %s callback's %s failed and is now off (training is unaffected)", self.framework, name
            )
            return None

    return guarded  # type: ignore[return-value]


def check_attach_kwargs(attach_kwargs: dict[str, Any]) -> None:
    """TypeError now, at the callback's construction, for an argument `layerwatch.attach` would refuse by name."""
    import layerwatch

    for name in ("model", "optimizer"):
        if name in attach_kwargs:
            raise TypeError(f"LayerwatchCallback attaches to the trainer's own {name}; do not pass {name}=")
    try:
        inspect.signature(layerwatch.attach).bind(None, **attach_kwargs)
    except TypeError as exc:
        raise TypeError(f"LayerwatchCallback takes layerwatch.attach's keyword arguments: {exc}") from None


def torch_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside a wrapper whose `.optimizer` is one (accelerate's AcceleratedOptimizer).

    AcceleratedOptimizer, what transformers' Trainer hands its callbacks, subclasses
    `torch.optim.Optimizer` without running its `__init__`: it has no hook registries, and
    `layerwatch.attach` raises AttributeError on it today (`optimizer.register_step_pre_hook`
    in `Collector.__init__`). Its `step()` runs the wrapped optimizer's, so the hooks belong
    there. Remove once attach unwraps by itself (DESIGN.md: attach never raises on a wrapped
    optimizer).
    """
    import torch

    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class StepRecorder:
    """One monitored training as a framework callback sees it. No method raises into training.

    The callback calls `start` when training starts (rank 0 only), `add_loss` with each
    micro-batch's loss, `end_step` when an optimizer step ended, `log_metrics` after an
    evaluation and `close` at the end.
    """

    def __init__(self, framework: str, attach_kwargs: dict[str, Any]) -> None:
        check_attach_kwargs(attach_kwargs)
        self.framework = framework
        self.attach_kwargs = dict(attach_kwargs)
        self.monitor: Monitor | None = None  # kept after close: its run_id and dashboard_url stay readable
        self._open = False
        self._quiet: set[str] = set()
        self._warned: set[str] = set()
        self._start_step = 0  # the framework's step count when the monitor was attached
        self._seen_steps = 0  # monitor.step when the latest step's loss was logged
        self._reset_loss()

    @property
    def recording(self) -> bool:
        return self._open

    @_never_raises
    def start(self, model: torch.nn.Module, optimizer: Any, *, steps_done: int, run: str | None = None) -> None:
        """Attach to `model` and `optimizer`; `steps_done`: optimizer steps the framework counts already (a resume)."""
        import layerwatch

        if self._open:  # a second fit() after one that never ended (an exception the framework did not report)
            self.close("crashed")
        kwargs = dict(self.attach_kwargs)
        if run and "run" not in kwargs:
            kwargs["run"] = run
        self.monitor = layerwatch.attach(model, optimizer=torch_optimizer(optimizer), **kwargs)
        self._open = True
        self._start_step, self._seen_steps = steps_done, 0
        self._reset_loss()
        atexit.register(self._close_at_exit)  # runs before the monitor's own (atexit is last in, first out)
        log.info("layerwatch: %s training monitored at %s", self.framework, self.monitor.dashboard_url)

    @_never_raises
    def add_loss(self, loss: Any, *, share: bool = False) -> None:
        """One micro-batch's loss: its mean (`share=False`) or its share of the step's mean (`share=True`, summed).

        A tensor stays on its device: one add per micro-batch, no host sync.
        """
        if not self._open or loss is None:
            return
        if hasattr(loss, "detach"):
            loss = loss.detach()
        self._total = loss if self._total is None else self._total + loss
        self._count += 1
        self._shares = share

    @_never_raises
    def end_step(self, steps_done: int) -> None:
        """An optimizer step ended; `steps_done` counts it (the framework's global step after it)."""
        if not self._open:
            return
        mon = self.monitor
        assert mon is not None
        total, count, shares = self._total, self._count, self._shares
        self._reset_loss()
        if mon.optimizer is not None:
            if mon.step == self._seen_steps:
                # The framework counted a step the optimizer did not take (AMP's GradScaler skips a step whose
                # gradients overflowed). Logged anyway, the loss would land on the previous step and replace its
                # loss there; the dashboard cannot say "this step was skipped" yet, so it is left out.
                self._warn_once(
                    "skipped",
                    "layerwatch: %s step %d ran no optimizer step (skipped by AMP?); its loss is not recorded "
                    "and the dashboard's steps now lag the trainer's",
                    self.framework,
                    steps_done,
                )
                return
            self._seen_steps = mon.step
        if total is None:
            self._warn_once(
                "no-loss", "layerwatch: no training loss seen for %s step %d; none recorded", self.framework, steps_done
            )
        else:
            mon.log(loss=total if shares else total / count)
        if mon.step != steps_done - self._start_step:
            self._warn_once(
                "drift",
                "layerwatch: the monitor counts %d optimizer steps where %s counts %d since attach; "
                "dashboard steps and the trainer's global step differ from here on",
                mon.step,
                self.framework,
                steps_done - self._start_step,
            )

    @_never_raises
    def log_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Evaluation metrics (numbers or one-element tensors), stored at the latest step under their own names."""
        if not self._open:
            return
        assert self.monitor is not None
        values = {}
        for key, value in metrics.items():
            if key in RESERVED_KEYS:
                self._warn_once(
                    f"reserved:{key}",
                    "layerwatch: a metric named %r is not recorded (layerwatch's log() reads that name as its own "
                    "argument); log it under another name, e.g. 'val_%s'",
                    key,
                    key,
                )
            elif (isinstance(value, numbers.Real) and not isinstance(value, bool)) or hasattr(value, "numel"):
                values[key] = value
        if values:
            self.monitor.log(**values)

    @_never_raises
    def close(self, status: str = "finished") -> None:
        """Flush and detach (the monitor waits up to its close_timeout for the server). Idempotent."""
        if not self._open:
            return
        self._open = False
        atexit.unregister(self._close_at_exit)
        assert self.monitor is not None
        self.monitor.close(status)

    def _close_at_exit(self) -> None:
        # Still open at exit: training began and never reported its end (an exception the framework has no
        # hook for, e.g. out of transformers' Trainer.train()).
        self.close("crashed")

    def _reset_loss(self) -> None:
        self._total: Any = None
        self._count = 0
        self._shares = False

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)
