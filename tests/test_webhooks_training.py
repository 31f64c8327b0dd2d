"""A real diverging training raises loss_diverging live, and the webhook receiver gets it, signed."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from client_hook import monitor
from tests.test_webhooks import SECRET, Receiver, serve_with_webhooks, signature


def test_a_diverging_training_reaches_the_webhook(tmp_path: Path) -> None:
    receiver = Receiver().start()
    try:
        with serve_with_webhooks(tmp_path / "div.db", receiver.url) as base:
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            g = torch.Generator().manual_seed(1)
            x = torch.randn(512, 10, generator=g)
            y = x[:, :3].argmax(1)  # labels that follow from the inputs (random ones are rightly loss_at_chance)
            with monitor.attach(model, opt, server=base, run="diverging", close_timeout=60) as mon:
                for step in range(120):
                    if step == 40:
                        opt.param_groups[0]["maximize"] = True  # the sign flips: the loss is climbed
                    idx = torch.arange(step * 32, step * 32 + 32) % len(x)
                    loss = F.cross_entropy(model(x[idx]), y[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    mon.log(loss=loss, targets=y[idx])
            requests = receiver.wait_for(1, timeout=20)
            bodies = [json.loads(r.body) for r in requests]
            diverging = [(r, b) for r, b in zip(requests, bodies) if b["rule"] == "loss_diverging"]
            assert diverging, [b["rule"] for b in bodies]
            request, body = diverging[0]
            assert body["severity"] == "critical" and body["run"] == "diverging" and body["run_id"] == mon.run_id
            assert 40 < body["first_step"] <= 100 and "loss_diverging" in body["text"]
            assert body["url"].endswith(f"/#/run/{mon.run_id}")
            assert request.headers["X-Layerwatch-Signature"] == signature(request.body, SECRET)
            # Exactly one delivery for this alert, however many steps it kept firing.
            assert sum(b["rule"] == "loss_diverging" for b in bodies) == 1
    finally:
        receiver.stop()
