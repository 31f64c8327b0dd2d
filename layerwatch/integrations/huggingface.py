"""transformers' Trainer: `LayerwatchCallback(**attach_kwargs)` monitors `Trainer.train` in one line.

    from layerwatch.integrations.huggingface import LayerwatchCallback
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                      callbacks=[LayerwatchCallback(run="gpt2-lr3e-4")])
    trainer.train()

The keyword arguments are `layerwatch.attach`'s. Event by event, on the world's main
process only (`state.is_world_process_zero`; the other ranks attach nothing):

- `on_train_begin`: `layerwatch.attach(model, optimizer=optimizer, **attach_kwargs)` with the
  model and optimizer the Trainer hands its callbacks. The optimizer is accelerate's
  `AcceleratedOptimizer`; attach hooks the torch optimizer inside it and finds accelerate's
  GradScaler under fp16, so a step the scaler skips is counted and marked skipped.
- the loss of every optimizer step, whatever `logging_steps` is: the value each
  `Trainer.training_step` call returns (the Trainer's own per-micro-batch loss, already its
  share of the step: divided by the accumulation steps, or by the step's token count), summed
  over the step's micro-batches — exactly what the Trainer logs as `loss` at
  `logging_steps=1`, but unrounded and without its NaN filter (a NaN loss is recorded as NaN,
  where the Trainer would log the average of earlier steps instead). The callback reaches
  `training_step` through the Trainer that called `on_train_begin` (found on the call
  stack, as callbacks are not handed the Trainer) and wraps it on that instance only,
  restored at `on_train_end`. Without it (a Trainer that calls callbacks some other way) it
  records the Trainer's logged `loss` at the logging steps instead, and says so once.
- `on_evaluate`: the evaluation metrics (`eval_loss`, `eval_accuracy`, ...) at the latest
  step; the Trainer's timing entries (`*_runtime`, `*_per_second`) and `epoch` are left out.
- `on_train_end` closes the run as `finished`; a training that raises out of `train()` is
  closed as `crashed` at exit.

Steps. The dashboard's step s is the run's (s + 1)-th optimizer step, counted from 0:
the Trainer's `state.global_step` is s + 1 once that step is taken (its `on_step_end`), so
the Trainer's `loss` logged at global step G is layerwatch's step G - 1, and an evaluation
at global step G is stored at step G - 1, the step it followed. A resumed training counts
from 0 at attach: step s is then global step `start + s + 1`.
"""

from __future__ import annotations

import inspect
import numbers
from typing import Any

from transformers import Trainer, TrainerCallback

from layerwatch.integrations import RESERVED_KEYS, StepRecorder

_SKIPPED_METRICS = ("_runtime", "_per_second", "_steps_per_second")
_STACK_DEPTH = 8  # frames between the Trainer's training loop and on_train_begin (3 in transformers 4.4x-5.x)


class LayerwatchCallback(TrainerCallback):
    """Attach layerwatch when training begins; one loss per optimizer step, evaluation metrics, close."""

    def __init__(self, **attach_kwargs: Any) -> None:
        self._recorder = StepRecorder("HF Trainer", attach_kwargs)
        self._trainer: Trainer | None = None
        self._from_logs = False  # no Trainer found: the logged loss stands in for every step's

    @property
    def monitor(self) -> Any:
        """The run's `layerwatch.Monitor` once training began (None on other ranks); kept after the end."""
        return self._recorder.monitor

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or model is None:
            return
        self._recorder.start(model, kwargs.get("optimizer"), steps_done=state.global_step, run=args.run_name)
        if not self._recorder.recording:
            return
        self._trainer = _calling_trainer()
        self._from_logs = self._trainer is None
        if self._trainer is not None:
            self._wrap_training_step(self._trainer)
        else:
            self._recorder._warn_once(
                "no-trainer",
                "layerwatch: the HF Trainer calling this callback was not found; the training loss is recorded "
                "at the logging steps only (set logging_steps=1 for every step)",
            )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._recorder.recording and not self._from_logs:
            self._recorder.end_step(state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if self._from_logs and self._recorder.recording and logs and "loss" in logs:
            self._recorder.add_loss(logs["loss"])
            self._recorder.end_step(state.global_step)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        if not self._recorder.recording or not metrics:
            return
        kept = {
            key: value
            for key, value in metrics.items()
            if key != "epoch" and not key.endswith(_SKIPPED_METRICS) and key not in RESERVED_KEYS
            and isinstance(value, numbers.Real) and not isinstance(value, bool)
        }  # fmt: skip
        self._recorder.log_metrics(kept)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._unwrap_training_step()
        self._recorder.close("finished")

    # ------------------------------------------------------------ the per-step loss

    def _wrap_training_step(self, trainer: Trainer) -> None:
        original = trainer.training_step
        recorder = self._recorder

        def training_step(*args: Any, **kwargs: Any) -> Any:
            loss = original(*args, **kwargs)
            recorder.add_loss(loss, share=True)  # a detached 0-d tensor: one add on its device, no sync
            return loss

        training_step.__wrapped__ = original  # type: ignore[attr-defined]
        trainer.training_step = training_step  # type: ignore[method-assign]

    def _unwrap_training_step(self) -> None:
        trainer, self._trainer = self._trainer, None
        step = vars(trainer).get("training_step") if trainer is not None else None
        if step is not None and hasattr(step, "__wrapped__"):
            del trainer.training_step  # the class's method again


def _calling_trainer() -> Trainer | None:
    """The Trainer whose training loop is calling this callback, from the call stack (or None)."""
    frame = inspect.currentframe()
    try:
        for _ in range(_STACK_DEPTH):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer):
                return candidate
        return None
    finally:
        del frame  # a frame kept in a local would keep the whole stack alive
