"""Well-configured trainings that layerwatch must stay quiet on (DIAGNOSTICS.md, "Quiet on healthy runs").

Each `healthy_*` builds a model, its optimizer and a `train(mon)` loop on real
data (sklearn digits / breast cancer / make_classification) or synthetic
sequences with a learnable rule (GRU, transformer, tied-weights LM), and
returns `Training(train, model, optimizer)`; `steps` shortens or lengthens it. They are shared: the healthy
suite runs every one against every rule, and rule tests may borrow one as the
look-alike of a fault. Each takes a second or two on a CPU.

Every loop logs the loss and the class targets; the ones marked `val` also log
`val_loss` once per epoch on a held-out split (for the overfitting rule).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from sklearn.datasets import load_breast_cancer, load_digits, make_classification, make_regression
from torch import nn
from torch.nn import functional as F


@dataclass
class Training:
    train: Callable[[Any], None]
    model: nn.Module
    optimizer: torch.optim.Optimizer


def _split(x: torch.Tensor, y: torch.Tensor, val_frac: float = 0.25, seed: int = 0):
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1000 + seed))
    n_val = int(len(x) * val_frac)
    val, tr = perm[:n_val], perm[n_val:]
    return x[tr], y[tr], x[val], y[val]


def _standardize(x_train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    return [(t - mean) / std for t in (x_train, *others)]


def _digits(seed: int):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    return _split(x, torch.tensor(y), seed=seed)


def _epochs(n: int, batch: int, steps: int, seed: int):
    """(step, index batch, end of epoch) for `steps` steps of shuffled epochs over n samples."""
    g = torch.Generator().manual_seed(seed)
    step = 0
    while True:
        perm = torch.randperm(n, generator=g)
        chunks = [perm[i : i + batch] for i in range(0, n - batch + 1, batch)]  # drop the ragged last batch
        for i, idx in enumerate(chunks):
            yield step, idx, i == len(chunks) - 1
            step += 1
            if step >= steps:
                return


def _supervised_loop(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    batch: int,
    seed: int,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    scheduler: Any = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> Callable[[Any], None]:
    def train(mon) -> None:
        model.train()
        for _, idx, epoch_end in _epochs(len(x), batch, steps, seed):
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()
            mon.log(loss=loss, targets=y[idx])
            if epoch_end and val is not None:
                model.eval()
                with torch.no_grad():
                    val_loss = loss_fn(model(val[0]), val[1])
                model.train()
                mon.log(val_loss=val_loss)

    return train


# ------------------------------------------------------------------ the trainings


def healthy_mlp_adam(seed: int, steps: int = 300) -> Training:
    """MLP on digits, Adam 1e-3, batch 32, ~7 epochs; val_loss every epoch."""
    xt, yt, xv, yv = _digits(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return Training(_supervised_loop(model, opt, xt, yt, steps=steps, batch=32, seed=seed, val=(xv, yv)), model, opt)


class SmallCNN(nn.Module):
    """Conv (with bias, as many models have) -> BatchNorm -> ReLU, twice, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def healthy_cnn_bn_sgd(seed: int, steps: int = 200) -> Training:
    """CNN with BatchNorm on 8x8 digits, SGD(0.05, momentum 0.9, weight decay 5e-4)."""
    xt, yt, _, _ = _digits(seed)
    xt = xt.view(-1, 1, 8, 8)
    torch.manual_seed(seed)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    return Training(_supervised_loop(model, opt, xt, yt, steps=steps, batch=32, seed=seed), model, opt)


def healthy_dropout_adamw_warmup_cosine(seed: int, steps: int = 300) -> Training:
    """Dropout MLP on breast cancer (2 classes), AdamW, linear warm-up 30 steps then cosine decay; val_loss."""
    x, y = load_breast_cancer(return_X_y=True)
    xt, yt, xv, yv = _split(torch.tensor(x, dtype=torch.float32), torch.tensor(y), seed=seed)
    xt, xv = _standardize(xt, xv)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(30, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 2)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    warmup = 30

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (steps - warmup))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    train = _supervised_loop(model, opt, xt, yt, steps=steps, batch=32, seed=seed, val=(xv, yv), scheduler=sched)
    return Training(train, model, opt)


def _sequences(n: int, seed: int, length: int = 20, features: int = 4):
    """Noisy sequences; the class (of 4) is which feature has the largest sum over the second half."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, features, generator=g)
    y = x[:, length // 2 :, :].sum(1).argmax(1)
    return x, y


class GRUClassifier(nn.Module):
    def __init__(self, features: int = 4, hidden: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.gru = nn.GRU(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h = self.gru(x)
        return self.head(h[-1])


def healthy_gru(seed: int, steps: int = 250) -> Training:
    """GRU sequence classifier, Adam 3e-3 with gradient clipping at 1.0 (common practice for RNNs)."""
    x, y = _sequences(2048, seed)
    torch.manual_seed(seed)
    model = GRUClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def train(mon) -> None:
        for _, idx, _ in _epochs(len(x), 32, steps, seed):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            mon.log(loss=loss, targets=y[idx])

    return Training(train, model, opt)


class TinyTransformer(nn.Module):
    """Token embedding + learned positions -> one TransformerEncoderLayer -> mean pool -> linear."""

    def __init__(self, vocab: int = 8, length: int = 12, d_model: int = 32, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(length, d_model) * 0.02)
        self.block = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=64, dropout=0.1, batch_first=True)
        self.head = nn.Linear(d_model, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.block(self.embed(tokens) + self.pos)
        return self.head(h.mean(1))


def healthy_transformer(seed: int, steps: int = 250) -> Training:
    """A transformer block classifying token sequences: which of tokens 0, 1, 2 occurs most often. AdamW 1e-3."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 8, (2048, 12), generator=g)
    counts = torch.stack([(tokens == k).sum(1) for k in range(3)], 1).float()
    y = (counts + 0.1 * torch.rand(counts.shape, generator=g)).argmax(1)  # ties broken at random
    torch.manual_seed(seed)
    model = TinyTransformer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    return Training(_supervised_loop(model, opt, tokens, y, steps=steps, batch=32, seed=seed), model, opt)


def healthy_frozen_first_block(seed: int, steps: int = 300) -> Training:
    """MLP on make_classification (5 classes) whose first block is frozen; the optimizer gets the rest."""
    x, y = make_classification(
        n_samples=2000, n_features=20, n_informative=10, n_classes=5, n_clusters_per_class=1, random_state=seed
    )
    xt, yt, xv, yv = _split(torch.tensor(x, dtype=torch.float32), torch.tensor(y), seed=seed)
    xt, xv = _standardize(xt, xv)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 5))
    for p in model[0].parameters():
        p.requires_grad = False  # a "pretrained" feature block kept fixed
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return Training(_supervised_loop(model, opt, xt, yt, steps=steps, batch=32, seed=seed, val=(xv, yv)), model, opt)


class TiedLM(nn.Module):
    """A next-token model over a 2-token context whose output layer shares the embedding's weight.

    Embedding initialised at std 0.02 as GPT-2/nanoGPT do for tied weights (PyTorch's
    default std 1 would make the tied logits huge at init).
    """

    def __init__(self, vocab: int = 16, d_model: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.mix = nn.Sequential(
            nn.LayerNorm(2 * d_model),
            nn.Linear(2 * d_model, 64),
            nn.GELU(),
            nn.Linear(64, d_model),
            nn.LayerNorm(d_model),
        )
        self.out = nn.Linear(d_model, vocab, bias=False)
        self.out.weight = self.embed.weight  # tied

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return self.out(self.mix(self.embed(context).flatten(1)))


def _markov_tokens(n: int, vocab: int, seed: int) -> torch.Tensor:
    """A token stream from a sparse random second-order Markov chain (each context has 3 likely successors)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.full((vocab, vocab, vocab), -4.0)
    likely = torch.randint(0, vocab, (vocab, vocab, 3), generator=g)
    logits.scatter_(2, likely, 2.0)
    probs = logits.softmax(-1)
    stream = [0, 1]
    for _ in range(n - 2):
        stream.append(int(torch.multinomial(probs[stream[-2], stream[-1]], 1, generator=g)))
    return torch.tensor(stream)


def healthy_tied_lm(seed: int, steps: int = 300) -> Training:
    """Tied embedding/output LM on a Markov token stream, AdamW 3e-3."""
    vocab = 16
    stream = _markov_tokens(6000, vocab, seed)
    context = torch.stack([stream[:-2], stream[1:-1]], 1)
    target = stream[2:]
    torch.manual_seed(seed)
    model = TiedLM(vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    return Training(_supervised_loop(model, opt, context, target, steps=steps, batch=64, seed=seed), model, opt)


class CausalLM(nn.Module):
    """A two-layer causal transformer LM (pre-norm, learned positions, GELU), tied head, GPT-2's init."""

    def __init__(self, vocab: int = 32, d_model: int = 48, context: int = 32) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, d_model)
        self.positions = nn.Embedding(context, d_model)
        for embedding in (self.tokens, self.positions):
            nn.init.normal_(embedding.weight, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model,
            nhead=4,
            dim_feedforward=4 * d_model,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.tokens.weight
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        h = self.tokens(ids) + self.positions(torch.arange(n, device=ids.device))
        return self.head(self.norm(self.blocks(h, mask=self.mask[:n, :n], is_causal=True)))


def _peaked_chain(n: int, vocab: int, seed: int) -> torch.Tensor:
    """Tokens of a first-order Markov chain with peaked transitions (learnable to ~1.2 nats from ln 32)."""
    g = torch.Generator().manual_seed(seed)
    transitions = torch.softmax(torch.randn(vocab, vocab, generator=g) * 3, 1)
    tokens = [0]
    for _ in range(n - 1):
        tokens.append(int(torch.multinomial(transitions[tokens[-1]], 1, generator=g)))
    return torch.tensor(tokens)


def healthy_lm_warmup_from_zero_cosine(seed: int, steps: int = 300) -> Training:
    """A causal transformer LM on a Markov token stream: AdamW, the LR warmed up *from 0* over 40 steps
    (step 0 runs at lr 0, as HF's get_linear_schedule_with_warmup does), then cosine-decayed to 0 (nanoGPT's
    schedule). Traps: an lr of 0 at the start, an LM loss that flattens far above 50% of its start, a plateau at
    the planned end of the decay, a 0.02-std embedding, a tied head."""
    vocab, context = 32, 32
    stream = _peaked_chain(20000, vocab, seed)
    torch.manual_seed(seed)
    model = CausalLM(vocab, context=context)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = 40

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return step / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (steps - warmup))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)

    def train(mon) -> None:
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            starts = torch.randint(0, len(stream) - context - 1, (16,), generator=g)
            x = torch.stack([stream[s : s + context] for s in starts])
            y = torch.stack([stream[s + 1 : s + context + 1] for s in starts])
            loss = F.cross_entropy(model(x).reshape(-1, vocab), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            mon.log(loss=loss)

    return Training(train, model, opt)


def healthy_autoencoder(seed: int, steps: int = 300) -> Training:
    """An MLP autoencoder of the digits through a 16-unit bottleneck, MSE against its input, Adam 1e-3. Traps:
    a regression loss (no classes, no chance level), float targets of the output's own shape, a Sigmoid output."""
    x, _ = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    torch.manual_seed(seed)
    # A linear bottleneck, as autoencoders use: a ReLU on 16 units can die (seed 2: 12 of 16), a real finding.
    model = nn.Sequential(
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 16),
        nn.Linear(16, 64),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.Sigmoid(),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return Training(
        _supervised_loop(model, opt, x, x, steps=steps, batch=32, seed=seed, loss_fn=F.mse_loss), model, opt
    )


class SqueezedRegressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)  # (N,), the targets' shape


def healthy_regression(seed: int, steps: int = 300) -> Training:
    """A noisy regression (make_regression, standardized targets) with an MLP whose (N, 1) head is squeezed to
    the (N,) targets, SGD with momentum and a step decay at 150. Traps: float targets, a loss with no chance
    level, an LR cut mid-run."""
    x, y = make_regression(n_samples=1200, n_features=10, n_informative=6, noise=10.0, random_state=seed)
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    (xt,) = _standardize(xt)
    yt = (yt - yt.mean()) / yt.std()
    torch.manual_seed(seed)
    model = SqueezedRegressor()
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=150, gamma=0.1)
    train = _supervised_loop(model, opt, xt, yt, steps=steps, batch=32, seed=seed, loss_fn=F.mse_loss, scheduler=sched)
    return Training(train, model, opt)


class BagOfWords(nn.Module):
    """A bag-of-words classifier over a 20,000-word vocabulary (EmbeddingBag, mean)."""

    def __init__(self, vocab: int = 20000, dim: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab, dim, mode="mean")
        self.head = nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


def healthy_big_embedding(seed: int, steps: int = 300) -> Training:
    """Documents of 40 words from a 20,000-word vocabulary whose class (of 4) is which quarter of the vocabulary
    most of their words come from; Adam 3e-3. Traps: an embedding of 640k parameters whose batch touches ~2,500
    rows (every other row's gradient is exactly zero), standard-normal embedding init."""
    vocab, classes, n = 20000, 4, 2000
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    topical = y.unsqueeze(1) * (vocab // classes) + torch.randint(0, vocab // classes, (n, 24), generator=g)
    ids = torch.cat([topical, torch.randint(0, vocab, (n, 16), generator=g)], 1)
    torch.manual_seed(seed)
    model = BagOfWords(vocab, classes=classes)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return Training(_supervised_loop(model, opt, ids, y, steps=steps, batch=64, seed=seed), model, opt)


def healthy_bf16_autocast(seed: int, steps: int = 300) -> Training:
    """The digits MLP under CPU autocast to bfloat16 (mixed precision without a scaler, as bf16 needs none),
    Adam 1e-3. Traps: half-precision activations and gradients flowing into float32 weights."""
    xt, yt, _, _ = _digits(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def train(mon) -> None:
        for _, idx, _ in _epochs(len(xt), 32, steps, seed):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.log(loss=loss, targets=yt[idx])

    return Training(train, model, opt)


HEALTHY: dict[str, Callable[..., Training]] = {
    "mlp_adam": healthy_mlp_adam,
    "cnn_bn_sgd": healthy_cnn_bn_sgd,
    "dropout_adamw_warmup_cosine": healthy_dropout_adamw_warmup_cosine,
    "gru": healthy_gru,
    "transformer": healthy_transformer,
    "frozen_first_block": healthy_frozen_first_block,
    "tied_lm": healthy_tied_lm,
    "lm_warmup_from_zero_cosine": healthy_lm_warmup_from_zero_cosine,
    "autoencoder": healthy_autoencoder,
    "regression": healthy_regression,
    "big_embedding": healthy_big_embedding,
    "bf16_autocast": healthy_bf16_autocast,
}
