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


class _Block(nn.Module):
    """ResNet basic block: two 3x3 convolutions with BatchNorm, identity (or 1x1) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (x if self.down is None else self.down(x)))


def resnet18(classes: int = 1000) -> nn.Module:
    """ResNet-18 (He et al. 2016, table 1: 11.7M parameters) in plain torch: no torchvision needed."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1),
    ]  # fmt: skip
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_Block(cin, cout, stride), _Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes)]
    return nn.Sequential(*layers)


class _GPTBlock(nn.Module):
    """Pre-LayerNorm transformer block with causal self-attention (nanoGPT's layout)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A small GPT: 6 layers, width 384, 6 heads, context 256, vocabulary 8192 (~15M parameters)."""

    def __init__(self, vocab: int = 8192, width: int = 384, layers: int = 6, heads: int = 6, context: int = 256):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.Sequential(*[_GPTBlock(width, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(width), nn.Linear(width, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos(positions))))


def _images(shape: tuple[int, ...], classes: int) -> Callable[[torch.device], tuple[torch.Tensor, torch.Tensor]]:
    return lambda device: (torch.randn(shape, device=device), torch.randint(0, classes, (shape[0],), device=device))


def _tokens(batch: int, context: int, vocab: int) -> Callable[[torch.device], tuple[torch.Tensor, torch.Tensor]]:
    return lambda device: tuple(torch.randint(0, vocab, (batch, context), device=device) for _ in range(2))  # type: ignore[return-value]


# name -> (build, batch maker(device) -> (x, y)). Batch 32 everywhere; ImageNet-sized inputs for ResNet-18.
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.device], tuple[torch.Tensor, torch.Tensor]]]] = {
    "cnn": (cnn, _images((32, 3, 32, 32), 10)),
    "mlp": (mlp, _images((32, 1, 28, 28), 10)),
    "resnet18": (resnet18, _images((32, 3, 224, 224), 1000)),
    "gpt": (GPT, _tokens(32, 256, 8192)),
}


class Trainer:
    """One model, optimizer and fixed batch; `steps(n)` trains n steps and returns the seconds taken.

    On CUDA the clock stops after a synchronize, so queued kernels (the monitor's included) count."""

    def __init__(self, name: str, seed: int = 0, device: str = "cpu") -> None:
        build, batch = MODELS[name]
        self.device = torch.device(device)
        torch.manual_seed(seed)
        self.model = build().to(self.device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.x, self.y = batch(self.device)
        self.after_step: Callable[[torch.Tensor], None] = lambda loss: None

    def steps(self, n: int) -> float:
        self._sync()
        started = time.perf_counter()
        for _ in range(n):
            logits = self.model(self.x)
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.y.reshape(-1))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.after_step(loss)
        self._sync()
        return time.perf_counter() - started

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


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
