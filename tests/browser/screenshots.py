"""The README's screenshots: `python -m tests.browser.screenshots`.

Starts a real `layerwatch serve` on a temporary SQLite file, trains the demo's
CNN on scikit-learn's digits twice (two learning rates, for the compare view)
and a small MLP whose Exp layer overflows (a critical `non_finite` alert), all
with the real monitor attached, then opens each view in headless Chromium at
laptop width and saves it to web/screenshots/<view>.png.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from urllib.parse import quote

import torch
from torch import nn
from torch.nn import functional as F

from client_hook import monitor
from client_hook.demo import build_model, load_digits
from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS
from tests.serving import serve

OUT = Path(__file__).resolve().parents[2] / "web" / "screenshots"
VIEWPORT = {"width": 1280, "height": 860}


class Exp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x)


def train_digits(server: str, name: str, lr: float, epochs: int = 6, batch_size: int = 64) -> str:
    """The demo's training (AdamW, one-cycle LR), logging lr and val_loss; returns the run id."""
    torch.manual_seed(0)
    x_train, y_train, x_val, y_val = load_digits(0)
    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    total = epochs * ((len(x_train) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total)
    with monitor.attach(model, optimizer=opt, server=server, run=name, project="digits", every=2) as mon:
        for _ in range(epochs):
            model.train()
            order = torch.randperm(len(x_train))
            for i in range(0, len(x_train), batch_size):
                idx = order[i : i + batch_size]
                loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                mon.log(loss=loss, targets=y_train[idx], lr=schedule.get_last_lr()[0])
                schedule.step()
            model.eval()
            with torch.no_grad():
                mon.log(val_loss=F.cross_entropy(model(x_val), y_val).item())
        return mon.run_id


def train_overflow(server: str) -> str:
    """An MLP whose Exp layer overflows from step 40 (tests/faults/test_non_finite.py)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), Exp(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    with monitor.attach(model, optimizer=opt, server=server, run="exp-overflow", project="faults", every=1) as mon:
        for step in range(80):
            x = torch.randn(16, 8, generator=g) * (1.0 if step < 40 else 200.0)
            loss = F.cross_entropy(model(x), torch.randint(0, 4, (16,), generator=g))
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.log(loss=loss)
        return mon.run_id


def shoot(base: str, runs: dict[str, str]) -> list[Path]:
    from playwright.sync_api import sync_playwright

    OUT.mkdir(parents=True, exist_ok=True)
    digits, fast, fault = runs["digits"], runs["fast"], runs["fault"]
    run = lambda rid, q="": f"{base}/#/run/{quote(rid, safe='')}{q}"  # noqa: E731
    views = [
        ("runs", f"{base}/#/", "#runs-body svg.spark polyline"),
        ("overview", run(fault), "#loss-plot .scatterlayer"),
        ("layers", run(digits, "?tab=layers"), "#heatmap-frac .hm"),
        ("histograms", run(fault, "?tab=histograms&layer=4&hkind=grad&hparam=weight&step=40"), "#histogram-plot .hm"),
        ("alerts", run(fault, "?tab=alerts"), "#alerts-body tr"),
        ("compare", f"{base}/#/compare?runs={digits},{fast}&layer=9&stat=norm", "#compare-stat-plot .scatterlayer"),
        ("model", run(digits, "?tab=model"), "#model-body tr"),
        ("overview-light", run(digits), "#lr-plot .scatterlayer"),
    ]
    saved = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        for name, url, ready in views:
            # The theme follows prefers-color-scheme until toggled: each view in a fresh context.
            scheme = "light" if name.endswith("-light") else "dark"
            context = browser.new_context(viewport=VIEWPORT, color_scheme=scheme)
            page = context.new_page()
            page.set_default_timeout(20_000)
            page.goto(url)
            page.wait_for_selector(ready)
            page.wait_for_timeout(700)  # the last Plotly layout pass and live catch-up
            path = OUT / f"{name}.png"
            page.screenshot(path=str(path), full_page=name in ("layers", "model"))
            saved.append(path)
            context.close()
        browser.close()
    return saved


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp, serve(Path(tmp) / "screenshots.db") as base:
        runs = {
            "fault": train_overflow(base),
            "fast": train_digits(base, "digits-cnn-lr3e-2", lr=3e-2),
            "digits": train_digits(base, "digits-cnn-lr3e-3", lr=3e-3),
        }
        for path in shoot(base, runs):
            print(f"{path} ({path.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
