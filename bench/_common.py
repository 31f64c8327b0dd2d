"""What the benchmarks share: the machine line, the models, alternated timing, a real server."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores ({cpu}), torch {torch.__version__}, Python {platform.python_version()}"


def parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a CI-sized smoke run (figures are rough)")
    return p


def figure(name: str, value: str, target: str = "") -> None:
    """One result line; the smoke test and the README read these."""
    print(f"{name}: {value}" + (f"  (target {target})" if target else ""), flush=True)


def cnn() -> nn.Module:
    """A small CNN with BatchNorm on 3x32x32 images, 10 classes (CIFAR-sized)."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip


def mlp() -> nn.Module:
    """A 3-layer MLP on flattened 28x28 inputs."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "cnn": (cnn, (32, 3, 32, 32)),
    "mlp": (mlp, (32, 1, 28, 28)),
}


class Trainer:
    """One model, optimizer and fixed batch; `steps(n)` trains n steps and returns the seconds taken."""

    def __init__(self, name: str, seed: int = 0) -> None:
        build, shape = MODELS[name]
        torch.manual_seed(seed)
        self.model = build()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.x = torch.randn(shape)
        self.y = torch.randint(0, 10, (shape[0],))
        self.after_step: Callable[[torch.Tensor], None] = lambda loss: None

    def steps(self, n: int) -> float:
        started = time.perf_counter()
        for _ in range(n):
            loss = nn.functional.cross_entropy(self.model(self.x), self.y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.after_step(loss)
        return time.perf_counter() - started


def alternate(variants: dict[str, Trainer], *, rounds: int, block: int) -> dict[str, float]:
    """Median seconds per step of each variant, timed in alternating blocks of `block` steps."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, trainer in variants.items():
            times[name].append(trainer.steps(block) / block)
    return {name: statistics.median(t) for name, t in times.items()}


@contextlib.contextmanager
def server() -> Iterator[tuple[str, Path]]:
    """A real `layerwatch serve` on a temp SQLite file (tests/serving.py); yields (URL, database path)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.serving import serve

    with tempfile.TemporaryDirectory(prefix="layerwatch-bench-") as tmp:
        db = Path(tmp) / "bench.db"
        with serve(db) as url:
            yield url, db


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")
