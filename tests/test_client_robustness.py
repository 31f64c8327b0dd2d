"""The client survives how people really train: eval loops, torch.compile, DataParallel, forked loader workers,
dtype changes after attach, and the spool in use, without raising, inventing steps or changing the numerics.

Real trainings against one real `layerwatch serve` process for the module (each test its own run).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from client_hook import monitor, wire
from client_hook.sending.sender import Frame
from tests.serving import free_port, serve
from tests.training import train_step


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve(tmp_path_factory.mktemp("robust") / "lw.db") as url:
        yield url


def make(seed: int = 0) -> tuple[nn.Sequential, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    return model, torch.optim.SGD(model.parameters(), lr=0.05)


def batch(g: torch.Generator, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(16, 8, generator=g).to(dtype), torch.randint(0, 4, (16,), generator=g)


def get(url: str, run_id: str, what: str = "", **params: str) -> dict:
    response = httpx.get(f"{url}/api/runs/{run_id}{'/' + what if what else ''}", params=params)
    response.raise_for_status()
    return response.json()


def test_no_grad_eval_loops_between_steps_make_no_stats_and_no_steps(url: str) -> None:
    model, opt = make()
    mon = monitor.attach(model, opt, server=url, every=1, close_timeout=30)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        train_step(model, opt, *batch(g), mon=mon)
        with torch.no_grad():  # a validation pass on inputs no training batch looks like
            model.eval()
            for _ in range(3):
                model(torch.full((4, 8), 1000.0))
            model.train()
    assert mon.step == 6
    mon.close()
    assert get(url, mon.run_id, "scalars", key="loss")["steps"] == list(range(6))
    acts = get(url, mon.run_id, "layer_stats", layer="0", param="output", kind="activation")
    assert acts["steps"] == list(range(6))
    assert max(acts["max"]) < 100  # the training forward's, never the eval pass's (~1000s)
    run = get(url, mon.run_id)
    assert run["last_step"] == 5 and run["status"] == "finished"


def test_torch_compile_after_attach_trains_and_steps_arrive(url: str, recwarn: pytest.WarningsRecorder) -> None:
    model, opt = make(1)
    mon = monitor.attach(model, opt, server=url, every=1, close_timeout=30)
    compiled = torch.compile(model, backend="eager")
    g = torch.Generator().manual_seed(1)
    try:
        losses = [train_step(compiled, opt, *batch(g), mon=mon).item() for _ in range(5)]
    finally:
        mon.close()
        torch._dynamo.reset()
    loss = get(url, mon.run_id, "scalars", key="loss")
    assert loss["steps"] == list(range(5))
    assert loss["values"] == pytest.approx(losses, rel=1e-6)
    # Gradients and weights are read by the optimizer's hooks, outside the compiled graph: every step.
    grads = get(url, mon.run_id, "layer_stats", layer="2", param="weight", kind="grad")
    assert grads["steps"] == list(range(5))
    # The module hooks return at once while dynamo traces them (tests/frameworks/test_compile.py counts
    # the graph breaks): the compiled graph holds no activation statistics, and dynamo never traced our code.
    acts = get(url, mon.run_id, "layer_stats", layer="0", param="output", kind="activation")
    assert acts["steps"] == []
    traced = [str(w.message) for w in recwarn if "client_hook" in str(w.message) or "perf_counter" in str(w.message)]
    assert traced == []


def test_data_parallel_wrapper_trains_and_steps_arrive(url: str) -> None:
    model, opt = make(2)
    mon = monitor.attach(model, opt, server=url, every=1, close_timeout=30)
    wrapped = nn.DataParallel(model)  # no GPU: it calls the module itself
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        train_step(wrapped, opt, *batch(g), mon=mon)
    mon.close()
    assert get(url, mon.run_id, "scalars", key="loss")["steps"] == list(range(5))
    grads = get(url, mon.run_id, "layer_stats", layer="2", param="weight", kind="grad")
    assert grads["steps"] == list(range(5))
    assert grads["norm"][-1] > 0


class Probe(Dataset):
    """Random samples that also say whether a layerwatch sender thread runs in the process serving them."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(3)
        self.x, self.y = torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sender_here = any(t.name == "layerwatch-sender" and t.is_alive() for t in threading.enumerate())
        return self.x[i], self.y[i], torch.tensor(sender_here)


def test_forked_dataloader_workers_send_nothing_and_training_exits_cleanly(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    model, opt = make(3)
    mon = monitor.attach(model, opt, server=url, every=2, close_timeout=30)

    def worker_touches_monitor(worker_id: int) -> None:
        # A worker inherits the monitor: logging there, even closing it, must reach nothing of the parent's.
        mon.log(from_worker=float(worker_id))
        mon.close()

    loader = DataLoader(
        Probe(64),
        batch_size=16,
        num_workers=2,
        multiprocessing_context="fork",
        worker_init_fn=worker_touches_monitor,
    )
    flags = []
    with caplog.at_level(logging.WARNING, logger="layerwatch"):
        for _epoch in range(2):  # workers start and exit each epoch
            for x, y, sender_in_worker in loader:
                train_step(model, opt, x, y, mon=mon)
                flags += sender_in_worker.tolist()
        assert mon.status()["connected"]
        mon.close()
    assert len(flags) == 128 and not any(flags)  # no sender thread survives a fork
    assert get(url, mon.run_id, "scalars", key="loss")["steps"] == list(range(8))
    assert get(url, mon.run_id, "scalars", key="from_worker")["steps"] == []
    assert get(url, mon.run_id)["status"] == "finished" and mon.status()["dropped"] == {}
    assert "connection to" not in caplog.text  # no worker closed the parent's socket


def test_model_moved_to_double_after_attach_keeps_training(url: str, caplog: pytest.LogCaptureFixture) -> None:
    model, opt = make(4)
    mon = monitor.attach(model, opt, server=url, every=1, close_timeout=30)
    g = torch.Generator().manual_seed(4)
    with caplog.at_level(logging.WARNING, logger="layerwatch"):
        for _ in range(3):
            train_step(model, opt, *batch(g), mon=mon)
        model.double()  # parameters change dtype in place; the optimizer keeps them
        for _ in range(3):
            train_step(model, opt, *batch(g, torch.float64), mon=mon)
        mon.close()
    assert model[0].weight.dtype == torch.float64
    assert get(url, mon.run_id, "scalars", key="loss")["steps"] == list(range(6))
    weights = get(url, mon.run_id, "layer_stats", layer="0", param="weight", kind="weight")
    assert weights["steps"][:3] == [0, 1, 2]
    if 5 in weights["steps"]:  # quiet or correct: if it still reports, the numbers are the model's
        assert weights["norm"][-1] == pytest.approx(model[0].weight.norm().item(), rel=1e-5)


def test_subnormal_gradients_are_summarized_and_the_monitor_stays_on(url: str) -> None:
    """`(loss * 1e-39).backward()`: gradients of ~1e-40, subnormal in float32. Their histogram's width is
    subnormal too (bins / width overflowed to inf, an index of -2**63 switched the optimizer hook off)."""
    model, opt = make(5)
    mon = monitor.attach(model, opt, server=url, every=1, close_timeout=30)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        x, y = batch(g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        (loss * 1e-39).backward()
        opt.step()
        mon.log(loss=loss)
    mon.close()
    grads = get(url, mon.run_id, "layer_stats", layer="0", param="weight", kind="grad")
    assert grads["steps"] == [0, 1, 2]
    # Their extremes are exact; their squares underflow, so norms and RMS read 0 (float32's limit, not ours).
    extremes = [max(abs(lo), abs(hi)) for lo, hi in zip(grads["min"], grads["max"])]
    assert all(0 < e < 1e-35 for e in extremes), grads
    assert mon._collector._quiet == set()


def test_names_the_server_cannot_take_are_fitted_and_no_step_is_lost(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Red team #17 item 3: a sweep's 300-character run name, a module path over 256 characters (deeply
    nested containers) and an empty scalar key each made the server refuse whole batches: 0 of 200 steps
    stored. The client fits such names (a stable hash suffix; "(empty)") with one warning."""
    torch.manual_seed(6)
    inner = nn.Sequential()
    inner.add_module("block_" + "x" * 120, nn.Sequential(nn.Linear(8, 16), nn.ReLU()))
    model = nn.Sequential()
    model.add_module("encoder_" + "y" * 120, inner)
    model.add_module("head", nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    long_path = next(name for name, _ in model.named_modules() if len(name) > 256)
    run = "sweep-" + "lr=0.001,wd=0.1," * 20
    mon = monitor.attach(model, opt, server=url, run=run, every=5, close_timeout=30)
    g = torch.Generator().manual_seed(6)
    with caplog.at_level(logging.WARNING, logger="layerwatch"):
        for _ in range(200):
            loss = train_step(model, opt, *batch(g), mon=mon)
            mon.log(**{"": 0.5, "ok": float(loss)})
        mon.close()
    assert mon.status()["dropped"] == {} and mon.status()["acked"] > 0
    stored = get(url, mon.run_id)
    assert stored["name"] == wire.fit_name(run) and len(stored["name"]) == wire.MAX_NAME_LEN
    assert get(url, mon.run_id, "scalars", key="loss")["steps"] == list(range(200))
    assert get(url, mon.run_id, "scalars", key=wire.EMPTY_NAME)["values"] == [0.5] * 200
    fitted = wire.fit_name(long_path)
    assert any(m["name"] == fitted for m in stored["model"]["modules"]), [m["name"] for m in stored["model"]["modules"]]
    weights = get(url, mon.run_id, "layer_stats", layer=fitted, param="weight", kind="weight")
    assert weights["steps"][:3] == [0, 5, 10]
    assert sum("sent as a valid one" in r.getMessage() for r in caplog.records) == 1


def test_a_frame_the_server_refuses_is_dropped_alone_and_the_run_goes_on(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A frame the server cannot take (here an empty scalars frame, put in the sender's queue as a client
    bug would) is refused by index in its batch's ack: the client drops it alone, counts it, says it once."""
    model, opt = make(7)
    mon = monitor.attach(model, opt, server=url, every=5, close_timeout=30)
    g = torch.Generator().manual_seed(7)
    with caplog.at_level(logging.WARNING, logger="layerwatch"):
        for step in range(30):
            train_step(model, opt, *batch(g), mon=mon)
            if step in (10, 20):
                mon._sender.submit(Frame("scalars", step, values={}, time=1.0))
        mon.close()
    assert mon.status()["dropped"] == {"refused": 2}
    assert get(url, mon.run_id, "scalars", key="loss")["steps"] == list(range(30))
    assert get(url, mon.run_id)["status"] == "finished"
    refused = [r.getMessage() for r in caplog.records if "refused a frame" in r.getMessage()]
    assert len(refused) == 1 and "field 'values' must be a non-empty object" in refused[0], refused


def test_bit_identical_weights_with_the_spool_in_use(tmp_path: Path) -> None:
    def run(with_monitor: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
        model, opt = make(5)
        mon = None
        if with_monitor:
            mon = monitor.attach(
                model,
                opt,
                server=f"http://127.0.0.1:{free_port()}",  # nobody there: everything goes to the spool
                every=1,
                close_timeout=0.2,
                spool_dir=tmp_path / "spool",
                max_memory_bytes=4_000,
                spool_max_bytes=100_000,
            )
        g = torch.Generator().manual_seed(5)
        for _ in range(40):
            train_step(model, opt, *batch(g), mon=mon)
            torch.rand(1)  # the global RNG must be left alone too
        spooled = 0
        if mon is not None:
            deadline = time.monotonic() + 20
            while mon._sender._queue and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.2)
            spooled = len(list((tmp_path / "spool" / mon.run_id).glob("*.jsonl")))
            mon.close()
        return model.state_dict(), torch.get_rng_state(), spooled

    plain, plain_rng, _ = run(False)
    watched, watched_rng, spooled = run(True)
    assert spooled > 0  # the spool was really used
    assert plain.keys() == watched.keys()
    for key, value in plain.items():
        assert torch.equal(value, watched[key]), key
    assert torch.equal(plain_rng, watched_rng)


def test_the_monitor_keeps_no_autograd_graph_or_activation_alive(url: str) -> None:
    """What the hooks read on a sampled step is copied out of the graph: once the training
    drops its output and loss, no tensor that is part of a graph is alive anywhere (the monitor's
    queue, pending samples and sender thread included), and neither are the output or the input."""
    import gc
    import warnings
    import weakref

    def graph_tensors() -> list[torch.Tensor]:
        gc.collect()
        with warnings.catch_warnings():  # scanning touches deprecated torch attributes
            warnings.simplefilter("ignore")
            return [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.grad_fn is not None]

    before = {id(t) for t in graph_tensors()}  # whatever earlier tests left behind is not ours
    model, opt = make(7)
    mon = monitor.attach(model, opt, server=url, every=1, close_timeout=30)
    g = torch.Generator().manual_seed(7)
    refs = []
    for _ in range(4):  # every step sampled: activation, grad and weight hooks all fire
        x, y = batch(g)
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.log(loss=loss, targets=y)
        refs += [weakref.ref(out), weakref.ref(x)]
        del out, loss, x, y
    assert [t for t in graph_tensors() if id(t) not in before] == []
    assert [r for r in refs if r() is not None] == []
    mon.close()
