"""Crashed-run detection: a run nothing was heard from for `heartbeat_timeout_s` is `crashed`.

Every stored frame sets its run's `updated_at`, and an attached client sends a
heartbeat every `wire.HEARTBEAT_S` seconds even while training is quiet, so a
`running` run whose `updated_at` is older than the timeout has lost its
process (killed, out of memory, a machine gone). `Sweeper` checks every few
seconds in the server's lifespan and tells open dashboards over the live hub.
A run that sends again is `running` again (server/store/writes.py does that).
The marking itself is `store.mark_crashed`; this module decides when to look and who to tell.

A server that has only just started has not been able to hear anyone: runs
are judged only once it has listened for a whole timeout itself, so a server
restart (or an outage longer than the timeout) does not mark live runs
crashed before their clients had a chance to reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

from sqlalchemy.orm import Session, sessionmaker

from layerwatch.server import store
from layerwatch.server.live import LiveHub, run_event

log = logging.getLogger(__name__)

# Sweep this often, at most; shorter timeouts (tests) sweep at a quarter of theirs.
MAX_SWEEP_INTERVAL_S = 5.0
MIN_SWEEP_INTERVAL_S = 0.05


def sweep_interval(timeout_s: float) -> float:
    """How often to look: a run is marked at most a quarter timeout (or 5 s) late."""
    return min(MAX_SWEEP_INTERVAL_S, max(MIN_SWEEP_INTERVAL_S, timeout_s / 4))


def stale_before(*, now: float, timeout_s: float, listening_since: float) -> float | None:
    """Runs last heard from before this time are crashed; None while the server has not listened a whole timeout."""
    if now - listening_since < timeout_s:
        return None
    return now - timeout_s


class Sweeper:
    """The background task that marks silent runs crashed and announces it to dashboards."""

    def __init__(
        self, *, sessions: sessionmaker[Session], hub: LiveHub, write_lock: threading.Lock, timeout_s: float
    ) -> None:
        self.sessions = sessions
        self.hub = hub
        self.write_lock = write_lock
        self.timeout_s = timeout_s
        self.interval_s = sweep_interval(timeout_s)
        self.listening_since = time.time()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.listening_since = time.time()
        # A new event per start: an asyncio.Event binds to the loop it is first awaited on, and
        # an app may be started again on another loop (TestClient, schemathesis over ASGI).
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="layerwatch-liveness")

    async def stop(self) -> None:
        """Let a sweep in progress finish its commit, then end (it is never cut off mid-write)."""
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.interval_s)
            if self._stop.is_set():
                return
            try:
                runs = await asyncio.to_thread(self.sweep, time.time())
            except Exception:  # a database hiccup: try again next round
                log.exception("checking for crashed runs failed")
                continue
            if runs:
                self.hub.publish([run_event(run) for run in runs])

    def sweep(self, now: float) -> list[store.RunInfo]:
        """One look (runs in a worker thread): the runs it marked crashed, as the live hub shows them."""
        before = stale_before(now=now, timeout_s=self.timeout_s, listening_since=self.listening_since)
        if before is None:
            return []
        with self.write_lock, self.sessions() as session:
            run_ids = store.mark_crashed(session, before=before)
        if not run_ids:
            return []
        for run_id in run_ids:
            log.warning("run %s sent nothing for %g s: marked crashed", run_id, self.timeout_s)
        with self.sessions() as session:
            runs = [store.get_run(session, run_id=run_id) for run_id in run_ids]
        return [run for run in runs if run is not None]
