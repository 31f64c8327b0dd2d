"""layerwatch every=1 vs wandb.watch(log="all", log_freq=1) offline vs TensorBoard add_histogram, same run.

Same CNN and batch for all, one thread, alternated blocks. wandb runs with
WANDB_MODE=offline in a temp WANDB_DIR (no network); TensorBoard writes a
histogram of every weight and gradient each step. "values/step" counts what each
records per step (statistics + histogram bins).
"""

from __future__ import annotations

import logging
import os
import tempfile

import torch

from bench._common import Trainer, alternate, figure, machine, parser, server
from client_hook import monitor
from client_hook.training.stats import ROW_WIDTH


def main() -> None:
    args = parser(__doc__).parse_args()
    torch.set_num_threads(1)
    logging.getLogger("layerwatch").setLevel(logging.ERROR)
    rounds, block, warm = (2, 10, 5) if args.quick else (10, 50, 50)
    print(f"machine: {machine()}")
    tmp = tempfile.mkdtemp(prefix="layerwatch-peers-")
    variants: dict[str, Trainer] = {"plain": Trainer("cnn")}
    closers = []
    n_params = len(list(variants["plain"].model.parameters()))
    with server() as (url, _):
        lw = Trainer("cnn")
        mon = monitor.attach(lw.model, lw.opt, server=url, run="bench-peers", every=1)
        lw.after_step = lambda loss: mon.log(loss=loss)
        variants["layerwatch"] = lw
        closers.append(mon.close)
        try:
            os.environ.update(WANDB_MODE="offline", WANDB_DIR=tmp, WANDB_SILENT="true", WANDB_CONSOLE="off")
            import wandb

            wb = Trainer("cnn")
            run = wandb.init(project="layerwatch-bench", dir=tmp, settings=wandb.Settings(console="off"))
            wandb.watch(wb.model, log="all", log_freq=1)
            wb.after_step = lambda loss: run.log({"loss": loss.item()})
            variants["wandb"] = wb
            closers.append(run.finish)
        except Exception as exc:
            figure("wandb", f"could not run: {type(exc).__name__}: {exc}")
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = Trainer("cnn")
            writer = SummaryWriter(log_dir=os.path.join(tmp, "tb"))
            state = {"step": 0}

            def tb_log(loss: torch.Tensor, tb: Trainer = tb) -> None:
                step = state["step"]
                writer.add_scalar("loss", loss.item(), step)
                for name, p in tb.model.named_parameters():
                    writer.add_histogram(f"weight/{name}", p, step)
                    if p.grad is not None:
                        writer.add_histogram(f"grad/{name}", p.grad, step)
                state["step"] += 1

            tb.after_step = tb_log
            variants["tensorboard"] = tb
            closers.append(writer.close)
        except Exception as exc:
            figure("tensorboard", f"could not run: {type(exc).__name__}: {exc}")
        for trainer in variants.values():
            trainer.steps(warm)
        t = alternate(variants, rounds=rounds, block=block)
        for close in closers:
            close()
    base = t.pop("plain")
    figure("plain step", f"{base * 1e3:.2f} ms")
    for name, seconds in t.items():
        figure(f"{name} every step", f"{seconds / base:.3f}x a plain step")
    if "layerwatch" in t:
        for peer in ("wandb", "tensorboard"):
            if peer in t:
                ratio = (t[peer] - base) / max(t["layerwatch"] - base, 1e-9)
                figure(f"layerwatch cheaper than {peer}", f"{ratio:.2f}x (added time per step)", ">= 2x")
    n_act = sum(1 for m in lw.model.modules() if next(m.children(), None) is None)
    figure("layerwatch values/step", f"{(2 * n_params + n_act) * (ROW_WIDTH + 1)} (weights, grads, activations)")
    figure("wandb/tensorboard values/step", f"{2 * n_params * 64} / {2 * n_params * 30} (64 / ~30 bins + edges)")


if __name__ == "__main__":
    main()
