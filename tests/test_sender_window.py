"""The sender gathers frames for its batch window: a steady training sends one batch per window,
not one per ack round trip (each batch costs the client and the server CPU the training shares)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from client_hook import monitor
from client_hook.sending.sender import BATCH_WINDOW_S
from tests.serving import serve


def test_a_steady_training_sends_one_batch_per_window(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    with serve(tmp_path / "window.db") as url:
        mon = monitor.attach(model, opt, server=url, every=1000, close_timeout=10, spool_dir=tmp_path / "spool")
        sender = mon._sender
        batches: list[int] = []
        send_batch = sender._send_batch  # counted, then sent as ever

        def counted(entries: list) -> None:
            batches.append(len(entries))
            send_batch(entries)

        sender._send_batch = counted  # type: ignore[method-assign]
        started = time.monotonic()
        for _ in range(150):  # a step every ~2 ms: 2 frames (scalars, signals) each
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.log(loss=loss)
            time.sleep(0.002)
        elapsed = time.monotonic() - started
        mon.close()
        assert mon.status()["acked"] >= 301  # run_start and every step's two frames arrived
    # One batch per window while training (+ the hello on connecting, the tail and run_end on close);
    # sending on every ack instead would take one batch per step or two (> 75 here).
    assert sum(batches) >= 301
    assert len(batches) <= elapsed / BATCH_WINDOW_S + 4, (len(batches), elapsed, batches)
