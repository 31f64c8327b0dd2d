"""transformers' Trainer with `layerwatch.integrations.huggingface.LayerwatchCallback`, for real: a tiny BERT
built from config (nothing downloaded) trains on CPU; what the server stored is checked against what the
Trainer itself measured at every step, from its own callback events.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from layerwatch.integrations.huggingface import LayerwatchCallback
from tests.frameworks.conftest import alarms, get

STEPS = 12


class Tokens(torch.utils.data.Dataset):
    """Random token sequences whose label is whether token 7 occurs: learnable, padded like real batches."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 64, (n, 16), generator=g)
        lengths = torch.randint(8, 17, (n,), generator=g)
        self.mask = (torch.arange(16)[None, :] < lengths[:, None]).long()
        self.ids = self.ids * self.mask  # 0 is the padding id
        self.labels = (self.ids == 7).any(dim=1).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


class Measured(TrainerCallback):
    """What the Trainer's own events show at every optimizer step: the clipped gradients' global norm and
    the learning rate the step is about to apply (on_pre_optimizer_step comes right before it)."""

    def __init__(self) -> None:
        self.grad_norms: list[float] = []
        self.lrs: list[float] = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        squares = sum(float(p.grad.double().norm()) ** 2 for p in model.parameters() if p.grad is not None)
        self.grad_norms.append(math.sqrt(squares))
        self.lrs.append(kwargs["optimizer"].param_groups[0]["lr"])


def _train(
    tmp: Path, url: str, *, logging_steps: int, accumulation: int = 1, run: str
) -> tuple[Any, Trainer, Measured]:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=2,
    )  # fmt: skip
    model = BertForSequenceClassification(config)
    args = TrainingArguments(
        output_dir=str(tmp), per_device_train_batch_size=8, gradient_accumulation_steps=accumulation,
        max_steps=STEPS, learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=3, logging_steps=logging_steps,
        eval_strategy="steps", eval_steps=6, per_device_eval_batch_size=16, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0, run_name=run,
    )  # fmt: skip
    watch = LayerwatchCallback(server=url, every=3, close_timeout=60)
    measured = Measured()
    trainer = Trainer(
        model=model, args=args, train_dataset=Tokens(256, 0), eval_dataset=Tokens(64, 1), callbacks=[watch, measured]
    )
    trainer.train()
    return watch, trainer, measured


def test_every_step_is_stored_at_the_trainers_step_with_its_loss_gradients_and_lr(
    tmp_path: Path, url: str, signals
) -> None:
    watch, trainer, measured = _train(tmp_path, url, logging_steps=1, run="hf-bert")
    run_id = watch.monitor.run_id
    assert trainer.state.global_step == STEPS
    logged = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    assert sorted(logged) == list(range(1, STEPS + 1))
    loss = get(url, run_id, "scalars", key="loss")
    # Step s is the Trainer's global step s + 1; its loss the one the Trainer logs there (rounded to 4 places).
    assert loss["steps"] == list(range(STEPS))
    assert loss["values"] == pytest.approx([logged[s + 1] for s in range(STEPS)], abs=1e-4)
    stored = signals(run_id)
    assert sorted(stored) == list(range(STEPS))
    assert [stored[s]["grad_norm"] for s in range(STEPS)] == pytest.approx(measured.grad_norms, rel=1e-5)
    lr = get(url, run_id, "scalars", key="lr")
    assert lr["steps"] == list(range(STEPS)) and lr["values"] == pytest.approx(measured.lrs, rel=1e-9)
    # Token batches are fingerprinted (repeated_batch watches them), never judged for normalisation;
    # the Trainer's 0-d num_items_in_batch keyword is not taken for the batch.
    assert all(stored[s].get("input_fingerprint") for s in range(STEPS))
    assert not any("input_mean" in fields for fields in stored.values())
    evals = get(url, run_id, "scalars", key="eval_loss")
    assert evals["steps"] == [5, 11]  # evaluated at global steps 6 and 12
    run = get(url, run_id)
    assert run["status"] == "finished" and run["optimizer"]["type"] == "AdamW"
    assert alarms(url, run_id) == []


def test_every_step_has_a_loss_whatever_logging_steps_and_with_accumulation(tmp_path: Path, url: str) -> None:
    watch, trainer, _ = _train(tmp_path, url, logging_steps=5, accumulation=2, run="hf-bert-accum")
    run_id = watch.monitor.run_id
    loss = get(url, run_id, "scalars", key="loss")
    assert loss["steps"] == list(range(STEPS))
    # The Trainer logs the mean over its logging window: the stored per-step losses average to it.
    logged = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    assert logged[5] == pytest.approx(sum(loss["values"][0:5]) / 5, abs=1e-4)
    assert logged[10] == pytest.approx(sum(loss["values"][5:10]) / 5, abs=1e-4)
    assert alarms(url, run_id) == []


def test_attaching_to_the_accelerated_optimizer_the_trainer_hands_out_never_raises(tmp_path: Path, url: str) -> None:
    watch, trainer, _ = _train(tmp_path, url, logging_steps=50, run="hf-bert-optimizer")
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"
    assert watch.monitor.optimizer is trainer.optimizer.optimizer  # the torch optimizer inside is hooked
    assert watch.monitor.status()["step"] == STEPS


class MarkovText(torch.utils.data.Dataset):
    """Windows of a first-order Markov token stream (learnable to ~1.2 nats from ln 32), as causal-LM examples."""

    def __init__(self, n: int, seed: int, context: int = 32) -> None:
        from tests.faults.healthy_models import _peaked_chain

        self.stream, self.context, self.n = _peaked_chain(20000, 32, seed), context, n
        self.starts = torch.randint(0, 20000 - context - 1, (n,), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.stream[self.starts[i] : self.starts[i] + self.context]
        return {"input_ids": ids, "labels": ids}


def test_a_healthy_gpt2_under_the_trainer_for_300_steps_gets_no_warning(tmp_path: Path, url: str) -> None:
    """The issue's cry-wolf case: a GPT-2 (from config) under the Trainer past ~250 steps, with its warm-up and
    linear decay to 0, its 0.02-std init and tied head; its LM loss flattens far above 50% of its start. No
    warning may be raised, loss_plateau's "raise the LR" at the end of the decay least of all."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=32, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=300, learning_rate=3e-3,
        lr_scheduler_type="linear", warmup_steps=30, logging_steps=50, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0, run_name="hf-gpt2-300",
    )  # fmt: skip
    watch = LayerwatchCallback(server=url, close_timeout=60)
    trainer = Trainer(model=model, args=args, train_dataset=MarkovText(4800, 0), callbacks=[watch])
    trainer.train()
    losses = get(url, watch.monitor.run_id, "scalars", key="loss")["values"]
    assert sum(losses[-30:]) / 30 < 0.6 * math.log(32)  # it trains: far below chance
    assert alarms(url, watch.monitor.run_id) == [], alarms(url, watch.monitor.run_id)
