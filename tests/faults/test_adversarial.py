"""A GAN: two models, two optimizers, two monitors; the generator's backward runs through the discriminator.

The textbook loop (the PyTorch DCGAN tutorial,
https://pytorch.org/tutorials/beginner/dcgan_faces_tutorial.html): D is zeroed,
stepped on real and detached fake batches; then G is zeroed and its loss,
computed through D, backpropagates into D's `.grad` too, right after D's step.
That is not a gradient left unzeroed (D is zeroed before its own next backward),
and G's loss rising while D improves is the game, not a divergence. The fault
next to it: the same loop with D's `zero_grad()` forgotten, where D's gradients
do accumulate across steps.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from client_hook import monitor
from tests.faults.conftest import alarms, by_rule, describe

RADIUS = 2.0


def ring(n: int, g: torch.Generator) -> torch.Tensor:
    """Points from 8 Gaussians on a circle of RADIUS (the classic 2-D GAN benchmark)."""
    angles = torch.randint(0, 8, (n,), generator=g).float() * (2 * math.pi / 8)
    centres = torch.stack([angles.cos(), angles.sin()], 1) * RADIUS
    return centres + 0.05 * torch.randn(n, 2, generator=g)


def gan(seed: int = 0) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    gen = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    disc = nn.Sequential(nn.Linear(2, 64), nn.LeakyReLU(0.2), nn.Linear(64, 64), nn.LeakyReLU(0.2), nn.Linear(64, 1))
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3, betas=(0.5, 0.999))
    return gen, disc, opt_g, opt_d


def train_gan(gen, disc, opt_g, opt_d, steps: int, *, zero_d: bool = True, mon_g=None, mon_d=None) -> torch.Tensor:
    """The DCGAN tutorial's loop; returns generated samples at the end."""
    g = torch.Generator().manual_seed(0)
    ones, zeros = torch.ones(64, 1), torch.zeros(64, 1)
    for _ in range(steps):
        real = ring(64, g)
        fake = gen(torch.randn(64, 8, generator=g))
        if zero_d:
            disc.zero_grad()
        loss_d = F.binary_cross_entropy_with_logits(disc(real), ones)
        loss_d = loss_d + F.binary_cross_entropy_with_logits(disc(fake.detach()), zeros)
        loss_d.backward()
        opt_d.step()
        gen.zero_grad()
        loss_g = F.binary_cross_entropy_with_logits(disc(fake), ones)  # backward runs through D
        loss_g.backward()
        opt_g.step()
        if mon_d is not None:
            mon_d.log(loss=loss_d)
        if mon_g is not None:
            mon_g.log(loss=loss_g)
    with torch.no_grad():
        return gen(torch.randn(512, 8, generator=g))


def test_the_gan_learns_the_ring_and_forgetting_d_zero_grad_hurts_in_plain_torch() -> None:
    good = train_gan(*gan(), 400)
    bad = train_gan(*gan(), 400, zero_d=False)
    radius = good.norm(dim=1)
    assert abs(radius.median() - RADIUS) < 0.5, radius.median()  # the generator found the ring
    assert abs(bad.norm(dim=1).median() - RADIUS) > abs(radius.median() - RADIUS)


def _attach_pair(diag_server: str, name: str, gen, disc, opt_g, opt_d, objective: str | None):
    extra = {"objective": objective} if objective else {}
    mon_g = monitor.attach(gen, opt_g, server=diag_server, run=f"{name}-G", close_timeout=60, **extra)
    mon_d = monitor.attach(disc, opt_d, server=diag_server, run=f"{name}-D", close_timeout=60, **extra)
    return mon_g, mon_d


def _alerts(diag_server: str, mon) -> list[dict]:
    import httpx

    return httpx.get(f"{diag_server}/api/runs/{mon.run_id}/alerts", timeout=30).json()


def test_a_textbook_gan_declared_adversarial_raises_no_alarm(diag_server) -> None:
    gen, disc, opt_g, opt_d = gan()
    mon_g, mon_d = _attach_pair(diag_server, "gan-healthy", gen, disc, opt_g, opt_d, "adversarial")
    with mon_g, mon_d:
        train_gan(gen, disc, opt_g, opt_d, 400, mon_g=mon_g, mon_d=mon_d)
    for mon in (mon_g, mon_d):
        alerts = _alerts(diag_server, mon)
        assert not alarms(alerts), f"{mon.run}: {describe(alerts)}"


def test_the_generators_backward_through_d_is_not_gradients_not_zeroed(diag_server) -> None:
    """Even without declaring the objective: D's .grad holds its step's values when G's backward reaches it,
    but D is zeroed before its own next backward."""
    gen, disc, opt_g, opt_d = gan()
    mon_g, mon_d = _attach_pair(diag_server, "gan-undeclared", gen, disc, opt_g, opt_d, None)
    with mon_g, mon_d:
        train_gan(gen, disc, opt_g, opt_d, 100, mon_g=mon_g, mon_d=mon_d)
    assert not by_rule(_alerts(diag_server, mon_d), "gradients_not_zeroed")


def test_a_gan_whose_d_is_never_zeroed_is_gradients_not_zeroed_on_d(diag_server) -> None:
    """The discriminator's zero_grad() forgotten (https://github.com/Adversarial-Deep-Learning/code-soup/issues/69,
    https://github.com/Project-MONAI/GenerativeModels/issues/102): D's gradients pile up step after step."""
    gen, disc, opt_g, opt_d = gan()
    mon_g, mon_d = _attach_pair(diag_server, "gan-unzeroed", gen, disc, opt_g, opt_d, "adversarial")
    with mon_g, mon_d:
        train_gan(gen, disc, opt_g, opt_d, 60, zero_d=False, mon_g=mon_g, mon_d=mon_d)
    found = by_rule(_alerts(diag_server, mon_d), "gradients_not_zeroed")
    assert found and found[0]["step"] <= 10, describe(found)
    assert not by_rule(_alerts(diag_server, mon_g), "gradients_not_zeroed")


def test_objective_is_checked_at_attach() -> None:
    gen, _, opt_g, _ = gan()
    try:
        monitor.attach(gen, opt_g, server="http://127.0.0.1:9", objective="maximize")
    except ValueError as exc:
        assert "'maximize'" in str(exc) and "'adversarial'" in str(exc)
    else:
        raise AssertionError("objective='maximize' was accepted")
