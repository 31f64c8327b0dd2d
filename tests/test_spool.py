"""The client's durability while the server is away: memory cap, on-disk spool, drops, heartbeats, close().

Real trainings with torch, a real `layerwatch serve` process started late at
the same URL, real files under the test's temp dir. Nothing is mocked.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import torch
from torch import nn

from client_hook import monitor, wire
from client_hook.sending.spool import Entry, Spool, encode, read_segment
from client_hook.sending.transport import envelope
from tests.serving import free_port, serve
from tests.training import train_step

STEPS = 60


def make(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    return model, torch.optim.SGD(model.parameters(), lr=0.05)


def train(model: nn.Module, opt: torch.optim.Optimizer, mon: monitor.Monitor | None, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
        train_step(model, opt, x, y, mon)


def settled(mon: monitor.Monitor, timeout: float = 20.0) -> None:
    """Wait until the sender has numbered everything the training queued."""
    deadline = time.monotonic() + timeout
    while mon._sender._queue and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)  # the last drained items are being numbered and placed


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # deleted between listing and stat
                pass
    return total


class Sampler:
    """Samples a number in a thread every ~2 ms, for checks that must hold *during* a run."""

    def __init__(self, read: Callable[[], float]) -> None:
        self.read, self.peak, self.samples = read, 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.read())
            self.samples += 1
            time.sleep(0.002)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def series(url: str, run_id: str, what: str, **params: str) -> dict:
    response = httpx.get(f"{url}/api/runs/{run_id}/{what}", params=params)
    response.raise_for_status()
    return response.json()


@pytest.fixture
def spool_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "spool"


# ---------------------------------------------------------------- the spool on its own


def entry(seq: int, kind: str, step: int, **fields: object) -> Entry:
    defaults: dict[str, object] = {
        "histograms": {"rows": [["fc", "weight", "grad", -1.0, 1.0, [seq] * wire.HIST_BINS]]},
        "layer_stats": {"rows": []},
        "scalars": {"values": {"loss": 1.0 / (seq + 1)}, "time": 1.0},
        "signals": {"grad_norm": 1.0},
    }
    return encode(wire.frame(kind, run_id="r", seq=seq, step=step, **{**defaults.get(kind, {}), **fields}))


def test_a_torn_last_line_and_garbage_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "000000000000.jsonl"
    good = [entry(i, "scalars", i) for i in range(3)]
    torn = entry(3, "scalars", 3).text[:25]  # a write cut short
    path.write_text(f"{good[0].text}\nnot json\n{good[1].text}\n{good[0].text}\n{good[2].text}\n{torn}")
    entries, skipped = read_segment(path)
    assert entries == good  # the duplicate seq 0 (left by an interrupted rewrite) is skipped too
    assert skipped == 3


def test_spool_stays_under_its_cap_dropping_oldest_histograms_first(tmp_path: Path) -> None:
    drops: list[dict[str, int]] = []
    cap = 40_000
    spool = Spool(tmp_path / "run", cap, on_drop=lambda counts, why: drops.append(counts))
    written: list[Entry] = []
    for step in range(120):
        batch = [entry(3 * step, "histograms", step), entry(3 * step + 1, "scalars", step)]
        batch.append(entry(3 * step + 2, "signals", step))
        spool.append(batch)
        written += batch
        assert dir_bytes(tmp_path / "run") <= cap
        assert spool.bytes == dir_bytes(tmp_path / "run")
    dropped = sum(d.get("histograms", 0) for d in drops)
    assert dropped > 0 and all(set(d) == {"histograms"} for d in drops)

    replayed: list[Entry] = []
    while batch := spool.peek(50, 10_000):
        replayed += batch
        assert spool.ack([e.seq for e in batch]) == len(batch)
    assert [e.seq for e in replayed] == sorted(e.seq for e in replayed)
    assert [e for e in written if e.cls != "histograms"] == [e for e in replayed if e.cls != "histograms"]
    kept_hists = [e.step for e in replayed if e.cls == "histograms"]
    assert kept_hists == list(range(120 - len(kept_hists), 120))  # the oldest went first
    assert len(kept_hists) + dropped == 120
    assert dir_bytes(tmp_path / "run") == 0 and spool.frames == 0
    spool.remove()
    assert not (tmp_path / "run").exists()


def test_envelope_is_the_wire_batch_without_a_second_encoding() -> None:
    entries = [entry(0, "scalars", 0), entry(1, "histograms", 0, rows=[])]
    assert json.loads(envelope(entries)) == wire.batch([json.loads(e.text) for e in entries])
    assert wire.validate_batch(json.loads(envelope(entries)))


# ---------------------------------------------------------------- real trainings, server away then back


def test_server_away_tiny_spool_drops_histograms_then_every_loss_arrives_once(
    tmp_path: Path, spool_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cap = 240_000  # holds everything but the histograms of 60 steps of this model (~2 kB each)
    model, opt = make()
    mon = monitor.attach(
        model,
        opt,
        server=url,
        every=1,
        close_timeout=60,
        spool_dir=spool_dir,
        spool_max_bytes=cap,
        max_memory_bytes=16_000,
    )
    with caplog.at_level(logging.WARNING, logger="layerwatch"), Sampler(lambda: dir_bytes(spool_dir)) as disk:
        train(model, opt, mon, STEPS)
        settled(mon)
    assert disk.samples > 10 and 0 < disk.peak <= cap
    assert 0 < dir_bytes(spool_dir) <= cap
    dropped = mon.status()["dropped"]
    assert set(dropped) == {"histograms"} and dropped["histograms"] > 0
    warning = next(r.getMessage() for r in caplog.records if "dropped the oldest frames" in r.getMessage())
    assert "histograms" in warning and str(spool_dir) in warning

    with serve(tmp_path / "late.db", port), Sampler(lambda: dir_bytes(spool_dir)) as disk:
        mon.close()
        loss = series(url, mon.run_id, "scalars", key="loss")
        assert loss["steps"] == list(range(STEPS))  # every loss step, exactly once
        stats = series(url, mon.run_id, "layer_stats", layer="2", param="weight", kind="grad")
        assert stats["steps"] == list(range(STEPS))
        hist = series(url, mon.run_id, "histograms", layer="2", param="weight", kind="grad")
        kept = len(hist["counts"])
        assert kept + dropped["histograms"] == STEPS  # the gap is exactly what was counted
        assert hist["steps"] == list(range(STEPS - kept, STEPS))  # the oldest went first
        run = httpx.get(f"{url}/api/runs/{mon.run_id}").json()
        assert run["dropped"] == mon.status()["dropped"] == dropped
        assert run["status"] == "finished"
    assert disk.peak <= cap
    assert not (spool_dir / mon.run_id).exists()  # delivered: the run's spool is gone


def test_frames_spooled_while_the_server_is_down_are_delivered_once_it_starts(tmp_path: Path, spool_dir: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    model, opt = make(1)
    mon = monitor.attach(model, opt, server=url, every=1, close_timeout=60, spool_dir=spool_dir, max_memory_bytes=8_000)
    train(model, opt, mon, 30, seed=1)
    settled(mon)
    on_disk = [e for p in sorted((spool_dir / mon.run_id).glob("*.jsonl")) for e in read_segment(p)[0]]
    assert len(on_disk) > 50 and on_disk[0].seq == 0  # most of the run waits on disk, from its start
    assert mon._sender.pending.bytes <= 8_000
    with serve(tmp_path / "late.db", port):
        train(model, opt, mon, 10, seed=2)
        mon.close()
        assert series(url, mon.run_id, "scalars", key="loss")["steps"] == list(range(40))
        for kind in ("layer_stats", "histograms"):
            assert series(url, mon.run_id, kind, layer="0", param="weight", kind="grad")["steps"] == list(range(40))
        run = httpx.get(f"{url}/api/runs/{mon.run_id}").json()
        assert run["dropped"] is None and run["status"] == "finished" and run["last_step"] == 39
    assert mon.status()["dropped"] == {}
    assert not (spool_dir / mon.run_id).exists()


@pytest.mark.parametrize("spool_max_bytes", [1_000_000, 0], ids=["spool", "no-spool"])
def test_host_memory_stays_under_its_cap_over_a_long_run_without_a_server(
    spool_dir: Path, spool_max_bytes: int
) -> None:
    cap = 30_000
    model, opt = make(2)
    mon = monitor.attach(
        model,
        opt,
        server=f"http://127.0.0.1:{free_port()}",
        every=1,
        close_timeout=0.1,
        spool_dir=spool_dir,
        spool_max_bytes=spool_max_bytes,
        max_memory_bytes=cap,
    )
    sender = mon._sender
    with Sampler(lambda: sender.pending.bytes) as memory:
        train(model, opt, mon, 100, seed=3)
        settled(mon)
    assert memory.samples > 10 and 0 < memory.peak <= cap
    held = list(sender.pending.in_memory())
    assert sender.pending.bytes == sum(e.size for e in held) == sum(len(e.text) + 1 for e in held)
    dropped = mon.status()["dropped"]
    if spool_max_bytes:
        assert dropped == {} and dir_bytes(spool_dir) > cap  # the rest waits on disk
    else:
        # Cheapest first: histograms, layer stats and signals went; every loss is still held.
        assert {"histograms", "layer_stats", "signals"} <= set(dropped) and "loss" not in dropped
        losses = sorted(json.loads(e.text)["step"] for e in held if e.cls == "loss")
        assert losses == list(range(100))
        assert not spool_dir.exists()
    mon.close()


def test_a_broken_spool_directory_falls_back_to_dropping_and_training_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("a file where the spool directory should go")
    model, opt = make(3)
    with caplog.at_level(logging.WARNING, logger="layerwatch"):
        mon = monitor.attach(
            model,
            opt,
            server=f"http://127.0.0.1:{free_port()}",
            every=1,
            close_timeout=0.1,
            spool_dir=not_a_dir,
            max_memory_bytes=10_000,
        )
        train(model, opt, mon, 20, seed=4)
        settled(mon)
        mon.close()
    assert mon.step == 20
    assert "cannot write the spool" in caplog.text
    assert mon.status()["dropped"].get("histograms", 0) > 0


# ---------------------------------------------------------------- heartbeats and close()


def test_an_idle_attached_monitor_keeps_sending_heartbeats(tmp_path: Path, spool_dir: Path) -> None:
    with serve(tmp_path / "hb.db") as url:
        model, opt = make(4)
        mon = monitor.attach(model, opt, server=url, every=1, spool_dir=spool_dir, heartbeat_s=0.2)
        train(model, opt, mon, 2)
        seen: list[float] = []
        deadline = time.monotonic() + 30  # a bound for a broken client, not a speed check
        while len(seen) < 4 and time.monotonic() < deadline:
            response = httpx.get(f"{url}/api/runs/{mon.run_id}")
            if response.status_code == 200 and (not seen or response.json()["updated_at"] > seen[-1]):
                seen.append(response.json()["updated_at"])
            time.sleep(0.1)
        assert len(seen) == 4, f"updated_at stopped moving: {seen}"  # the training itself sent nothing since
        run = httpx.get(f"{url}/api/runs/{mon.run_id}").json()
        assert run["status"] == "running" and run["last_step"] == 1
        mon.close()


def test_close_with_the_server_away_returns_and_says_what_stays_on_disk(
    spool_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, opt = make(5)
    mon = monitor.attach(
        model, opt, server=f"http://127.0.0.1:{free_port()}", every=1, close_timeout=0.3, spool_dir=spool_dir
    )
    train(model, opt, mon, 5)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="layerwatch"):
        mon.close()
    # Not a speed check: close() must give up after its timeout instead of waiting for a server.
    assert time.monotonic() - started < 15
    message = next(r.getMessage() for r in caplog.records if "not acknowledged" in r.getMessage())
    run_dir = spool_dir / mon.run_id
    assert f"they stay in the spool directory at {run_dir}" in message
    match = re.search(r"(\d+) frame\(s\) \(steps (\d+)\.\.(\d+)\)", message)
    assert match is not None, message
    on_disk = [e for p in sorted(run_dir.glob("*.jsonl")) for e in read_segment(p)[0]]
    assert int(match.group(1)) == len(on_disk) > 0
    assert (int(match.group(2)), int(match.group(3))) == (0, 4)
    assert [e.seq for e in on_disk] == list(range(len(on_disk)))  # nothing lost, nothing twice
    assert {e.cls for e in on_disk} >= {"run_start", "loss", "layer_stats", "histograms", "run_end"}


def test_the_default_spool_is_private_to_the_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No LAYERWATCH_SPOOL_DIR: the user's own cache folder, mode 0700, tightened if looser; never shared temp."""
    from client_hook.sending.spool import default_spool_dir

    monkeypatch.delenv("LAYERWATCH_SPOOL_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = default_spool_dir()
    assert path == tmp_path / "cache" / "layerwatch" / "spool"
    assert path.stat().st_mode & 0o777 == 0o700
    path.chmod(0o777)
    assert default_spool_dir().stat().st_mode & 0o777 == 0o700
    # A home that cannot be written (the cache "folder" is a file): a 0700 folder named for the user id.
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    fallback = default_spool_dir()
    assert fallback == tmp_path / "tmp" / f"layerwatch-spool-{os.getuid()}"
    assert fallback.stat().st_mode & 0o777 == 0o700


def test_a_training_with_the_server_away_leaves_its_frames_in_the_users_spool(tmp_path: Path) -> None:
    """A real training process whose server never answers: its frames are in ~/.cache/layerwatch/spool/<run>/."""
    import subprocess
    import sys

    script = (
        "import torch, torch.nn as nn; from client_hook import monitor\n"
        "model = nn.Linear(4, 2); opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
        f"mon = monitor.attach(model, optimizer=opt, server='http://127.0.0.1:{free_port()}', run='away',"
        " every=1, close_timeout=0.5)\n"
        "for _ in range(5):\n"
        "    loss = model(torch.randn(8, 4)).pow(2).mean(); opt.zero_grad(); loss.backward(); opt.step()\n"
        "    mon.log(loss=loss)\n"
        "mon.close(); print(mon.run_id)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LAYERWATCH_SPOOL_DIR"}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    run_id = out.stdout.split()[-1]
    root = tmp_path / "cache" / "layerwatch" / "spool"
    assert root.stat().st_mode & 0o777 == 0o700
    frames = [e for seg in sorted((root / run_id).glob("*.jsonl")) for e in read_segment(seg)[0]]
    losses = [json.loads(e.text) for e in frames if e.cls == "loss"]
    assert [f["step"] for f in losses] == [0, 1, 2, 3, 4]
    assert not list((tmp_path / "tmp").glob("layerwatch*")), "nothing of ours in the shared temp folder"
