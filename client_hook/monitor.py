"""The user API: `attach(model, optimizer)` returns a `Monitor`; `log`, `close`.

    from client_hook import monitor
    mon = monitor.attach(model, optimizer=opt, run="my-run")
    for x, y in loader:
        ...; loss.backward(); opt.step()
        mon.log(loss=loss, targets=y)
    mon.close()

`attach` returns at once and never raises because the server is down; `log`
never raises into training (a bad value is logged once and dropped). Steps are
optimizer steps, from 0; without an optimizer each `log(loss=...)` is a step.

Under DDP (a process group initialized at `attach`, or RANK/WORLD_SIZE in the
environment) every rank attaches and all make one run (`training/distributed.py`:
one collective at attach, never during training): rank 0 sends everything, a
rank r > 0 its loss and per-step signals only. A DistributedDataParallel or
DataParallel wrapper is looked through: its `.module`'s layers are hooked and
named (`training/wrapped.py`), as a torch.compile'd model's are its original module's.
"""

from __future__ import annotations

import atexit
import contextvars
import logging
import numbers
import os
import secrets
import socket
import time
import uuid
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from client_hook import __version__, wire
from client_hook.preflight import PreflightReport, copy_model, run_checks
from client_hook.preflight.run import OptimizerArg
from client_hook.sending.sender import DEFAULT_MEMORY_BYTES, DEFAULT_SPOOL_BYTES, Frame, Sender, check_limits
from client_hook.training.collector import Collector, Sample
from client_hook.training.distributed import Distributed, join_run
from client_hook.training.model_info import describe_model, describe_optimizer, group_lrs, weight_rms
from client_hook.training.sampling import DEFAULT_OVERHEAD, NoSamples, Schedule
from client_hook.training.signals import target_check, target_counts
from client_hook.training.tensors import HostCopy
from client_hook.training.wrapped import find_scaler, unwrap_optimizer, unwrap_parallel

log = logging.getLogger("layerwatch")

DEFAULT_SERVER = "http://127.0.0.1:8000"
DEFAULT_CLOSE_TIMEOUT_S = 10.0
PREFLIGHT_CLOSE_TIMEOUT_S = 5.0  # preflight's short-lived monitor waits this long for the server, then gives up

_attached: weakref.WeakKeyDictionary[nn.Module, Monitor] = weakref.WeakKeyDictionary()
# False while preflight attaches its short-lived monitor to a copy: that one is no rank's part of a
# distributed run (preflight is often called on rank 0 alone, where the collective would never return).
_join_distributed: contextvars.ContextVar[bool] = contextvars.ContextVar("join_distributed", default=True)


def attach(
    model: nn.Module,
    optimizer: Any = None,
    *,
    scaler: torch.amp.GradScaler | None = None,
    server: str | None = None,
    run: str | None = None,
    project: str = "default",
    token: str | None = None,
    every: int | None = None,
    on_alert: Callable[[dict[str, Any]], None] | None = None,
    overhead: float = DEFAULT_OVERHEAD,
    close_timeout: float = DEFAULT_CLOSE_TIMEOUT_S,
    spool_dir: str | os.PathLike[str] | None = None,
    spool_max_bytes: int = DEFAULT_SPOOL_BYTES,
    max_memory_bytes: int = DEFAULT_MEMORY_BYTES,
    heartbeat_s: float = wire.HEARTBEAT_S,
    objective: str = "minimize",
) -> Monitor:
    """Start monitoring `model` (and `optimizer`'s steps); returns at once.

    `model` may be compiled (`torch.compile`) or wrapped in DDP: layers are named as in the
    module inside. `optimizer` may be a framework's wrapper (accelerate's AcceleratedOptimizer,
    Lightning's LightningOptimizer, anything holding the torch optimizer as `.optimizer` /
    `._optimizer`): its torch optimizer is hooked. One that cannot be hooked is warned about
    once and the run goes on without optimizer hooks (each `log(loss=...)` is then a step).
    `scaler`: the `torch.amp.GradScaler` the training steps through (found by itself inside
    accelerate's and Lightning's wrappers): a step it skips is counted, marked skipped, and
    its loss scale logged as `loss_scale` with each loss.

    `objective`: "minimize" (the default: the logged loss is driven down) or "adversarial": one
    side of a GAN-like game (attach one monitor per model, each with its optimizer), whose loss
    may rise while training goes well; the loss-curve rules (diverging, oscillating, plateau,
    chance level) then leave it alone, the gradient and activation rules still run.

    Attaching again to the same model closes the earlier monitor first, so hooks
    never double up. Bad arguments raise ValueError/TypeError naming the value.

    While the server is away, frames wait in memory (up to `max_memory_bytes` of
    encoded JSON), then in `<spool_dir>/<run id>/` on disk (default
    $LAYERWATCH_SPOOL_DIR, else a 0700 folder of your own, `~/.cache/layerwatch/spool`; at most
    `spool_max_bytes`, 0 for no spool), oldest histograms dropped first when full.
    A heartbeat goes to the server every `heartbeat_s` seconds.

    In a distributed training call it on every rank at the same point (it makes
    one collective with a process group, see client_hook/training/distributed.py);
    a DDP/DataParallel wrapper is looked through to the module it trains.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, but got {type(model).__name__}")
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler or None, but got {type(scaler).__name__}")
    if optimizer is not None:
        scaler = scaler or find_scaler(optimizer)
        hooked = unwrap_optimizer(optimizer)
        if hooked is None:
            # Never an exception into the training: the run goes on, stepping at log(loss=...).
            log.warning(
                "layerwatch: cannot hook the optimizer %s (no torch.optim.Optimizer with step hooks in it); "
                "monitoring without optimizer hooks: each log(loss=...) counts as a step, gradients are read there",
                type(optimizer).__name__,
            )
        optimizer = hooked
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(f"every must be a positive integer or None, but got {every!r}")
    if isinstance(overhead, bool) or not isinstance(overhead, (int, float)) or not 0 < overhead < 1:
        raise ValueError(f"overhead must be a fraction of step time in (0, 1), but got {overhead!r}")
    if not isinstance(project, str) or not project:
        raise ValueError(f"project must be a non-empty string, but got {project!r}")
    if run is not None and (not isinstance(run, str) or not run):
        raise ValueError(f"run must be a non-empty string or None, but got {run!r}")
    if on_alert is not None and not callable(on_alert):
        raise TypeError(f"on_alert must be callable, but got {on_alert!r}")
    if spool_dir is not None and not isinstance(spool_dir, (str, os.PathLike)):
        raise TypeError(f"spool_dir must be a path or None, but got {spool_dir!r}")
    if objective not in wire.OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(map(repr, wire.OBJECTIVES))}, but got {objective!r}")
    check_limits(spool_max_bytes=spool_max_bytes, max_memory_bytes=max_memory_bytes, heartbeat_s=heartbeat_s)
    model = unwrap_parallel(model)
    previous = _attached.get(model)
    if previous is not None:
        previous.close()
    first = next(model.parameters(), None)
    ddp = None
    if _join_distributed.get():
        ddp = join_run(
            run or time.strftime("run-%Y%m%d-%H%M%S"),
            named=run is not None,
            project=project,
            device=str(first.device) if first is not None else None,
        )
    mon = Monitor(
        model,
        optimizer,
        scaler=scaler,
        server=server or os.environ.get("LAYERWATCH_SERVER") or DEFAULT_SERVER,
        run=ddp.run if ddp is not None else run or time.strftime("run-%Y%m%d-%H%M%S"),
        project=project,
        token=token or os.environ.get("LAYERWATCH_TOKEN"),
        schedule=NoSamples() if ddp is not None and ddp.rank > 0 else Schedule(every, overhead),
        distributed=ddp,
        objective=objective,
        on_alert=on_alert,
        close_timeout=close_timeout,
        sender_limits={
            "spool_dir": spool_dir,
            "spool_max_bytes": spool_max_bytes,
            "max_memory_bytes": max_memory_bytes,
            "heartbeat_s": heartbeat_s,
        },
    )
    _attached[model] = mon
    return mon


def preflight(
    model: nn.Module,
    batch: tuple[Any, Any],
    loss_fn: Callable[..., torch.Tensor] = torch.nn.functional.cross_entropy,
    optimizer: OptimizerArg = None,
    steps: int = 100,
    server: str | None = None,
    run: str | None = None,
) -> PreflightReport:
    """Run the pre-training checks on copies of `model` and `batch`; return the report.

    `batch` is `(x, y)`: the model is called as `model(x)` (`model(*x)` for a
    tuple, `model(**x)` for a dict) and the loss as `loss_fn(output, y)`.
    `optimizer` is a factory (`params -> Optimizer`), an optimizer instance (an
    equivalent one of the same class and param-group hyperparameters is built
    on the copy, parameters matched by name), or None for Adam(lr=1e-2).
    A batch the model or loss cannot take raises ValueError naming the shapes.

    With `server`/`run` (or a monitor already attached to the model) the findings
    go to the server as one `findings` frame and show as alerts on the run's page;
    that never raises because the server is away (the sender logs it).
    """
    report, order = run_checks(model, batch, loss_fn, optimizer, steps)
    findings = [f.as_dict() for f in report.findings]
    mon = _attached.get(unwrap_parallel(model))
    if mon is not None:
        # The copy's forward order stands in for the first training forward not seen yet.
        mon._record_findings(findings, order)
    elif server is not None or run is not None:
        alone = _join_distributed.set(False)
        try:
            shadow = attach(copy_model(model), server=server, run=run, every=1, close_timeout=PREFLIGHT_CLOSE_TIMEOUT_S)
        finally:
            _join_distributed.reset(alone)
        try:
            shadow._record_findings(findings, order)
        finally:
            shadow.close()
        log.info("layerwatch: preflight findings (%d) sent to run %r at %s", len(findings), shadow.run, shadow.server)
    return report


class Monitor:
    """One monitored run. Create it with `attach`."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        *,
        scaler: torch.amp.GradScaler | None = None,
        server: str,
        run: str,
        project: str,
        token: str | None,
        schedule: Schedule,
        on_alert: Callable[[dict[str, Any]], None] | None,
        close_timeout: float,
        sender_limits: dict[str, Any] | None = None,
        distributed: Distributed | None = None,
        objective: str = "minimize",
    ) -> None:
        self.model, self.optimizer = model, optimizer
        self.objective = objective
        self.run, self.project, self.server = run, project, server
        # Under DDP the run its ranks agreed on at attach; else a new one.
        self.distributed = distributed
        self.rank = distributed.rank if distributed is not None else None
        self.run_id = distributed.run_id if distributed is not None else uuid.uuid4().hex
        # Proves to the server that later frames of this run come from its own client (wire: run_start
        # "secret"; the server keeps only its hash). Never logged, never in status().
        self._secret = distributed.secret if distributed is not None and distributed.secret else secrets.token_hex(16)
        self._close_timeout = close_timeout
        self._closed = False
        self._started = False
        self._warned: set[str] = set()
        self._last_step: int | None = None  # the step the latest loss was logged at
        self._loss_after_step: bool | None = None  # does the user log after opt.step()?
        self._sender = Sender(
            server=server,
            run_id=self.run_id,
            rank=self.rank,
            token=token,
            on_alert=on_alert,
            **(sender_limits or {}),
        )
        # Read now, at attach (a device sync here costs nothing; at the first forward it would be the step's).
        self._weight_rms = weight_rms(model)
        self._collector = Collector(
            model, optimizer, schedule=schedule, emit=self._emit_sample, on_forward_order=self._start
        )
        self.scaler = scaler
        self._scaler_step: Callable[..., Any] | None = None
        if scaler is not None and optimizer is not None:
            self._watch_scaler(scaler)
        self._atexit = _close_at_exit(self)
        atexit.register(self._atexit)

    # ------------------------------------------------------------ user API

    @property
    def step(self) -> int:
        """The step in progress (optimizer steps completed so far)."""
        return self._collector.step

    @property
    def every(self) -> int:
        """The current sampling interval (it changes over the run when `every=None`)."""
        return self._collector.schedule.every

    @property
    def dashboard_url(self) -> str:
        return f"{self.server.rstrip('/')}/#/run/{self.run_id}"

    def log(self, loss: Any = None, targets: Any = None, **scalars: Any) -> None:
        """Record this step's loss and any scalars; never raises.

        `loss` (float or tensor) ends a step when there is no optimizer. Scalars
        logged without a loss (e.g. `val_loss`) belong to the latest step.
        `targets` (class labels) are counted for the data checks (single-class
        batches, class imbalance); any targets' shape is compared with the step's
        output (shape_mismatch), and in the first steps the loss with what the
        output's rows would give (softmax_before_loss).
        """
        if self._closed:
            self._warn_once("closed", "layerwatch: log() after close() is ignored")
            return
        try:
            self._log(loss, targets, scalars)
        except Exception:
            self._warn_once("log", "layerwatch: log() failed; this step's scalars are dropped", exc_info=True)

    def close(self, status: str = "finished") -> None:
        """Flush (waiting at most `close_timeout` s for the server), remove every hook. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._atexit)
        if _attached.get(self.model) is self:
            del _attached[self.model]
        self._collector.remove()
        self._unwatch_scaler()
        self._start(self._collector.forward_order)
        step = self._last_step if self._last_step is not None else max(self._collector.step - 1, 0)
        self._sender.submit(Frame("run_end", step, status=status, time=time.time()))
        self._sender.close(self._close_timeout)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close("crashed" if exc_type is not None else "finished")

    def status(self) -> dict[str, Any]:
        """Delivery state, for the curious and for tests."""
        return {
            "run_id": self.run_id,
            "step": self.step,
            "every": self.every,
            "every_mode": self._collector.schedule.mode,
            "connected": self._sender.connected,
            "acked": self._sender.acked,
            "dropped": dict(self._sender.dropped),
            "hooks": self._collector.num_hooks,
            "skipped_steps": self._collector.skipped,
            "rank": self.rank,
            "world_size": self.distributed.world_size if self.distributed is not None else None,
        }

    # ------------------------------------------------------------ internals

    def _start(self, forward_order: list[str] | None) -> None:
        """Queue run_start (seq 0) once: at the end of the first forward, or earlier if needed."""
        if self._started:
            return
        self._started = True
        optimized = {id(p) for g in self.optimizer.param_groups for p in g["params"]} if self.optimizer else set()
        first = next(self.model.parameters(), None)
        config = {
            "objective": self.objective,
            "every": self.every,
            "every_mode": self._collector.schedule.mode,
            "overhead_budget": self._collector.schedule.overhead,
            "grad_source": "optimizer step pre-hook (after unscaling and clipping)" if self.optimizer else "at log()",
            "amp_scaler": self.scaler is not None,  # skipped steps are seen (and marked) only with one
            "compiled": self._collector.compiled,  # compiled at attach: no activation statistics
            "layerwatch": __version__,
            "torch": torch.__version__,
            "device": str(first.device) if first is not None else None,
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        if self.distributed is not None:  # rank, world_size, how the run id was agreed, each rank's host and pid
            config.update(self.distributed.config)
        self._sender.submit(
            Frame(
                "run_start",
                0,
                name=self.run,
                project=self.project,
                time=time.time(),
                model=describe_model(self._collector.inner, forward_order, optimized, self._weight_rms),
                optimizer=describe_optimizer(self.optimizer),
                config=config,
                secret=self._secret,
            )
        )

    def _record_findings(self, findings: list[dict[str, Any]], forward_order: list[str]) -> None:
        """Send preflight's findings as one frame (after run_start, which must reach the server first)."""
        if self.rank:
            log.info("layerwatch: preflight findings go to the run from rank 0 only; rank %d keeps them", self.rank)
            return
        self._start(self._collector.forward_order or forward_order)
        self._sender.submit(Frame("findings", 0, findings=findings))

    def _emit_sample(self, sample: Sample) -> None:
        self._start(self._collector.forward_order)
        self._sender.submit(sample)

    def _log(self, loss: Any, targets: Any, scalars: dict[str, Any]) -> None:
        self._start(self._collector.forward_order)
        values: dict[str, Any] = {}
        for key, value in scalars.items():
            number = self._number(key, value)
            if number is not None:
                values[key] = number
        if loss is not None:
            number = self._number("loss", loss)
            if number is not None:
                values["loss"] = number
            step = self._loss_step()
            self._last_step = step
        else:
            step = self._last_step if self._last_step is not None else 0
        if self.optimizer is not None and loss is not None and not self.rank:
            # The rates the step ran with (read in its step pre-hook): a scheduler may have stepped since.
            # The same on every rank: rank 0's stand for all, as does its loss scale.
            values.update(self._collector.lrs_at(step) or group_lrs(self.optimizer))
            scale = getattr(self.scaler, "_scale", None) if self.scaler is not None else None
            if isinstance(scale, torch.Tensor) and self.scaler.is_enabled():
                number = self._number("loss_scale", scale)  # a CUDA tensor is read without a sync
                if number is not None:
                    values["loss_scale"] = number
        if values:
            self._sender.submit(_Scalars(step, values))
        counts = target_counts(step, targets) if targets is not None else None
        if counts is not None:
            self._sender.submit(counts)
        checked = (
            target_check(step, targets, loss, self._collector.signals.last_output) if targets is not None else None
        )
        if checked is not None:
            self._sender.submit(checked)
        if loss is not None and self.optimizer is None:
            self._collector.finish_step_without_optimizer()

    def _loss_step(self) -> int:
        """The step a loss belongs to.

        With an optimizer, the first `log(loss=...)` tells whether the user logs
        after `opt.step()` (the usual loop: the loss is the step just taken) or
        before it (the loss is the step in progress).
        """
        completed = self._collector.step
        if self.optimizer is None:
            return completed
        if self._loss_after_step is None:
            self._loss_after_step = completed > 0
        return completed - 1 if self._loss_after_step and completed > 0 else completed

    def _watch_scaler(self, scaler: torch.amp.GradScaler) -> None:
        """See each `scaler.step(optimizer)` that returns without running the optimizer's step.

        The instance's `step` is wrapped (restored at close): the scaler has already read
        whether the gradients are finite (its own host sync), so knowing costs nothing more.
        """
        original = scaler.step
        collector = self._collector

        def step(optimizer: Any, *args: Any, **kwargs: Any) -> Any:
            before = collector.step
            result = original(optimizer, *args, **kwargs)
            try:
                if collector.step == before and unwrap_optimizer(optimizer) is self.optimizer:
                    collector.skip_step()
            except Exception:
                self._warn_once("scaler", "layerwatch: reading a skipped AMP step failed", exc_info=True)
            return result

        self._scaler_step = step
        scaler.step = step  # type: ignore[method-assign]

    def _unwatch_scaler(self) -> None:
        if self._scaler_step is not None and vars(self.scaler).get("step") is self._scaler_step:
            del self.scaler.step  # the class's method again
        self._scaler_step = None

    def _number(self, key: str, value: Any) -> float | _Deferred | None:
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                self._warn_once(
                    f"shape:{key}",
                    "layerwatch: %s must be a single number, but got a tensor of shape %s; dropped",
                    key,
                    tuple(value.shape),
                )
                return None
            value = value.detach()  # float() of a tensor that requires grad warns
            if value.device.type == "cuda":
                return _Deferred(value)
            return float(value)  # CPU: no device sync involved
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        self._warn_once(
            f"type:{key}", "layerwatch: %s must be a number or a one-element tensor, but got %r; dropped", key, value
        )
        return None

    def _warn_once(self, key: str, msg: str, *args: Any, exc_info: bool = False) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args, exc_info=exc_info)


class _Deferred:
    """A CUDA scalar copied to pinned host memory without waiting; read in the sender thread."""

    def __init__(self, value: torch.Tensor) -> None:
        self._copy = HostCopy(value)

    def resolve(self) -> float:
        return float(self._copy.get())


class _Scalars:
    """A step's scalars; CUDA values are resolved in the sender thread."""

    def __init__(self, step: int, values: dict[str, Any]) -> None:
        self.step, self.values, self.time = step, values, time.time()

    def frames(self) -> list[tuple[str, int, dict[str, Any]]]:
        values = {k: v.resolve() if isinstance(v, _Deferred) else v for k, v in self.values.items()}
        return [("scalars", self.step, {"values": values, "time": self.time})]


def _close_at_exit(mon: Monitor) -> Callable[[], None]:
    """An atexit callback that closes `mon` if it is still alive, without keeping it alive."""
    ref = weakref.ref(mon)

    def close() -> None:
        alive = ref()
        if alive is not None:
            alive.close()

    return close
