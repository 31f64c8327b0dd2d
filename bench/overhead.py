"""Training overhead: a plain step vs the monitor attached, default (adaptive) and every=1.

CPU (the default): one thread (`torch.set_num_threads(1)`), batch 32, the CNN and
the MLP, a real `layerwatch serve` receiving (the sender thread's CPU counts).
`--device cuda --model resnet18|gpt` runs the same comparison on a GPU (the clock
stops after a synchronize, so the monitor's queued kernels count) and also counts
the host syncs the monitor adds, with `torch.cuda.set_sync_debug_mode("warn")`
over monitored steps against plain ones: it should add none (a sample's one
device-to-host copy is non-blocking). `--server none` attaches to an address
nobody answers (no server needed, e.g. on a GPU machine without the server
extras): frames then wait in the client's bounded buffer. `--compile BACKEND` runs
every variant on `torch.compile(model, backend=BACKEND)` (e.g. inductor), the monitor
attached to the compiled module (no activation statistics then: see README). Whatever
`monitor.attach` does is measured, per-step signals included; the "signals"
variant (sampling only step 0) measures those signals alone. Ratios are
medians of alternated blocks.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

import torch

from bench._common import MODELS, Trainer, alternate, figure, machine, parser, server
from client_hook import monitor

NOWHERE = "http://127.0.0.1:9"  # the discard port: nothing answers
# A sampling interval no run reaches: only step 0 is sampled, so the variant costs what the always-on
# per-step signals cost (input/output probes, gradient norms, update ratios on their fixed steps).
SIGNALS_ONLY = 10**9


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--model", action="append", choices=sorted(MODELS), help="repeatable; default cnn and mlp")
    p.add_argument("--server", choices=("serve", "none"), default="serve", help="a real server, or none answering")
    p.add_argument("--compile", metavar="BACKEND", help="torch.compile every variant's model with this backend")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device!r}: torch.cuda.is_available() is False on this machine")
    if args.device == "cpu":
        torch.set_num_threads(1)
    logging.getLogger("layerwatch").setLevel(logging.ERROR)
    rounds, block, warm = (3, 10, 20) if args.quick else (10, 50, 200)
    print(f"machine: {machine()}" + (f", {torch.cuda.get_device_name()}" if args.device != "cpu" else ""))
    with _server(args.server) as url:
        for name in args.model or ["cnn", "mlp"]:
            plain, signals, default, every1 = (Trainer(name, device=args.device) for _ in range(4))
            if args.compile:
                for trainer in (plain, signals, default, every1):
                    trainer.model = torch.compile(trainer.model, backend=args.compile)
                name = f"{name} compiled ({args.compile})"
            mons = []
            for trainer, every in ((default, None), (every1, 1), (signals, SIGNALS_ONLY)):
                mon = monitor.attach(
                    trainer.model, trainer.opt, server=url, run=f"bench-{name}-{every}", every=every, close_timeout=1
                )
                trainer.after_step = lambda loss, mon=mon: mon.log(loss=loss)
                mons.append(mon)
            for trainer in (plain, signals, default, every1):
                trainer.steps(warm)  # warm-up; lets the adaptive interval settle
            variants = {"plain": plain, "signals": signals, "default": default, "every1": every1}
            t = alternate(variants, rounds=rounds, block=block)
            figure(f"{name} plain step", f"{t['plain'] * 1e3:.2f} ms")
            figure(f"{name} always-on per-step signals alone (no sample)", f"{t['signals'] / t['plain']:.3f}x")
            figure(f"{name} default (every=None) overhead", f"{t['default'] / t['plain']:.3f}x", "<= 1.02x")
            figure(f"{name} adaptive interval chosen", f"every={mons[0].every}")
            figure(f"{name} every=1 overhead", f"{t['every1'] / t['plain']:.3f}x", "<= 1.3x")
            if plain.device.type == "cuda":
                steps = 5
                added = _syncs(every1, steps) - _syncs(plain, steps)
                figure(f"{name} host syncs added per sampled step", f"{added / steps:.1f}", "0")
            for mon in mons:
                mon.close()


@contextlib.contextmanager
def _server(kind: str) -> Iterator[str]:
    if kind == "none":
        yield NOWHERE
        return
    with server() as (url, _):
        yield url


def _syncs(trainer: Trainer, steps: int) -> int:
    """Host syncs in `steps` training steps, as torch.cuda.set_sync_debug_mode("warn") reports them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.steps(steps)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


if __name__ == "__main__":
    main()
