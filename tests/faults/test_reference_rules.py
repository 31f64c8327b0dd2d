"""Loss rules that judge a run against its references: chance level, its first loss, its LR schedule.

Each fault is a real training checked with plain torch against its fixed
variant (the bug must hurt); each healthy trap must raise no alarm.
"""

from __future__ import annotations

import math

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from tests.faults.conftest import alarms, by_rule, describe
from tests.faults.healthy_models import CausalLM
from tests.training import optimize

_X, _Y = load_digits(return_X_y=True)
DIGITS = torch.tensor(_X / 16.0, dtype=torch.float32)
LABELS = torch.tensor(_Y)
LN10 = math.log(10)


def digits_mlp(seed: int = 0, width: int = 128) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


# ---------------------------------------------------------------- loss_at_chance: training


def unpaired_loop(model: nn.Module, opt: torch.optim.Optimizer, steps: int, *, paired: bool):
    """Images and labels drawn with two generators (the bug: shuffling x and y apart), or together."""

    def train(mon) -> list[float]:
        gx, gy = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
        losses = []
        for _ in range(steps):
            idx = torch.randint(0, len(DIGITS), (64,), generator=gx)
            label_idx = idx if paired else torch.randint(0, len(DIGITS), (64,), generator=gy)
            optimize(opt, F.cross_entropy(model(DIGITS[idx]), LABELS[label_idx]), losses, mon)
        return losses

    return train


def test_labels_drawn_apart_from_their_images_hurt_in_plain_torch() -> None:
    model = digits_mlp()
    bad = unpaired_loop(model, torch.optim.Adam(model.parameters(), lr=1e-3), 120, paired=False)(None)
    fixed = digits_mlp()
    good = unpaired_loop(fixed, torch.optim.Adam(fixed.parameters(), lr=1e-3), 120, paired=True)(None)
    assert abs(sum(bad[-20:]) / 20 - LN10) < 0.1 * LN10  # at chance
    assert sum(good[-20:]) / 20 < 0.3 * LN10


def test_labels_that_do_not_belong_to_their_inputs_keep_the_loss_at_chance(train_and_diagnose) -> None:
    """The data-loading bug of shuffling inputs and labels separately: what the model sees says nothing
    about its labels (https://cs.stackexchange.com/questions/78123: "results ... are just randomness";
    "37 reasons" #4). No targets are logged: the chance level comes from the head's width and the first loss."""
    model = digits_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    alerts = train_and_diagnose(unpaired_loop(model, opt, 120, paired=False), model, opt, every=None)
    found = by_rule(alerts, "loss_at_chance")
    assert len(found) == 1 and found[0]["step"] <= 50, describe(alerts)
    assert "chance level 2.3" in found[0]["message"], describe(found)
    assert "paired" in found[0]["remedy"]
    assert not by_rule(alerts, "loss_plateau"), describe(alerts)  # its "raise the LR" would be wrong here


def test_paired_labels_are_not_at_chance(train_and_diagnose) -> None:
    model = digits_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    alerts = train_and_diagnose(unpaired_loop(model, opt, 120, paired=True), model, opt, every=None)
    assert not alarms(alerts), describe(alerts)


# ---------------------------------------------------------------- loss_at_chance: validation


def random_label_loop(model: nn.Module, opt: torch.optim.Optimizer, steps: int, *, random_labels: bool):
    """300 training digits with fixed random labels (memorised, Zhang et al. 2017), validated on true labels."""
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(DIGITS), generator=g)
    train_idx, val_idx = perm[:300], perm[1500:]
    train_y = torch.randint(0, 10, (300,), generator=g) if random_labels else LABELS[train_idx]

    def train(mon) -> list[float]:
        gen = torch.Generator().manual_seed(1)
        vals = []
        for step in range(steps):
            pick = torch.randint(0, 300, (32,), generator=gen)
            loss = F.cross_entropy(model(DIGITS[train_idx[pick]]), train_y[pick])
            opt.zero_grad()
            loss.backward()
            opt.step()
            logged = {"loss": loss, "targets": train_y[pick]}
            if step % 50 == 49:
                with torch.no_grad():
                    logged["val_loss"] = F.cross_entropy(model(DIGITS[val_idx]), LABELS[val_idx]).item()
                vals.append(logged["val_loss"])
            if mon is not None:
                mon.log(**logged)
        return vals

    return train


def test_memorised_random_labels_leave_validation_at_chance_in_plain_torch() -> None:
    model = digits_mlp(width=256)
    bad = random_label_loop(model, torch.optim.Adam(model.parameters(), lr=1e-3), 500, random_labels=True)(None)
    fixed = digits_mlp(width=256)
    good = random_label_loop(fixed, torch.optim.Adam(fixed.parameters(), lr=1e-3), 500, random_labels=False)(None)
    assert min(bad) > 0.95 * LN10 and min(good) < 0.3 * LN10, (bad, good)


def test_memorised_random_labels_are_loss_at_chance_not_overfitting(train_and_diagnose) -> None:
    """Training on labels unrelated to the inputs: the network memorises them (Zhang et al. 2017,
    "Understanding deep learning requires rethinking generalization", https://arxiv.org/abs/1611.03530), the
    training loss falls and validation never beats chance. There was no good checkpoint: not overfitting."""
    model = digits_mlp(width=256)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    alerts = train_and_diagnose(random_label_loop(model, opt, 500, random_labels=True), model, opt, every=None)
    found = by_rule(alerts, "loss_at_chance")
    assert len(found) == 1 and "validation" in found[0]["message"], describe(alerts)
    # Its training loss leaves chance (below 95% of it) at ~step 60; evaluated every 50 steps, the second
    # evaluation after that (step 99, loss at 91% of chance, validation above chance and rising) tells it.
    assert found[0]["step"] <= 110, describe(found)
    assert not by_rule(alerts, "overfitting"), describe(alerts)


def test_true_labels_validate_below_chance(train_and_diagnose) -> None:
    model = digits_mlp(width=256)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    alerts = train_and_diagnose(random_label_loop(model, opt, 500, random_labels=False), model, opt, every=None)
    assert not by_rule(alerts, "loss_at_chance"), describe(alerts)


# ---------------------------------------------------------------- loss_diverging against the start


VOCAB = 32


def markov_text(n: int = 20000) -> torch.Tensor:
    """Tokens of a random first-order Markov chain with peaked transitions (learnable to ~1.2 nats)."""
    g = torch.Generator().manual_seed(0)
    transitions = torch.softmax(torch.randn(VOCAB, VOCAB, generator=g) * 3, 1)
    tokens = [0]
    for _ in range(n):
        tokens.append(int(torch.multinomial(transitions[tokens[-1]], 1, generator=g)))
    return torch.tensor(tokens)


TEXT = markov_text()


class LSTMLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 64)
        self.rnn = nn.LSTM(64, 128, batch_first=True)
        self.head = nn.Linear(128, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.emb(x))[0])


def lm_loop(model: nn.Module, opt: torch.optim.Optimizer, steps: int, *, lr_jump: tuple[int, float] | None = None):
    def train(mon) -> list[float]:
        g = torch.Generator().manual_seed(1)
        losses = []
        for step in range(steps):
            if lr_jump is not None and step == lr_jump[0]:
                for group in opt.param_groups:
                    group["lr"] *= lr_jump[1]
            starts = torch.randint(0, len(TEXT) - 33, (16,), generator=g)
            x = torch.stack([TEXT[s : s + 32] for s in starts])
            y = torch.stack([TEXT[s + 1 : s + 33] for s in starts])
            optimize(opt, F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1)), losses, mon)
        return losses

    return train


def lstm(opt_kind: str, lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = LSTMLM()
    opt = torch.optim.SGD(model.parameters(), lr=lr) if opt_kind == "sgd" else torch.optim.Adam(model.parameters(), lr)
    return model, opt


def test_an_lstm_lm_at_sgd_lr_50_sits_far_above_chance_in_plain_torch() -> None:
    bad = lm_loop(*lstm("sgd", 50.0), 100)(None)
    good = lm_loop(*lstm("sgd", 1.0), 100)(None)
    assert sum(bad[-20:]) / 20 > 1.8 * math.log(VOCAB) and sum(good[-20:]) / 20 < math.log(VOCAB)


def test_an_lstm_lm_whose_loss_jumps_above_chance_at_once_is_diverging(train_and_diagnose) -> None:
    """An LR far too high for a recurrent LM: the loss leaves chance (ln 32 = 3.47) for 7-12 in the first steps
    and stays there, spiking - not an oscillation around a level the run ever had (reported as
    https://github.com/karpathy/char-rnn/issues/169: loss 0.9 -> 17, "try lowering the learning rate")."""
    model, opt = lstm("sgd", 50.0)
    alerts = train_and_diagnose(lm_loop(model, opt, 100), model, opt, every=None)
    found = by_rule(alerts, "loss_diverging")
    assert found and found[0]["severity"] == "critical" and found[0]["step"] <= 50, describe(alerts)
    assert "lower the learning rate" in found[0]["remedy"].lower()


def test_an_lr_raised_100x_mid_run_is_a_jump_of_the_loss(train_and_diagnose) -> None:
    """The same LM under Adam, healthy until step 150, when the LR is multiplied by 100 (a mistyped resume LR):
    the loss level rises by ~75% and stays up (like https://github.com/fastai/fastai/issues/1736, 2.76 -> 6.2
    within 150 iterations, and https://github.com/keras-team/keras/issues/3321, "jumps suddenly, and never
    recovers")."""
    model, opt = lstm("adam", 3e-3)
    plain = lm_loop(*lstm("adam", 3e-3), 220, lr_jump=(150, 100.0))(None)
    assert sum(plain[170:200]) / 30 > 1.4 * sum(plain[120:150]) / 30  # the fault hurts
    alerts = train_and_diagnose(lm_loop(model, opt, 220, lr_jump=(150, 100.0)), model, opt, every=None)
    found = by_rule(alerts, "loss_diverging")
    assert found and 150 < found[0]["step"] <= 200, describe(alerts)
    assert "jumped" in found[0]["message"] and "lr went from 0.003 to 0.3" in found[0]["message"], describe(found)
    assert found[0]["remedy"].startswith("Lower the learning rate back towards 0.003"), found[0]["remedy"]


def causal_lm_adamw(lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The healthy suite's causal transformer LM (tied head, 0.02-std embeddings), AdamW without warm-up."""
    torch.manual_seed(0)
    model = CausalLM(VOCAB, context=32)
    return model, torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)


def test_adamw_at_100x_its_lr_spikes_and_never_recovers_in_plain_torch() -> None:
    bad = lm_loop(*causal_lm_adamw(0.3), 150)(None)
    good = lm_loop(*causal_lm_adamw(3e-3), 150)(None)
    assert max(bad[:10]) > 2 * math.log(VOCAB)  # the spike
    assert sum(bad[-30:]) / 30 > 0.9 * math.log(VOCAB) > 2 * sum(good[-30:]) / 30  # stuck near chance; fixed: far below


def test_adamw_at_100x_its_lr_is_told_to_lower_it(train_and_diagnose) -> None:
    """AdamW at 0.3 (100x a transformer's usual 3e-3) from the first step: the loss shoots from chance (3.47) to
    12.8 by step 2, comes back to ~3.3 and stays just under chance. Nothing pointed at the LR before (the issue's
    "AdamW at 100x its learning rate from the start"); the pattern is the "not fully recovering spike" of
    https://github.com/stas00/ml-engineering/issues/32 (roll back and lower the LR)."""
    model, opt = causal_lm_adamw(0.3)
    alerts = train_and_diagnose(lm_loop(model, opt, 150), model, opt, every=None)
    found = by_rule(alerts, "loss_diverging")
    assert found and found[0]["step"] <= 50 and found[0]["severity"] == "warning", describe(alerts)
    assert "shot up" in found[0]["message"] and "Lower the learning rate" in found[0]["remedy"], describe(found)
    assert not by_rule(alerts, "loss_plateau"), describe(alerts)  # never "raise the LR"


def test_adamw_at_its_usual_lr_is_quiet(train_and_diagnose) -> None:
    model, opt = causal_lm_adamw(3e-3)
    alerts = train_and_diagnose(lm_loop(model, opt, 150), model, opt, every=None)
    assert not alarms(alerts), describe(alerts)


def test_warm_restarts_of_the_lr_are_not_a_jump(train_and_diagnose) -> None:
    """SGDR (CosineAnnealingWarmRestarts): the LR returns to its peak every 60 steps and the loss rises with it,
    on purpose (Loshchilov & Hutter 2017)."""
    model = digits_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=60)

    def train(mon) -> None:
        g = torch.Generator().manual_seed(0)
        for _ in range(300):
            idx = torch.randint(0, len(DIGITS), (32,), generator=g)
            loss = F.cross_entropy(model(DIGITS[idx]), LABELS[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            mon.log(loss=loss)

    alerts = train_and_diagnose(train, model, opt, every=None)
    assert not alarms(alerts), describe(alerts)
