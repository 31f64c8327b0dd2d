"""Print the fault suite as a table: case | source | onset | first alert (step, rule, layer) | remedy.

`python -m tests.faults.fault_table` trains each realistic faulty case of the
suite (the builders the tests use) against a real `layerwatch serve` on a
temporary SQLite file and prints one Markdown row per case: the alarm
(warning or critical) the run raised first. It checks nothing (the tests do);
it is how the issue notes' table is made, so anyone can re-make it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import torch
from torch import nn
from torch.nn import functional as F

from client_hook import monitor
from tests.faults import test_adversarial as gan
from tests.faults import test_non_finite as nonfinite
from tests.faults import test_reference_rules as ref
from tests.faults import test_wiring_rules as wiring
from tests.faults.test_gradient_rules import deep_sigmoid_mlp, loop, mlp
from tests.serving import serve


def _eval_mode() -> tuple[nn.Module, Any, Callable[[Any], None]]:
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.eval()  # left on after a validation pass
    return model, opt, wiring.train_mlp(model, opt, 80)


def _adam(model: nn.Module, lr: float = 1e-3) -> tuple[nn.Module, torch.optim.Optimizer]:
    return model, torch.optim.Adam(model.parameters(), lr=lr)


def _sgd(model: nn.Module, lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    return model, torch.optim.SGD(model.parameters(), lr=lr)


def _case(build: Callable[[], tuple[Any, ...]]) -> Callable[[], tuple[nn.Module, Any, Callable[[Any], None]]]:
    def make() -> tuple[nn.Module, Any, Callable[[Any], None]]:
        *model_opt, train = build()
        return model_opt[0], model_opt[1], train

    return make


def _with(models: Callable[[], tuple[nn.Module, Any]], train: Callable[..., Any], *args: Any, **kw: Any):
    def make() -> tuple[nn.Module, Any, Callable[[Any], None]]:
        model, opt = models()
        return model, opt, train(model, opt, *args, **kw)

    return make


CASES: list[tuple[str, str, str, Callable[[], tuple[nn.Module, Any, Callable[[Any], None]]]]] = [
    (
        "CNN at SGD lr 5 dies (F.relu)",
        "CS231n; ai.stackexchange 39853",
        "~20",
        _with(lambda: wiring.cnn_at(5.0), wiring.train_cnn, 80),
    ),
    (
        ".detach() in forward",
        "inversecooking#3, fairseq#408",
        "0",
        _with(lambda: wiring.detached(True), wiring.train_mlp, 60),
    ),
    (
        "Softmax + CrossEntropyLoss (targets logged)",
        "SciCo#2, pytorch-DANN#7",
        "0",
        _with(lambda: wiring.softmax_mlp(True), wiring.train_softmax, 300, loss_fn=F.cross_entropy, log_targets=True),
    ),
    (
        "Softmax + CrossEntropyLoss (loss only)",
        "SciCo#2",
        "0",
        _with(lambda: wiring.softmax_mlp(True), wiring.train_softmax, 300, loss_fn=F.cross_entropy, log_targets=False),
    ),
    ("(N,1) output vs (N,) targets, MSE", "tsai#22, FARM#229", "0", _case(lambda: wiring.train_regression(False))),
    (
        "inputs and labels drawn apart",
        "cs.stackexchange 78123",
        "0",
        _with(lambda: _adam(ref.digits_mlp()), ref.unpaired_loop, 120, paired=False),
    ),
    (
        "memorised random labels (val at chance)",
        "Zhang et al. 2017",
        "~60 (training leaves chance; evaluated every 50)",
        _with(
            lambda: _adam(ref.digits_mlp(width=256)),
            ref.random_label_loop,
            500,
            random_labels=True,
        ),
    ),
    ("LSTM LM at SGD lr 50", "char-rnn#169", "0", _with(lambda: ref.lstm("sgd", 50.0), ref.lm_loop, 100)),
    (
        "AdamW at 100x its LR (causal transformer LM)",
        "ml-engineering#32",
        "0",
        _with(lambda: ref.causal_lm_adamw(0.3), ref.lm_loop, 150),
    ),
    (
        "LR x100 mid-run (Adam LSTM LM)",
        "fastai#1736, keras#3321",
        "150",
        _with(lambda: ref.lstm("adam", 3e-3), ref.lm_loop, 220, lr_jump=(150, 100.0)),
    ),
    ("model.eval() left on", "pytorch-fcn#57, tutorials#1602", "0", _eval_mode),
    (
        "float16 weights, Adam eps 1e-8",
        "pytorch#8860, glide-finetune#5",
        "0",
        _with(lambda: nonfinite.half_mlp(1e-8), nonfinite.train_half, 20),
    ),
    (
        "no optimizer.zero_grad()",
        "smartnoise-sdk#280",
        "1",
        _with(lambda: _sgd(mlp(), 0.01), loop, 30, zero_grad=False),
    ),
    (
        "15 sigmoid layers, small init",
        "Glorot & Bengio 2010",
        "0",
        _with(lambda: _sgd(deep_sigmoid_mlp(), 0.1), loop, 150),
    ),
]


def first_alarm(url: str, run_id: str) -> str:
    alerts = httpx.get(f"{url}/api/runs/{run_id}/alerts", timeout=30).json()
    alarms = sorted((a for a in alerts if a["severity"] in ("warning", "critical")), key=lambda a: a["step"])
    if not alarms:
        return "none | —"
    a = alarms[0]
    return f"{a['step']}, `{a['rule']}`, {a['layer'] or '—'} | {a['remedy'][:70]}"


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp, serve(Path(tmp) / "table.db") as url:
        print("| case | source | onset | first alert (step, rule, layer) | remedy |")
        print("|---|---|---|---|---|")
        for name, source, onset, make in CASES:
            model, opt, train = make()
            with monitor.attach(model, opt, server=url, run=name, close_timeout=60) as mon:
                train(mon)
            print(f"| {name} | {source} | {onset} | {first_alarm(url, mon.run_id)} |")
        g, d, opt_g, opt_d = gan.gan()
        mon_g = monitor.attach(g, opt_g, server=url, run="gan-G", close_timeout=60, objective="adversarial")
        mon_d = monitor.attach(d, opt_d, server=url, run="gan-D", close_timeout=60, objective="adversarial")
        with mon_g, mon_d:
            gan.train_gan(g, d, opt_g, opt_d, 60, zero_d=False, mon_g=mon_g, mon_d=mon_d)
        print(
            f"| GAN, D's zero_grad forgotten (D's run) | code-soup#69, MONAI GenerativeModels#102 | 1 | "
            f"{first_alarm(url, mon_d.run_id)} |"
        )


if __name__ == "__main__":
    main()
