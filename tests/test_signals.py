"""The always-on per-step signals, read from the frames the client would send."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from client_hook import monitor, wire
from tests.test_monitor import NOWHERE, frames


class Blowup(nn.Module):
    """exp() of its input: overflows to inf once the input passes ~88 (float32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x)


def net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 16), Blowup(), nn.Linear(16, 3))


def signals_by_step(mon: monitor.Monitor) -> dict[int, dict]:
    merged: dict[int, dict] = {}
    for f in frames(mon, "signals"):
        merged.setdefault(f["step"], {}).update(f)
    return merged


def step(model: nn.Module, opt: torch.optim.Optimizer, mon: monitor.Monitor, x, y, zero: bool = True) -> torch.Tensor:
    loss = F.cross_entropy(model(x), y)
    if zero:
        opt.zero_grad()
    loss.backward()
    opt.step()
    mon.log(loss=loss, targets=y)
    return loss


def test_every_step_carries_mode_input_output_grads_and_targets() -> None:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = monitor.attach(model, opt, server=NOWHERE, every=5, close_timeout=0.1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=g) * 0.1, torch.tensor([0, 1, 2, 2] * 8)
    step(model, opt, mon, x, y)
    grads = [p.grad.norm() for p in model.parameters()]
    step(model, opt, mon, x, y)  # the same batch again
    step(model, opt, mon, x + 1, y)
    with torch.no_grad():  # an evaluation forward: no signals, no step
        model.eval()
        model(x)
        model.train()
    sig = signals_by_step(mon)
    assert sorted(sig) == [0, 1, 2]
    s0 = sig[0]
    assert (
        s0["training"] is True and s0["output_nonfinite"] is False and "grads_stale" not in s0
    )  # nothing to compare with at the first step
    assert s0["input_mean"] == pytest.approx(x.mean().item(), abs=1e-6)
    assert s0["input_std"] == pytest.approx(x.std(correction=0).item(), rel=1e-5)
    assert s0["input_nonfinite"] == 0
    assert s0["grad_norm"] == pytest.approx(torch.stack(grads).norm().item(), rel=1e-5)
    assert s0["nonfinite_grads"] == []
    assert s0["target_counts"] == {"0": 8, "1": 8, "2": 16}
    assert sig[0]["input_fingerprint"] == sig[1]["input_fingerprint"] != sig[2]["input_fingerprint"]
    mon.close()


def test_fingerprint_changes_when_the_batch_is_reordered() -> None:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = monitor.attach(model, opt, server=NOWHERE, close_timeout=0.1)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    step(model, opt, mon, x, y)
    step(model, opt, mon, x.flip(0), y.flip(0))
    sig = signals_by_step(mon)
    assert sig[0]["input_fingerprint"] != sig[1]["input_fingerprint"]
    mon.close()


def test_eval_mode_while_stepping_is_reported() -> None:
    model = net()
    model.eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = monitor.attach(model, opt, server=NOWHERE, close_timeout=0.1)
    step(model, opt, mon, torch.randn(8, 6), torch.randint(0, 3, (8,)))
    assert signals_by_step(mon)[0]["training"] is False
    mon.close()


def test_gradients_not_zeroed_are_seen_at_the_next_backward() -> None:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = monitor.attach(model, opt, server=NOWHERE, close_timeout=0.1)
    x, y = torch.randn(8, 6) * 0.1, torch.randint(0, 3, (8,))
    step(model, opt, mon, x, y)
    step(model, opt, mon, x, y, zero=False)  # forgot zero_grad
    step(model, opt, mon, x, y, zero=True)
    loss = F.cross_entropy(model(x), y)  # zero_grad between forward and backward is fine
    opt.zero_grad()
    loss.backward()
    opt.step()
    mon.log(loss=loss)
    sig = signals_by_step(mon)
    assert [sig[s].get("grads_stale") for s in range(4)] == [None, True, False, False]
    mon.close()


def test_first_nonfinite_module_is_named_and_the_replay_leaves_no_trace() -> None:
    def run(watch: bool) -> tuple[nn.Module, monitor.Monitor | None]:
        model = net(3)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        mon = monitor.attach(model, opt, server=NOWHERE, every=1, close_timeout=0.1) if watch else None
        torch.manual_seed(5)
        for i in range(4):
            x = torch.randn(8, 6) * (1.0 if i < 2 else 300.0)  # steps 2, 3: exp overflows in module "4"
            loss = F.cross_entropy(model(x), torch.randint(0, 3, (8,)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if mon is not None:
                mon.log(loss=loss)
        return model, mon

    plain, _ = run(False)
    plain_rng = torch.get_rng_state()
    watched, mon = run(True)
    assert torch.equal(plain_rng, torch.get_rng_state())  # dropout masks replayed, RNG restored
    for key, value in plain.state_dict().items():
        assert torch.equal(value, watched.state_dict()[key]) or (
            value.isnan().all() and watched.state_dict()[key].isnan().all()
        )
    sig = signals_by_step(mon)
    assert sig[1]["output_nonfinite"] is False and "first_nonfinite" not in sig[1]
    assert sig[2]["output_nonfinite"] is True and sig[2]["first_nonfinite"] == "4"
    assert sig[2]["nonfinite_grads"]  # the NaN reached the gradients too
    mon.close()


def test_nonfinite_input_is_named_input() -> None:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = monitor.attach(model, opt, server=NOWHERE, close_timeout=0.1)
    x = torch.randn(8, 6)
    x[3, 2] = float("nan")
    step(model, opt, mon, x, torch.randint(0, 3, (8,)))
    sig = signals_by_step(mon)[0]
    assert sig["input_nonfinite"] == 1 and sig["first_nonfinite"] == "input" and sig["input_mean"] is None
    mon.close()


def test_parameters_outside_the_optimizer_are_not_probed_for_stale_gradients() -> None:
    model = net()
    opt = torch.optim.SGD(model[0].parameters(), lr=0.01)  # the other layers were forgotten
    mon = monitor.attach(model, opt, server=NOWHERE, close_timeout=0.1)
    x, y = torch.randn(8, 6) * 0.1, torch.randint(0, 3, (8,))
    for _ in range(3):
        step(model, opt, mon, x, y)  # opt.zero_grad() leaves the forgotten layers' grads alone
    assert [signals_by_step(mon)[s].get("grads_stale") for s in range(3)] == [None, False, False]
    mon.close()


def test_a_sampled_step_reads_nothing_back_to_the_host_but_its_one_copy() -> None:
    """On CUDA each of these calls would be a host sync; the monitor's hooks make none of them
    (the CPU-only read of the output's sum in after_forward aside, which costs no sync there)."""
    from torch.overrides import TorchFunctionMode

    from client_hook.training import tensors

    syncing = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "nonzero", "bincount", "unique"}
    calls: list[str] = []

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            name = getattr(func, "__name__", "")
            if name in syncing:
                calls.append(name)
            return func(*args, **(kwargs or {}))

    copies: list[int] = []
    original = tensors.HostCopy.__init__

    def counted(self, tensor) -> None:  # noqa: ANN001
        copies.append(tensor.numel())
        original(self, tensor)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4000), nn.Tanh(), nn.Linear(4000, 3))  # big enough for subsets
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = monitor.attach(model, opt, server=NOWHERE, every=1, close_timeout=0.1)
    # The path off the CPU: the step's signals packed into one vector. (On the CPU they are read
    # in the training thread, where reading costs no sync: see SignalsItem.)
    mon._collector.signals.pack = True
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    tensors.HostCopy.__init__ = counted  # type: ignore[method-assign]
    try:
        with Count():
            out = model(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        tensors.HostCopy.__init__ = original  # type: ignore[method-assign]
    mon.close()
    # The sample's one matrix and the step's signals packed into one vector (see
    # test_packed_signals_read_the_same).
    assert len(copies) == 2
    # HostCopy's own .cpu() per copy (on CUDA a non-blocking copy into pinned memory instead), and
    # after_forward's CPU-only read of the output sum: nothing per tensor.
    assert sorted(calls) == sorted(["cpu"] * len(copies) + ["item"])


def test_packed_signals_read_the_same() -> None:
    """The packed path (one vector, one host copy: the path off the CPU) gives the frames the CPU path gives."""

    def run(pack: bool | None) -> dict[int, dict]:
        model = net(1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        mon = monitor.attach(model, opt, server=NOWHERE, every=3, close_timeout=0.1)
        mon._collector.signals.pack = pack
        g = torch.Generator().manual_seed(2)
        torch.manual_seed(4)
        for i in range(4):
            x, y = torch.randn(16, 6, generator=g) * 0.5, torch.randint(0, 3, (16,), generator=g)
            step(model, opt, mon, x, y, zero=i != 2)  # step 2 forgets zero_grad: its backward finds stale ones
        sig = {s: {k: v for k, v in f.items() if k in wire.SIGNAL_FIELDS} for s, f in signals_by_step(mon).items()}
        mon.close()
        return sig

    in_place, packed = run(None), run(True)
    assert in_place == packed
    assert [in_place[s].get("grads_stale") for s in range(4)] == [None, False, True, False]
    assert all(in_place[s]["input_nonfinite"] == 0 and in_place[s]["grad_norm"] > 0 for s in range(4))


def test_nonfinite_input_outside_the_strided_subset_is_counted() -> None:
    """The mean/std/fingerprint subset skips most elements; a NaN anywhere still reaches the output,
    and the input is then counted whole."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 8), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = monitor.attach(model, opt, server=NOWHERE, close_timeout=0.1)
    x = torch.randn(64, 300)  # 19200 elements: a stride of 75 in the subset
    x[0, 1] = float("nan")  # flat index 1: not read by the subset
    x[5, 7] = float("inf")
    step(model, opt, mon, x, torch.randint(0, 3, (64,)))
    step(model, opt, mon, torch.randn(64, 300), torch.randint(0, 3, (64,)))
    sig = signals_by_step(mon)
    assert sig[0]["input_nonfinite"] == 2 and sig[0]["first_nonfinite"] == "input"
    assert sig[0]["input_mean"] is None and sig[0]["output_nonfinite"] is True
    assert sig[1]["input_nonfinite"] == 0 and sig[1]["input_mean"] == pytest.approx(0.0, abs=0.2)
    mon.close()


def test_the_stale_probe_hook_goes_with_close() -> None:
    """The stale-gradient probe is a hook on one parameter, registered once: close() removes it."""
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = monitor.attach(model, opt, server=NOWHERE, close_timeout=0.1)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    for _ in range(3):
        step(model, opt, mon, x, y)
    hooked = [p for p in model.parameters() if p._backward_hooks]
    assert len(hooked) == 1
    mon.close()
    assert not any(p._backward_hooks for p in model.parameters())


def test_half_precision_sums_do_not_overflow_into_false_nonfinite_flags() -> None:
    """A float16 output, input or gradient norm past 65504 is finite all the same: sums and norms in float32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 4096)).half()
    with torch.no_grad():
        model[0].bias.fill_(8.0)  # 256 x 4096 outputs of ~8: a sum of ~8e6
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    mon = monitor.attach(model, opt, server=NOWHERE, close_timeout=0.1)
    x = (torch.rand(256, 64) * 2 + 10).half()  # a sum of ~180000, past float16's 65504
    loss = model(x).float().sum()  # weight gradient elements ~2816 (finite), its norm ~1.4e6
    opt.zero_grad()
    loss.backward()
    opt.step()
    mon.log(loss=loss)
    sig = signals_by_step(mon)[0]
    assert sig["output_nonfinite"] is False and sig["input_nonfinite"] == 0 and "first_nonfinite" not in sig
    assert sig["input_mean"] == pytest.approx(x.float().mean().item(), rel=0.05)
    assert sig["nonfinite_grads"] == [] and 65504 < sig["grad_norm"] < float("inf")
    mon.close()


def test_queued_cpu_signals_hold_no_tensor() -> None:
    """On the CPU a step's signals wait in the sender's queue as floats: small tensors kept alive
    for a sender window fragment the heap under the training's large buffers (CNN: +5% a step)."""
    from client_hook.training.signals import SignalsItem

    torch.manual_seed(0)
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = monitor.attach(model, opt, server=NOWHERE, every=1000, close_timeout=0.1)
    queued: list[object] = []
    mon._sender.submit = lambda item: queued.append(item) or True  # type: ignore[method-assign]
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(3):
        step(model, opt, mon, x, y)
    mon.close()
    items = [item for item in queued if isinstance(item, SignalsItem)]
    assert len(items) == 3
    for item in items:
        held = [getattr(item, name) for name in SignalsItem.__slots__]
        held += [value for value in item.values] + list(item.fields.values())
        assert not any(isinstance(value, torch.Tensor) for value in held), held
        assert item.values and all(isinstance(value, float) for value in item.values)
    # ... and the frame they make is complete.
    fields = items[-1].frames()[0][2]
    assert fields["grad_norm"] > 0 and fields["output_nonfinite"] is False and fields["grads_stale"] is False


def softmax_output_info(loss_fn) -> dict:
    """The first step's output_info of a 5-class Softmax model trained with `loss_fn(probabilities, labels)`."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 5), nn.Softmax(-1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = monitor.attach(model, opt, server=NOWHERE, every=5, close_timeout=0.1)
    x, y = torch.randn(32, 6), torch.randint(0, 5, (32,))
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    mon.log(loss=loss)
    info = signals_by_step(mon)[0]["output_info"]
    mon.close()
    return info


@pytest.mark.parametrize(
    ("loss_fn", "peak", "reduction"),
    [
        (F.cross_entropy, 1.0, "mean"),
        (lambda p, y: F.cross_entropy(p, y, reduction="sum"), 1.0, "sum"),
        (lambda p, y: F.cross_entropy(p, y, label_smoothing=0.2), 0.8 + 0.2 / 5, "mean"),
    ],
    ids=["mean", "sum", "smoothed"],
)
def test_the_output_gradient_gives_a_cross_entropy_its_targets_back(loss_fn, peak: float, reduction: str) -> None:
    """A cross-entropy over the output's rows sends back (softmax(rows) - targets)/n: the probe recovers the
    targets (one-hot, or smoothed) from it whatever the reduction, with rows summing to 0."""
    info = softmax_output_info(loss_fn)
    assert info["grad_row_sum"] < 1e-5 and info["reduction"] == reduction, info
    assert info["targets_peak"] == pytest.approx(peak, abs=1e-4)
    assert abs(info["targets_min"]) < 0.05 and info["targets_second"] < 0.05, info


@pytest.mark.parametrize(
    "loss_fn",
    [lambda p, y: F.nll_loss(p.log(), y), lambda p, y: F.mse_loss(p, F.one_hot(y, 5).float())],
    ids=["nll_of_log", "brier"],
)
def test_losses_of_probabilities_imply_no_one_hot_targets(loss_fn) -> None:
    info = softmax_output_info(loss_fn)
    one_hot = info["grad_row_sum"] < 1e-3 and info["targets_peak"] > 0.85 and info["targets_second"] < 0.05
    assert not one_hot, info
