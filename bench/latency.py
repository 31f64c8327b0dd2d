"""Latency from `mon.log(loss=...)` to the point arriving on an open dashboard (/ws/live).

A websocket client listens on /ws/live of a real server while a training logs
its loss each step; each `scalars` event's steps are matched to the time they
were logged.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import torch

from bench._common import Trainer, figure, machine, parser, percentile, server
from client_hook import monitor


def main() -> None:
    args = parser(__doc__).parse_args()
    torch.set_num_threads(1)
    logging.getLogger("layerwatch").setLevel(logging.ERROR)
    steps = 60 if args.quick else 1000
    print(f"machine: {machine()}")
    from websockets.sync.client import connect

    logged: dict[int, float] = {}
    arrived: dict[int, float] = {}
    with server() as (url, _), connect(url.replace("http", "ws") + "/ws/live") as live:

        def listen() -> None:
            try:
                while True:
                    event = json.loads(live.recv())
                    now = time.perf_counter()
                    if event.get("type") == "scalars" and event.get("key") == "loss":
                        for step in event["steps"]:
                            arrived.setdefault(step, now)
            except Exception:
                return

        threading.Thread(target=listen, daemon=True).start()
        trainer = Trainer("cnn")
        mon = monitor.attach(trainer.model, trainer.opt, server=url, run="bench-latency")

        def log(loss: torch.Tensor) -> None:
            step = mon.step - 1 if mon.step > 0 else 0  # the optimizer step just taken
            logged.setdefault(step, time.perf_counter())
            mon.log(loss=loss)

        trainer.after_step = log
        trainer.steps(steps)
        mon.close()
        time.sleep(0.5)
    latencies = [arrived[s] - t for s, t in logged.items() if s in arrived]
    p50, p99 = percentile(latencies, 50) * 1e3, percentile(latencies, 99) * 1e3
    figure("log -> dashboard latency", f"p50 {p50:.0f} ms, p99 {p99:.0f} ms over {len(latencies)} points", "p99 < 1 s")


if __name__ == "__main__":
    main()
