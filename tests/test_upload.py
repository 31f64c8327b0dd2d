"""`layerwatch upload`: what a training left in its spool reaches a server later, once.

Real trainings whose server was away (or went away) at close(), a real
`layerwatch serve` started afterwards, and the real command line.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx

from client_hook import monitor
from client_hook.sending.spool import RUN_START_FILE
from tests.serving import free_port, serve
from tests.test_spool import make, series, train

STEPS = 12


def upload(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "layerwatch", "upload", *args], capture_output=True, text=True, timeout=120
    )


def left_behind(spool_dir: Path, server: str, steps: int = STEPS, seed: int = 0) -> str:
    """A training whose frames could not be delivered by close(): its run id."""
    model, opt = make(seed)
    mon = monitor.attach(model, opt, server=server, every=1, close_timeout=0.3, spool_dir=spool_dir, run="left")
    train(model, opt, mon, steps)
    mon.close()
    assert (spool_dir / mon.run_id / RUN_START_FILE).is_file()
    return mon.run_id


def test_a_spool_left_at_close_is_delivered_later_once_and_removed(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    port = free_port()
    run_id = left_behind(spool_dir, f"http://127.0.0.1:{port}")

    # Nobody answers yet: the command says so and keeps every file.
    refused = upload(str(spool_dir), "--server", f"http://127.0.0.1:{port}")
    assert refused.returncode == 1 and "cannot reach" in refused.stderr, refused
    assert any((spool_dir / run_id).glob("*.jsonl"))

    with serve(tmp_path / "later.db", port=port) as url:
        done = upload(str(spool_dir), "--server", url)
        assert done.returncode == 0, done.stderr
        assert f"run {run_id}: " in done.stdout and f"(steps 0..{STEPS - 1}) delivered" in done.stdout
        assert not (spool_dir / run_id).exists()

        loss = series(url, run_id, "scalars", key="loss")
        assert loss["steps"] == list(range(STEPS))
        stats = series(url, run_id, "layer_stats", layer="0", param="weight", kind="grad")
        assert stats["steps"] == list(range(STEPS))
        run = httpx.get(f"{url}/api/runs/{run_id}").json()
        assert (run["name"], run["status"], run["last_step"]) == ("left", "finished", STEPS - 1)

        # Run again on what is left (nothing): nothing to do, nothing stored twice.
        again = upload(str(spool_dir), "--server", url)
        assert again.returncode == 0 and "nothing to send" in again.stdout
        assert series(url, run_id, "scalars", key="loss")["steps"] == list(range(STEPS))


def test_the_run_start_kept_beside_the_spool_introduces_the_run_to_a_new_server(tmp_path: Path) -> None:
    """The first server acknowledged run_start and then vanished: a fresh server still learns the run."""
    spool_dir = tmp_path / "spool"
    port = free_port()
    with serve(tmp_path / "first.db", port=port) as url:
        model, opt = make(1)
        mon = monitor.attach(model, opt, server=url, every=1, close_timeout=0.3, spool_dir=spool_dir, run="moved")
        train(model, opt, mon, 3)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until the first steps are stored (and acknowledged) there
            if _known(url, mon.run_id) and series(url, mon.run_id, "scalars", key="loss")["steps"] == [0, 1, 2]:
                break
            time.sleep(0.1)
    # The server is gone; training goes on and the rest is left in the spool at close().
    train(model, opt, mon, 5, seed=1)
    mon.close()
    run_dir = spool_dir / mon.run_id
    assert (run_dir / RUN_START_FILE).is_file()

    with serve(tmp_path / "second.db") as other:
        done = upload(str(run_dir), "--server", other)  # one run's folder works too
        assert done.returncode == 0, done.stderr
        run = httpx.get(f"{other}/api/runs/{mon.run_id}").json()
        assert (run["name"], run["status"]) == ("moved", "finished")
        steps = series(other, mon.run_id, "scalars", key="loss")["steps"]
        assert steps and steps[-1] == 7 and 0 not in steps  # what was left behind, not what was delivered


def _known(url: str, run_id: str) -> bool:
    return httpx.get(f"{url}/api/runs/{run_id}").status_code == 200


def test_a_path_that_is_not_a_folder_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    done = upload(str(missing), "--server", "http://127.0.0.1:9")
    assert done.returncode == 2 and f"{str(missing)!r} is not a folder" in done.stderr


def test_each_rank_of_a_ddp_run_spools_apart_and_uploads_under_its_rank(tmp_path: Path) -> None:
    from client_hook.sending.sender import Frame, Sender

    spool_dir = tmp_path / "spool"
    port = free_port()
    for rank in (0, 1):  # two ranks on one host, one spool folder, the server away
        sender = Sender(server=f"http://127.0.0.1:{port}", run_id="ddp-run", rank=rank, spool_dir=spool_dir)
        config = {"rank": rank, "world_size": 2}
        sender.submit(Frame("run_start", 0, name="ddp", project="p", time=1.0, model={"modules": []}, config=config))
        for step in range(3):
            sender.submit(Frame("scalars", step, values={"loss": float(rank)}, time=1.0))
        sender.submit(Frame("run_end", 2, status="finished", time=2.0))
        assert sender.close(0.3) == 5
    assert sorted(p.name for p in spool_dir.iterdir()) == ["ddp-run", "ddp-run.rank1"]

    with serve(tmp_path / "later.db", port=port) as url:
        done = upload(str(spool_dir), "--server", url)
        assert done.returncode == 0, done.stderr
        assert list(spool_dir.iterdir()) == []
        assert series(url, "ddp-run", "scalars", key="loss")["values"] == [0.0] * 3
        assert series(url, "ddp-run", "scalars", key="loss/rank1")["values"] == [1.0] * 3
        run = httpx.get(f"{url}/api/runs/ddp-run").json()
        assert (run["status"], run["config"]["rank"]) == ("finished", 0)
