"""DDP: a real 2-rank training (torch.distributed on gloo, two processes from torch.multiprocessing.spawn)
against a real `layerwatch serve` is one run: world size recorded, per-layer statistics once (rank 0's,
named without `module.`), each rank's loss and signals every step, and a NaN in one rank's batch found
and pinned on that rank. Plus the environment-only fallback's run id, which needs no processes."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import layerwatch
from client_hook.training.distributed import join_run
from tests.serving import free_port, serve

WORLD = 2
STEPS = 10
EVERY = 2
NAN_STEP = 4
SPAWN_TIMEOUT_S = 90


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _train(
    rank: int, port: int, server: str, run: str, nan_on_rank: int | None, out: str, rank0_only: bool = False
) -> None:
    """One rank of the training (spawned): DDP over gloo, the monitor attached to the DDP wrapper."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # the same initial weights on both ranks (DDP broadcasts rank 0's anyway)
        model = nn.parallel.DistributedDataParallel(MLP())
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        mon = None
        if not rank0_only or rank == 0:
            mon = layerwatch.attach(model, optimizer=opt, server=server, run=run, every=EVERY, close_timeout=30)
        data = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
        losses = []
        for step in range(STEPS):
            x, y = torch.randn(32, 8, generator=data), torch.randint(0, 4, (32,), generator=data)
            if rank == nan_on_rank and step == NAN_STEP:
                x[3, 5] = float("nan")
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if mon is not None:
                mon.log(loss=loss, targets=y)
            losses.append(loss.item())
        if mon is None:
            Path(out, f"rank{rank}.json").write_text(json.dumps({"status": None, "losses": losses, "run": None}))
            return
        mon.close()
        status = mon.status()
        Path(out, f"rank{rank}.json").write_text(json.dumps({"status": status, "losses": losses, "run": mon.run}))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    db = tmp_path_factory.mktemp("ddp") / "ddp.db"
    with serve(db) as url:
        yield url, db


def _spawn(
    server: str, run: str, tmp: Path, nan_on_rank: int | None = None, rank0_only: bool = False
) -> list[dict[str, Any]]:
    context = mp.spawn(
        _train, args=(free_port(), server, run, nan_on_rank, str(tmp), rank0_only), nprocs=WORLD, join=False
    )
    # A bounded wait: a rank stuck at attach (waiting for ranks that never come) fails the test, not CI.
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    # join() returns False each time one rank ends while others run on.
    while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() < deadline:
            continue
        for process in context.processes:
            process.kill()
        raise AssertionError(f"the {WORLD} ranks of {run!r} did not finish within {SPAWN_TIMEOUT_S} s")
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def healthy(server: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    url, _ = server
    ranks = _spawn(url, "ddp-healthy", tmp_path_factory.mktemp("healthy"))
    runs = httpx.get(f"{url}/api/runs", params={"name": "ddp-healthy"}).json()
    return {"ranks": ranks, "runs": runs}


def test_a_ddp_training_is_one_run_with_its_world_recorded(server: tuple[str, Path], healthy: dict) -> None:
    url, db = server
    (run,) = healthy["runs"]  # one run, whatever the world size
    assert run["status"] == "finished" and run["last_step"] == STEPS - 1
    ranks = healthy["ranks"]
    assert {r["status"]["run_id"] for r in ranks} == {run["id"]}
    assert [(r["status"]["rank"], r["status"]["world_size"]) for r in ranks] == [(0, WORLD), (1, WORLD)]
    assert all(not r["status"]["dropped"] for r in ranks)  # nothing refused, nothing shed
    detail = httpx.get(f"{url}/api/runs/{run['id']}").json()
    config = detail["config"]
    assert (config["rank"], config["world_size"], config["backend"]) == (0, WORLD, "gloo")  # rank 0's description
    assert [r["rank"] for r in config["ranks"]] == [0] and config["ranks"][0]["pid"] != os.getpid()  # rank 0's
    # The wrapped module's names, as `model.module.named_modules()` gives them: no "module." prefix.
    names = [m["name"] for m in detail["model"]["modules"]]
    assert names == ["", "fc1", "act", "fc2"]

    # Per-layer statistics once per sampled step, from rank 0 alone; rank 1 sent none.
    sampled = list(range(0, STEPS, EVERY))
    grads = httpx.get(
        f"{url}/api/runs/{run['id']}/layer_stats", params={"layer": "fc1", "param": "weight", "kind": "grad"}
    ).json()
    assert grads["steps"] == sampled
    with sqlite3.connect(db) as con:
        per_step = con.execute(
            "SELECT step, COUNT(*) FROM layer_stats WHERE run_id = ? GROUP BY step ORDER BY step", (run["id"],)
        ).fetchall()
        layers = {r[0] for r in con.execute("SELECT DISTINCT layer FROM layer_stats WHERE run_id = ?", (run["id"],))}
        rank_signals = con.execute(
            "SELECT rank, step FROM rank_step_signals WHERE run_id = ? ORDER BY step", (run["id"],)
        ).fetchall()
        rank0_signals = con.execute("SELECT COUNT(*) FROM step_signals WHERE run_id = ?", (run["id"],)).fetchone()
    # 4 parameters x (weight, grad) + the outputs of fc1, act, fc2.
    assert per_step == [(step, 11) for step in sampled]
    assert layers == {"fc1", "act", "fc2"}
    # Each rank's signals every step: rank 0's where a single process keeps them, rank 1's beside them.
    assert rank_signals == [(1, step) for step in range(STEPS)] and rank0_signals == (STEPS,)

    # Each rank's loss, every step: rank 0's as "loss", rank 1's as "loss/rank1".
    for key, rank in (("loss", 0), ("loss/rank1", 1)):
        series = httpx.get(f"{url}/api/runs/{run['id']}/scalars", params={"key": key}).json()
        assert series["steps"] == list(range(STEPS))
        assert series["values"] == pytest.approx(ranks[rank]["losses"])
    assert ranks[0]["losses"] != ranks[1]["losses"]  # two shards, two losses


def test_a_healthy_ddp_run_raises_no_warning(server: tuple[str, Path], healthy: dict) -> None:
    url, _ = server
    (run,) = healthy["runs"]
    alerts = httpx.get(f"{url}/api/runs/{run['id']}/alerts").json()
    assert [a for a in alerts if a["severity"] != "info"] == []


def test_a_nan_on_rank_1_only_is_found_and_named_on_rank_1(
    server: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    url, _ = server
    _spawn(url, "ddp-nan", tmp_path_factory.mktemp("nan"), nan_on_rank=1)
    (run,) = httpx.get(f"{url}/api/runs", params={"name": "ddp-nan"}).json()
    alerts = httpx.get(f"{url}/api/runs/{run['id']}/alerts").json()
    (found,) = [a for a in alerts if a["rule"] == "non_finite"]
    assert found["severity"] == "critical" and found["step"] == NAN_STEP
    assert "in the input batch on rank 1" in found["message"], found["message"]
    assert found["evidence"]["rank"] == 1 and found["evidence"]["where"] == "input"
    assert 0 in found["evidence"]["ranks"]  # rank 0's gradients went non-finite too, through the all-reduce
    nan_loss = httpx.get(f"{url}/api/runs/{run['id']}/scalars", params={"key": "loss/rank1"}).json()
    assert nan_loss["values"][NAN_STEP] is None  # NaN is data, shown as null


def test_without_a_process_group_the_ranks_derive_one_run_id_from_the_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAYERWATCH_RUN_ID", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    seen = []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        seen.append(join_run(f"run-at-{rank}", named=False, project="p", device="cpu"))
    assert [d.rank for d in seen] == [0, 1] and seen[0].world_size == 2
    assert seen[0].run_id == seen[1].run_id and seen[0].run == seen[1].run == f"run-{seen[0].run_id[:8]}"
    assert seen[0].config["run_id_from"] == "environment (TORCHELASTIC_RUN_ID)"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # a restarted job numbers its frames from 0 again
    assert join_run("run", named=False, project="p", device="cpu").run_id != seen[0].run_id
    named = join_run("resnet", named=True, project="p", device="cpu")
    assert named.run == "resnet" and named.run_id not in (seen[0].run_id,)
    monkeypatch.setenv("LAYERWATCH_DISTRIBUTED", "off")
    assert join_run("run", named=False, project="p", device="cpu") is None


def test_attaching_on_rank_0_only_never_waits_for_the_others(
    server: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The common habit `if rank == 0: attach(...)`: rank 0 shares its run through the store and goes on,
    nobody waits (a collective at attach would hang both ranks here); the run is rank 0's, complete."""
    url, _ = server
    ranks = _spawn(url, "ddp-rank0-only", tmp_path_factory.mktemp("rank0"), rank0_only=True)
    assert ranks[1]["status"] is None and len(ranks[1]["losses"]) == STEPS
    (run,) = httpx.get(f"{url}/api/runs", params={"name": "ddp-rank0-only"}).json()
    assert run["status"] == "finished" and run["last_step"] == STEPS - 1
    loss = httpx.get(f"{url}/api/runs/{run['id']}/scalars", params={"key": "loss"}).json()
    assert loss["steps"] == list(range(STEPS))
