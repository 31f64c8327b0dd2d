"""Which argument of a forward is the input batch (`tensors.batch_tensor`), and what the per-step signals make of
integer token batches: fingerprinted for repeated_batch, never judged for normalisation.

Real modules and a real tiny transformers model built from config; nothing is mocked.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BatchEncoding, BertConfig, BertForSequenceClassification

from client_hook.training.signals import StepSignals
from client_hook.training.tensors import batch_tensor

IDS = torch.randint(1, 64, (4, 16))
MASK = torch.ones(4, 16, dtype=torch.long)


def test_the_hf_keywords_pick_input_ids_never_the_0d_num_items_in_batch() -> None:
    labels = torch.tensor([0, 1, 0, 1])
    kwargs = {"num_items_in_batch": torch.tensor(2048.0), "attention_mask": MASK, "labels": labels, "input_ids": IDS}
    assert batch_tensor((), kwargs) is IDS
    assert batch_tensor((), {"num_items_in_batch": torch.tensor(2048.0), "pixel_values": torch.randn(2, 3, 8, 8)})[
        0
    ].shape == (3, 8, 8)


def test_positional_mappings_and_batch_encodings() -> None:
    x = torch.randn(8, 3)
    assert batch_tensor((x, torch.tensor(3)), {}) is x
    assert batch_tensor((torch.tensor(1.0), x), {}) is x  # a 0-d first argument is not the batch
    encoding = BatchEncoding({"attention_mask": MASK, "input_ids": IDS})
    assert batch_tensor((encoding,), {}) is IDS
    assert batch_tensor(([x, IDS],), {}) is x
    assert batch_tensor((), {"other": 3, "features": x}) is x
    assert batch_tensor((torch.tensor(2.0),), {"scale": 0.5}) is None
    assert batch_tensor((torch.ones(5, dtype=torch.bool),), {}) is None  # a mask alone is no batch


def _signals_of(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[dict]:
    names = {m: n for n, m in model.named_modules()}
    params = [(n, p) for n, p in model.named_parameters()]
    signals = StepSignals(model, names, params)
    pre = model.register_forward_pre_hook(lambda m, a, k: signals.before_forward(m, a, k), with_kwargs=True)
    post = model.register_forward_hook(lambda m, a, k, o: signals.after_forward(m, a, k, o), with_kwargs=True)
    out = []
    try:
        for step, batch in enumerate(batches):
            with torch.no_grad():
                model(**batch, num_items_in_batch=torch.tensor(1234))
            frames = signals.end_step(step).frames()
            out.append(frames[0][2] if frames else {})
    finally:
        pre.remove()
        post.remove()
    return out


def test_token_batches_are_fingerprinted_and_not_judged_for_normalisation() -> None:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)  # fmt: skip
    model = BertForSequenceClassification(config).train()
    other = torch.randint(1, 64, (4, 16))
    fields = _signals_of(model, [{"input_ids": IDS, "attention_mask": MASK}, {"input_ids": IDS, "attention_mask": MASK},
                                 {"input_ids": other, "attention_mask": MASK}])  # fmt: skip
    prints = [f["input_fingerprint"] for f in fields]
    assert prints[0] == prints[1] != prints[2]  # the same batch again: the same fingerprint
    assert all("input_mean" not in f and "input_std" not in f for f in fields)
    assert all(f["input_nonfinite"] == 0 and f["output_nonfinite"] is False for f in fields)
