"""Client host memory over a long run with the server down: RSS growth stays bounded.

With no server every frame waits in the sender's pending buffer, capped at
`max_pending` frames (histograms dropped first); the queue is capped too.
"""

from __future__ import annotations

import logging
import resource

import torch

from bench._common import Trainer, figure, machine, parser
from client_hook import monitor, stats


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    args = parser(__doc__).parse_args()
    torch.set_num_threads(1)
    logging.getLogger("layerwatch").setLevel(logging.CRITICAL)
    steps, every = (200, 1) if args.quick else (4000, 1)
    print(f"machine: {machine()}")
    trainer = Trainer("mlp")
    trainer.steps(20)
    start = rss_mb()
    mon = monitor.attach(trainer.model, trainer.opt, server="http://127.0.0.1:9", every=every, close_timeout=0.1)
    trainer.after_step = lambda loss: mon.log(loss=loss)
    points = []
    for _ in range(10):
        trainer.steps(steps // 10)
        points.append(rss_mb() - start)
    status = mon.status()
    pending = len(mon._sender._pending)  # noqa: SLF001 - the benchmark peeks at the bounded buffer
    mon.close()
    figure("RSS growth, server down", f"{points[-1]:.1f} MB after {steps} sampled steps (every={every})")
    figure(
        "RSS growth per 1000 sampled steps", f"{(points[-1] - points[len(points) // 2]) / (steps / 2) * 1000:.1f} MB"
    )
    # What a sampled step holds between the optimizer's pre- and post-hook: the weight and gradient
    # subsets (stats.subset, <= SUBSET_SIZE elements each), nothing on unsampled steps.
    held = sum(stats.subset(p).numel() * p.element_size() for p in trainer.model.parameters())
    total = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    copies = f"{2 * held / 1024:.0f} KB (the weights: {total / 1024:.0f} KB)"
    figure("sampled-step copies (pre-step weights + gradients)", copies)
    figure("pending frames held", f"{pending} (cap {mon._sender._max_pending}), dropped {status['dropped']}")  # noqa: SLF001


if __name__ == "__main__":
    main()
