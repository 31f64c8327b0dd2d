"""Data rules: repeated_batch, input_not_normalized, single_class_batch, class_imbalance, eval_mode_training.

Each fault is a real training on a real (scikit-learn) dataset, with a twin
that is configured well and must raise none of these rules.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits, make_classification
from torch import nn
from torch.nn import functional as F

from tests.faults.conftest import alarms, by_rule, describe

DATA_RULES = ("repeated_batch", "input_not_normalized", "single_class_batch", "class_imbalance", "eval_mode_training")


def digits(standardize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    if standardize:
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return torch.from_numpy(x), torch.from_numpy(y).long()


def mlp(inputs: int = 64, classes: int = 10, dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(inputs, 64), nn.ReLU(), nn.Dropout(dropout), nn.Linear(64, classes))


def fit(model: nn.Module, opt: torch.optim.Optimizer, batches, mon) -> None:
    """The usual loop over (x, y) batches, logging loss and targets."""
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.log(loss=loss, targets=y)


def shuffled(x: torch.Tensor, y: torch.Tensor, steps: int, batch: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        yield x[idx], y[idx]


def ours(alerts) -> list:
    return [a for a in alerts if a["rule"] in DATA_RULES]


# ------------------------------------------------------------------ healthy


def test_healthy_shuffled_standardized_digits_raise_no_data_rule(train_and_diagnose) -> None:
    x, y = digits()
    model = mlp(dropout=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    alerts = train_and_diagnose(lambda mon: fit(model, opt, shuffled(x, y, 120), mon), model, opt, run="data-healthy")
    assert ours(alerts) == [], describe(ours(alerts))
    assert alarms(alerts) == [], describe(alarms(alerts))


# ------------------------------------------------------------------ repeated_batch


def test_the_same_batch_every_step_is_flagged_after_repeat_steps(train_and_diagnose) -> None:
    x, y = digits()
    xb, yb = x[:32], y[:32]
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    onset = 10

    def batches():
        yield from shuffled(x, y, onset)
        for _ in range(40):
            yield xb, yb  # an iterator re-created each step: always its first batch

    alerts = train_and_diagnose(lambda mon: fit(model, opt, batches(), mon), model, opt, run="data-repeat")
    found = by_rule(alerts, "repeated_batch")
    assert len(found) == 1 and found[0]["severity"] == "warning", describe(alerts)
    assert found[0]["layer"] is None
    assert found[0]["step"] == onset + 19, describe(found)  # the 20th identical batch
    assert "sanity check" in found[0]["message"]


# ------------------------------------------------------------------ input_not_normalized


def test_raw_pixel_values_are_flagged_within_a_few_steps(train_and_diagnose) -> None:
    x, y = digits(standardize=False)
    raw = x * 16  # digits are 0..16: this is the 0..255 of an image that was never divided
    scaled = (x - x.mean(0)) / (x.std(0) + 1e-6)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    onset = 20

    def batches():
        for step, (idx_x, idx_y) in enumerate(shuffled(torch.arange(len(x)), y, 50)):
            yield (scaled if step < onset else raw)[idx_x], idx_y

    alerts = train_and_diagnose(lambda mon: fit(model, opt, batches(), mon), model, opt, run="data-raw-pixels")
    found = by_rule(alerts, "input_not_normalized")
    assert len(found) == 1 and found[0]["severity"] == "warning", describe(alerts)
    assert found[0]["layer"] is None and found[0]["step"] == onset + 4, describe(found)
    assert "mean 7" in found[0]["message"] or "mean 8" in found[0]["message"], found[0]["message"]


def test_token_ids_are_not_inputs_to_normalize(train_and_diagnose) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(1000, 16), nn.Flatten(), nn.Linear(16 * 8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def train(mon) -> None:
        g = torch.Generator().manual_seed(0)
        for _ in range(30):
            ids = torch.randint(0, 1000, (32, 8), generator=g)  # integer ids in the hundreds
            y = (ids[:, 0] > 500).long()
            loss = F.cross_entropy(model(ids), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.log(loss=loss, targets=y)

    alerts = train_and_diagnose(train, model, opt, run="data-token-ids")
    assert by_rule(alerts, "input_not_normalized") == [], describe(alerts)
    assert by_rule(alerts, "repeated_batch") == [], describe(alerts)


# ------------------------------------------------------------------ single_class_batch


def test_a_dataset_sorted_by_label_is_flagged(train_and_diagnose) -> None:
    x, y = digits()
    order = torch.argsort(y, stable=True)
    x, y = x[order], y[order]
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def batches():  # DataLoader(shuffle=False) over a dataset sorted by class
        for start in range(0, 32 * 40, 32):
            yield x[start : start + 32], y[start : start + 32]

    alerts = train_and_diagnose(lambda mon: fit(model, opt, batches(), mon), model, opt, run="data-sorted")
    found = by_rule(alerts, "single_class_batch")
    assert len(found) == 1 and found[0]["severity"] == "warning", describe(alerts)
    assert found[0]["layer"] is None and found[0]["step"] <= 20, describe(found)
    assert by_rule(alerts, "class_imbalance") == [] or by_rule(alerts, "class_imbalance")[0]["severity"] == "info"


# ------------------------------------------------------------------ class_imbalance


def imbalanced(ratio: float, n: int = 6000) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = make_classification(
        n_samples=n, n_features=20, n_informative=5, weights=[ratio / (ratio + 1)], flip_y=0, random_state=0
    )
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y).long()


def test_200_to_1_imbalance_is_a_warning_and_not_single_class_batches(train_and_diagnose) -> None:
    x, y = imbalanced(200)
    model = mlp(inputs=20, classes=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    alerts = train_and_diagnose(
        lambda mon: fit(model, opt, shuffled(x, y, 60, batch=64), mon), model, opt, run="data-imbalance-200"
    )
    found = by_rule(alerts, "class_imbalance")
    assert len(found) == 1 and found[0]["severity"] == "warning", describe(alerts)
    assert found[0]["layer"] is None and found[0]["step"] <= 50, describe(found)
    assert by_rule(alerts, "single_class_batch") == [], describe(alerts)  # shuffled: imbalance explains it


def test_20_to_1_imbalance_is_only_info(train_and_diagnose) -> None:
    x, y = imbalanced(20)
    model = mlp(inputs=20, classes=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    alerts = train_and_diagnose(
        lambda mon: fit(model, opt, shuffled(x, y, 40, batch=64), mon), model, opt, run="data-imbalance-20"
    )
    assert [a["severity"] for a in by_rule(alerts, "class_imbalance")] == ["info"], describe(alerts)
    assert ours(alarms(alerts)) == [], describe(alerts)


# ------------------------------------------------------------------ eval_mode_training


def test_training_in_eval_mode_is_flagged(train_and_diagnose) -> None:
    """model.eval() for validation and never model.train() again: https://github.com/wkentaro/pytorch-fcn/issues/57
    ("the training loss will suddenly become larger when a new epoch starts"),
    https://github.com/pytorch/tutorials/pull/1602 (the quickstart trained in eval mode after its first epoch)."""
    x, y = digits()
    model = mlp(dropout=0.5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def train(mon) -> None:
        model.eval()  # e.g. left over from a validation pass before the loop
        fit(model, opt, shuffled(x, y, 20), mon)

    alerts = train_and_diagnose(train, model, opt, run="data-eval-mode")
    found = by_rule(alerts, "eval_mode_training")
    assert len(found) == 1 and found[0]["severity"] == "warning", describe(alerts)
    assert found[0]["step"] == 2 and "Dropout" in found[0]["message"], describe(found)


def test_validation_in_eval_mode_between_steps_is_not_flagged(train_and_diagnose) -> None:
    x, y = digits()
    model = mlp(dropout=0.5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def train(mon) -> None:
        for step, (xb, yb) in enumerate(shuffled(x, y, 40)):
            model.train()
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.log(loss=loss, targets=yb)
            if step % 5 == 4:  # validation, even with gradients enabled
                model.eval()
                mon.log(val_loss=F.cross_entropy(model(x[:200]), y[:200]))

    alerts = train_and_diagnose(train, model, opt, run="data-eval-between")
    assert by_rule(alerts, "eval_mode_training") == [], describe(alerts)


def test_eval_mode_is_only_info_when_no_module_depends_on_it(train_and_diagnose) -> None:
    x, y = digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))  # eval() changes nothing here
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def train(mon) -> None:
        model.eval()
        fit(model, opt, shuffled(x, y, 10), mon)

    alerts = train_and_diagnose(train, model, opt, run="data-eval-mode-free")
    assert [a["severity"] for a in by_rule(alerts, "eval_mode_training")] == ["info"], describe(alerts)
