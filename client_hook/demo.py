"""`layerwatch demo`: a real training with the monitor attached and the dashboard live.

Trains a small CNN (convolutions with BatchNorm, dropout, AdamW with a one-cycle
LR schedule) on scikit-learn's handwritten digits, which ship inside
scikit-learn, so nothing is downloaded. Starts a local `layerwatch serve` if no
server answers at --server, prints the dashboard URL and a progress bar, and
keeps the server up after training until Ctrl-C (unless --exit).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from urllib.parse import urlsplit

import torch
from torch import nn
from torch.nn import functional as F

from client_hook import monitor

LOOPBACK = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


def build_model() -> nn.Module:
    """A small CNN for 8x8 digit images: 10 classes."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 8x8 -> 4x4
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 4x4 -> 2x2
        nn.Flatten(),
        nn.Linear(32 * 2 * 2, 64),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(64, 10),
    )


def load_digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardized digits split 80/20: (x_train, y_train, x_val, y_val), x shaped (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits as sklearn_digits  # ships with scikit-learn: no download

    data = sklearn_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    mean, std = x[:split].mean(), x[:split].std()
    x = (x - mean) / std
    return x[:split], y[:split], x[split:], y[split:]


def server_answers(server: str, timeout: float = 0.5) -> bool:
    try:
        with urllib.request.urlopen(f"{server.rstrip('/')}/api/health", timeout=timeout) as response:
            return response.status == 200 and json.load(response).get("status") == "ok"
    except Exception:
        return False


def start_server(server: str, db: str) -> subprocess.Popen[bytes]:
    """Start `layerwatch serve` for `server` (a loopback URL) and wait until it answers."""
    parts = urlsplit(server)
    host, port = parts.hostname or "127.0.0.1", parts.port or 8000
    log_file = tempfile.NamedTemporaryFile(prefix="layerwatch-server-", suffix=".log", delete=False)
    process = subprocess.Popen(
        [sys.executable, "-m", "layerwatch", "serve", "--host", host, "--port", str(port), "--db", db],
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server_answers(server):
            return process
        if process.poll() is not None:
            break
        time.sleep(0.2)
    process.terminate()
    raise RuntimeError(f"could not start a layerwatch server at {server}; its log is in {log_file.name}")


def progress(step: int, total: int, loss: float, val: float | None, width: int = 30) -> str:
    done = int(width * step / max(total, 1))
    val_text = f"  val_loss {val:.3f}" if val is not None else ""
    return f"\r[{'#' * done}{'.' * (width - done)}] step {step}/{total}  loss {loss:.3f}{val_text}"


def train(args: argparse.Namespace) -> monitor.Monitor:
    torch.manual_seed(args.seed)
    x_train, y_train, x_val, y_val = load_digits(args.seed)
    model = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = (len(x_train) + args.batch_size - 1) // args.batch_size
    total = steps_per_epoch * args.epochs
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=total)
    mon = monitor.attach(
        model, optimizer=optimizer, server=args.server, run=args.run, project=args.project, every=args.every
    )
    print(f"layerwatch demo: training run {mon.run!r} — dashboard: {mon.dashboard_url}", flush=True)
    step, val_loss = 0, None
    interactive = sys.stderr.isatty()
    for _ in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train))
        for i in range(0, len(x_train), args.batch_size):
            idx = order[i : i + args.batch_size]
            x, y = x_train[idx], y_train[idx]
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            mon.log(loss=loss, targets=y)
            step += 1
            if interactive or step % max(total // 10, 1) == 0 or step == total:
                # A redrawn bar on a terminal; in a log, a line every 10%.
                bar = progress(step, total, loss.item(), val_loss)
                print(
                    bar if interactive else bar.lstrip("\r"),
                    end="" if interactive else "\n",
                    file=sys.stderr,
                    flush=True,
                )
            if args.delay:
                time.sleep(args.delay)  # paced so the dashboard can be watched live
        model.eval()
        with torch.no_grad():
            logits = model(x_val)
            val_loss = F.cross_entropy(logits, y_val).item()
            accuracy = (logits.argmax(1) == y_val).float().mean().item()
        mon.log(val_loss=val_loss, val_accuracy=accuracy)
    if interactive:
        print(file=sys.stderr)
    mon.close()
    print(f"layerwatch demo: done, val_loss {val_loss:.3f}, val_accuracy {accuracy:.3f}", flush=True)
    return mon


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="layerwatch demo", description=__doc__.splitlines()[0])
    parser.add_argument("--server", default=os.environ.get("LAYERWATCH_SERVER", monitor.DEFAULT_SERVER))
    parser.add_argument("--db", default="sqlite:///./layerwatch.db", help="database of the server the demo starts")
    parser.add_argument("--run", default=None, help="run name (default: demo-<time>)")
    parser.add_argument("--project", default="demo")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--every", type=int, default=None, help="sample every N steps (default: the monitor's)")
    parser.add_argument("--delay", type=float, default=0.05, help="seconds to pause per step, to watch it live")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exit", action="store_true", help="stop the server the demo started once training ends")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        parser.error(f"--epochs and --batch-size must be positive, but got {args.epochs} and {args.batch_size}")
    args.run = args.run or time.strftime("demo-%Y%m%d-%H%M%S")

    # SIGTERM (e.g. `timeout`, a process manager) ends like Ctrl-C: the finally below stops the server we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    process = None
    if not server_answers(args.server):
        host = urlsplit(args.server).hostname
        if host not in LOOPBACK:
            print(
                f"layerwatch demo: no server answers at {args.server}; start one there or pass --server",
                file=sys.stderr,
            )
            return 2
        print(f"layerwatch demo: starting a server at {args.server} (database {args.db})", flush=True)
        process = start_server(args.server, args.db)
    try:
        mon = train(args)
        if process is not None and not args.exit:
            print(f"layerwatch demo: the dashboard stays up at {mon.dashboard_url} — Ctrl-C to stop", flush=True)
            process.wait()
    except KeyboardInterrupt:
        print("\nlayerwatch demo: stopped", file=sys.stderr)
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
