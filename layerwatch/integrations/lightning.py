"""Lightning: `LayerwatchCallback(**attach_kwargs)` monitors a `Trainer.fit` in one line.

    from layerwatch.integrations.lightning import LayerwatchCallback
    trainer = Trainer(..., callbacks=[LayerwatchCallback(run="resnet-lr0.1", every=10)])
    trainer.fit(module, train_loader, val_loader)
    callback.monitor.dashboard_url

The keyword arguments are `layerwatch.attach`'s. The callback is a `Callback` of
`pytorch_lightning` and of `lightning.pytorch`, of whichever is installed (both, when both
are). Hook by hook, on global rank 0 only (other ranks attach nothing):

- `on_train_start` (after the sanity check): `layerwatch.attach(pl_module,
  optimizer=trainer.optimizers[0], **attach_kwargs)`; `callback.monitor` is the Monitor.
- `on_train_batch_end`: the batch's loss, `outputs["loss"]` (the value `training_step`
  returned; Lightning hands it divided by `accumulate_grad_batches`, so it is multiplied
  back). A batch that ended an optimizer step (`trainer.global_step` advanced) logs the mean
  of that step's micro-batch losses: one loss per optimizer step.
- `on_validation_end` (not in the sanity check): what the validation loop logged with
  `self.log(...)`, under the names it was logged as (`val_loss`, or `val_loss_epoch` when
  logged with both `on_step` and `on_epoch`), read from `trainer.callback_metrics`.
- `on_train_end` closes the run as `finished`; `on_exception` as `crashed`.

Steps. The dashboard's step s is the run's s-th optimizer step, from 0: inside that step
(`training_step` of its batches, `on_before_optimizer_step`) `trainer.global_step` reads
s, and from its `on_train_batch_end` on it reads s + 1 — so a step's loss, logged there,
is stored at `trainer.global_step - 1`, and validation that runs at
`trainer.global_step == G` is stored at step G - 1, the step it followed. A resumed fit
counts from 0 at attach: step s is then global step `start + s`. Only
`trainer.optimizers[0]` is hooked; with several optimizers (manual optimization, GANs)
`trainer.global_step` counts the steps of all of them and the callback warns once when
the two counts part.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from layerwatch.integrations import StepRecorder


def _callback_bases() -> tuple[type, ...]:
    """`Callback` of each Lightning package installed: `lightning.pytorch`, `pytorch_lightning`."""
    bases = []
    for package in ("lightning.pytorch", "pytorch_lightning"):
        try:
            bases.append(importlib.import_module(package).Callback)
        except ImportError:
            continue
    if not bases:
        raise ImportError(
            "layerwatch.integrations.lightning needs Lightning: pip install pytorch-lightning (or lightning)"
        )
    return tuple(bases)


class LayerwatchCallback(*_callback_bases()):  # type: ignore[misc]
    """Attach layerwatch when `fit` starts training; a loss per optimizer step, validation metrics, close."""

    def __init__(self, **attach_kwargs: Any) -> None:
        super().__init__()
        self._recorder = StepRecorder("Lightning", attach_kwargs)
        self._seen_global_step = 0

    @property
    def monitor(self) -> Any:
        """The run's `layerwatch.Monitor` once training started (None on other ranks); kept after the end."""
        return self._recorder.monitor

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self._seen_global_step = trainer.global_step
        self._recorder.start(pl_module, optimizer, steps_done=trainer.global_step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._recorder.recording:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if loss is not None and not hasattr(loss, "detach"):
            loss = None  # training_step returned something that is not a loss
        if loss is not None and pl_module.automatic_optimization:
            loss = loss * trainer.accumulate_grad_batches  # undo Lightning's 1/N: the micro-batch's own mean
        self._recorder.add_loss(loss)
        stepped = trainer.global_step != self._seen_global_step
        if stepped or not trainer.optimizers:  # without an optimizer every batch is a step
            self._seen_global_step = trainer.global_step
            self._recorder.end_step(trainer.global_step)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or not self._recorder.recording:
            return
        self._recorder.log_metrics(_validation_metrics(trainer))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._recorder.close("finished")

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._recorder.close("crashed")


def _validation_metrics(trainer: Any) -> dict[str, Any]:
    """The callback metrics the validation loop just logged.

    `trainer.callback_metrics` also holds the latest training-step metrics and earlier
    epochs' aggregates; stored at this step they would be stale. While `on_validation_end`
    runs, the trainer's active results (`trainer._results`, private: the validation loop's
    `_ResultCollection`) name exactly what validation logged. Without it, every callback
    metric is taken.
    """
    metrics = dict(trainer.callback_metrics)
    results = getattr(trainer, "_results", None)
    try:
        logged = results.metrics(False)["callback"] if results is not None else metrics
    except Exception:  # a Lightning whose private results differ: take them all
        logged = metrics
    return {key: metrics[key] for key in logged if key in metrics}
