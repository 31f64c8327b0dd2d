"""Client memory over a long run with the server down: host memory stays bounded by the caps.

With no server every frame waits: in memory up to `max_memory_bytes`, then in
the on-disk spool up to `spool_max_bytes`, then the oldest frames are dropped,
histograms first. The caps are set small here (8 MiB in memory, 16 MiB on
disk; the defaults are 64 MiB and 512 MiB) so that a few thousand MLP steps at
`every=1` pass both, and the RSS is shown levelling off while the run goes on.
Also printed: what a sampled step copies on the device (the pre-step weight and
gradient subsets), which exists only between a sampled step's optimizer hooks.
"""

from __future__ import annotations

import logging
import resource
import tempfile
from pathlib import Path

import torch

from bench._common import Trainer, figure, machine, parser
from client_hook import monitor
from client_hook.training import stats

MEMORY_CAP = 8 * 2**20
SPOOL_CAP = 16 * 2**20


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    args = parser(__doc__).parse_args()
    torch.set_num_threads(1)
    logging.getLogger("layerwatch").setLevel(logging.CRITICAL)
    steps = 400 if args.quick else 6000
    print(f"machine: {machine()}")
    trainer = Trainer("mlp")
    trainer.steps(20)
    with tempfile.TemporaryDirectory() as spool_dir:
        start = rss_mb()
        mon = monitor.attach(
            trainer.model,
            trainer.opt,
            server="http://127.0.0.1:9",  # nothing answers
            every=1,
            close_timeout=0.1,
            max_memory_bytes=MEMORY_CAP,
            spool_max_bytes=SPOOL_CAP,
            spool_dir=spool_dir,
        )
        trainer.after_step = lambda loss: mon.log(loss=loss)
        points, spooled = [], 0
        for _ in range(10):
            trainer.steps(steps // 10)
            points.append(rss_mb() - start)
            spooled = max(spooled, folder_bytes(Path(spool_dir)))
        status = mon.status()
        held = mon._sender.pending.bytes  # noqa: SLF001 - the benchmark peeks at the bounded buffer
        mon.close()
    figure(
        "RSS growth, server down, every=1 (MLP)",
        " ".join(f"{p:.0f}" for p in points) + f" MB at each tenth of {steps} steps",
    )
    half = points[len(points) // 2 - 1]
    figure("RSS growth over the second half of the run", f"{points[-1] - half:+.1f} MB", "levels off (bounded)")
    figure("frames held in memory at the end", f"{held / 2**20:.1f} MiB", f"<= {MEMORY_CAP / 2**20:.0f} MiB cap")
    figure("spool on disk, largest seen", f"{spooled / 2**20:.1f} MiB", f"<= {SPOOL_CAP / 2**20:.0f} MiB cap")
    figure("dropped when both were full (oldest first, by class)", str(status["dropped"]))
    # What a sampled step holds between the optimizer's pre- and post-hook: the weight and gradient
    # subsets (stats.subset, <= SUBSET_SIZE elements each), nothing on unsampled steps.
    copied = sum(stats.subset(p).numel() * p.element_size() for p in trainer.model.parameters())
    total = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    figure(
        "sampled-step copies (pre-step weights + gradients)",
        f"{2 * copied / 1024:.0f} KB (the weights: {total / 1024:.0f} KB)",
    )


if __name__ == "__main__":
    main()
