"""Which process of a distributed training this is, and the one run all of its processes share.

A DDP training is one run whatever its world size. At `attach`, when a process
group is initialized (`torch.distributed.is_available() and is_initialized()`),
the processes agree on the run through the process group's own key-value store
(the TCPStore/FileStore of its rendezvous), never a collective: rank 0 writes its
run id (a uuid) and name under the next attach number and goes on at once; a rank
r > 0 waits for that key (up to JOIN_TIMEOUT_S, only at attach) and takes them.
So attaching on rank 0 only never hangs (nobody waits for anybody), nothing runs
on the device (NCCL or not), and a rank whose rank 0 never attaches makes a run
of its own after the timeout, with a warning. Ranks attach the same number of
times, in the same order (the n-th attach of rank r joins rank 0's n-th).

Without a process group but with the launcher's RANK and WORLD_SIZE in the
environment (attach before `init_process_group`, a launcher without one), no
process can ask another: the run id is derived on each rank from what they all
share, the project, the run name if given, and the launch itself, the first of
LAYERWATCH_RUN_ID (set it the same on every rank to choose), TORCHELASTIC_RUN_ID
with its restart count (torchrun), SLURM_JOB_ID with its step and restart count,
else MASTER_ADDR:MASTER_PORT (a warning says two trainings launched alike then
share one run).

LAYERWATCH_DISTRIBUTED=0 turns all of this off (each process its own run, as
before).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import secrets
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger("layerwatch")

OFF_VALUES = ("0", "off", "false", "no")
JOIN_TIMEOUT_S = 120.0  # how long a rank r > 0 waits at attach for rank 0's run (launchers start ranks together)
STORE_PREFIX = "layerwatch/run/"
_joins = 0  # attaches of this process that joined a process group's run: the next one is _joins + 1


@dataclass(frozen=True)
class Distributed:
    """This process's place in its training, and the run its ranks agreed on."""

    rank: int
    world_size: int
    run_id: str
    run: str  # the run's name, rank 0's
    config: dict[str, Any] = field(default_factory=dict)  # what run_start's config records about it
    # The run's write secret (wire: run_start "secret"), the same on every rank: rank 0's, shared
    # through the process group's store; without one, derived from the launch (see _from_environment).
    secret: str = ""


def join_run(name: str, *, named: bool, project: str, device: str | None) -> Distributed | None:
    """The distributed identity of this process, or None outside a distributed training.

    `name` is the run name this process would use (the user's, or a default when
    `named` is False). With a process group this makes the one collective.
    """
    if os.environ.get("LAYERWATCH_DISTRIBUTED", "").strip().lower() in OFF_VALUES:
        return None
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        try:
            return _from_process_group(name, device)
        except Exception:  # never into the training: this process then makes a run of its own
            log.warning("layerwatch: could not agree on one run with the other ranks; this rank's is its own",
                        exc_info=True)  # fmt: skip
            return None
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    if rank is None or world is None or not 0 <= rank < world:
        return None
    return _from_environment(rank, world, name, named=named, project=project, device=device)


def _process(rank: int, device: str | None) -> dict[str, Any]:
    return {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "local_rank": _env_int("LOCAL_RANK"),
            "device": device}  # fmt: skip


def _from_process_group(name: str, device: str | None) -> Distributed:
    global _joins
    dist = torch.distributed
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {**_process(rank, device), "run_id": uuid.uuid4().hex, "run": name, "secret": secrets.token_hex(16)}
    if world > 1:
        store = dist.distributed_c10d._get_default_store()  # the rendezvous' store: host-side, no collective
        if rank == 0:
            attach_number = store.add(f"{STORE_PREFIX}attaches", 1)
            store.set(f"{STORE_PREFIX}{attach_number}", json.dumps(mine))
        else:
            attach_number = _joins + 1
            key = f"{STORE_PREFIX}{attach_number}"
            store.wait([key], datetime.timedelta(seconds=JOIN_TIMEOUT_S))  # raises after the timeout
            shared = json.loads(store.get(key))
            mine = {**mine, **{k: v for k, v in shared.items() if k in ("run_id", "run", "secret")}}
        _joins = attach_number
    config = {
        "rank": rank,
        "world_size": world,
        "backend": str(dist.get_backend()),
        "run_id_from": "rank 0, shared at attach through the process group's store",
        # this process (rank 0's is kept); never the secret
        "ranks": [{k: v for k, v in mine.items() if k not in ("run_id", "run", "secret")}],
    }
    return Distributed(rank, world, str(mine["run_id"]), str(mine["run"]), config, str(mine["secret"]))


def _from_environment(
    rank: int, world: int, name: str, *, named: bool, project: str, device: str | None
) -> Distributed:
    config: dict[str, Any] = {"rank": rank, "world_size": world, "ranks": [_process(rank, device)]}
    if world == 1:
        config = {**config, "run_id_from": "uuid (a world of one)"}
        return Distributed(rank, world, uuid.uuid4().hex, name, config, secrets.token_hex(16))
    source, launch = _launch_identity()
    if source == "MASTER_ADDR:MASTER_PORT" and rank == 0:
        log.warning(
            "layerwatch: RANK/WORLD_SIZE without a process group or a job id: the run id comes from %s=%s, so "
            "trainings launched alike share one run; set LAYERWATCH_RUN_ID (the same on every rank) to tell them apart",
            source,
            launch,
        )
    seed = "\0".join(["layerwatch", project, name if named else "", launch])
    run_id = hashlib.sha256(seed.encode()).hexdigest()[:32]
    # Default names are per process (a timestamp): derived from the id instead, the same on every rank.
    run = name if named else f"run-{run_id[:8]}"
    # No channel between the ranks: the secret comes from the launch too (another hash of it, so the
    # public run id does not give it away), or from LAYERWATCH_RUN_SECRET when set alike on every rank.
    secret = os.environ.get("LAYERWATCH_RUN_SECRET") or hashlib.sha256(("secret\0" + seed).encode()).hexdigest()
    return Distributed(rank, world, run_id, run, {**config, "run_id_from": f"environment ({source})"}, secret)


def _launch_identity() -> tuple[str, str]:
    """(what, value): the first identity of this launch that every rank sees alike."""
    env = os.environ.get
    if env("LAYERWATCH_RUN_ID"):
        return "LAYERWATCH_RUN_ID", env("LAYERWATCH_RUN_ID", "")
    elastic = env("TORCHELASTIC_RUN_ID")
    if elastic and elastic != "none":  # torchrun's rendezvous id; a restart is a new run (its seqs restart)
        return "TORCHELASTIC_RUN_ID", f"{elastic}/{env('TORCHELASTIC_RESTART_COUNT', '0')}"
    if env("SLURM_JOB_ID"):
        return "SLURM_JOB_ID", f"{env('SLURM_JOB_ID')}.{env('SLURM_STEP_ID', '')}/{env('SLURM_RESTART_COUNT', '0')}"
    return "MASTER_ADDR:MASTER_PORT", f"{env('MASTER_ADDR', '')}:{env('MASTER_PORT', '')}"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() else None
