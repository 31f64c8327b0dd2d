"""Training overhead on CPU: a plain step vs the monitor attached, default (adaptive) and every=1.

One thread (`torch.set_num_threads(1)`), batch 32, a real `layerwatch serve`
receiving (the sender thread's CPU counts). Whatever `monitor.attach` does is
measured, per-step signals included. Ratios are medians of alternated blocks.
"""

from __future__ import annotations

import logging

import torch

from bench._common import Trainer, alternate, figure, machine, parser, server
from client_hook import monitor


def main() -> None:
    args = parser(__doc__).parse_args()
    torch.set_num_threads(1)
    logging.getLogger("layerwatch").setLevel(logging.ERROR)
    rounds, block, warm = (3, 20, 20) if args.quick else (15, 100, 300)
    print(f"machine: {machine()}")
    with server() as (url, _):
        for name in ("cnn", "mlp"):
            plain, default, every1 = Trainer(name), Trainer(name), Trainer(name)
            mons = []
            for trainer, every in ((default, None), (every1, 1)):
                mon = monitor.attach(trainer.model, trainer.opt, server=url, run=f"bench-{name}-{every}", every=every)
                trainer.after_step = lambda loss, mon=mon: mon.log(loss=loss)
                mons.append(mon)
            for trainer in (plain, default, every1):
                trainer.steps(warm)  # warm-up; lets the adaptive interval settle
            t = alternate({"plain": plain, "default": default, "every1": every1}, rounds=rounds, block=block)
            figure(f"{name} plain step", f"{t['plain'] * 1e3:.2f} ms")
            figure(f"{name} default (every=None) overhead", f"{t['default'] / t['plain']:.3f}x", "<= 1.02x")
            figure(f"{name} adaptive interval chosen", f"every={mons[0].every}")
            figure(f"{name} every=1 overhead", f"{t['every1'] / t['plain']:.3f}x", "<= 1.3x")
            for mon in mons:
                mon.close()


if __name__ == "__main__":
    main()
