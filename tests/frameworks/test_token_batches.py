"""Token-id batches get the data checks that make sense for them: a loader that yields padding only (every
batch all pad ids, the same tensor each step) is a repeated batch; real token batches are not, and token
ids are never judged for normalisation. A tiny BERT from config, trained for real."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification

from client_hook import monitor
from tests.frameworks.conftest import alarms, get

STEPS = 30


def _train(url: str, run: str, batches: list[torch.Tensor]) -> str:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=2)  # fmt: skip
    model = BertForSequenceClassification(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon = monitor.attach(model, opt, server=url, run=run, every=5, close_timeout=60)
    g = torch.Generator().manual_seed(1)
    for ids in batches:
        labels = torch.randint(0, 2, (ids.shape[0],), generator=g)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        mon.log(loss=out.loss, targets=labels)
    mon.close()
    return mon.run_id


def test_padding_only_batches_are_a_repeated_batch(url: str) -> None:
    run_id = _train(url, "tokens-all-padding", [torch.zeros(16, 12, dtype=torch.long) for _ in range(STEPS)])
    found = [a for a in get(url, run_id, "alerts") if a["rule"] == "repeated_batch"]
    assert len(found) == 1 and found[0]["severity"] == "warning", found
    assert not [a for a in get(url, run_id, "alerts") if a["rule"] == "input_not_normalized"]


def test_real_token_batches_raise_no_data_warning(url: str) -> None:
    g = torch.Generator().manual_seed(0)
    run_id = _train(url, "tokens-healthy", [torch.randint(1, 64, (16, 12), generator=g) for _ in range(STEPS)])
    rules = {a["rule"] for a in alarms(url, run_id)}
    assert not rules & {"repeated_batch", "input_not_normalized", "single_class_batch"}, rules
