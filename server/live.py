"""Live push to dashboards: a hub of per-dashboard queues and the /ws/live socket.

Ingest publishes after each commit; every connected dashboard has its own
bounded queue, and a dashboard that does not keep up loses events (it can
re-read over REST) instead of slowing ingest down. Events are JSON objects:

    {"type": "run", "run": RunPublic}
    {"type": "scalars", "run_id": ..., "key": ..., "steps": [...], "values": [...]}
    {"type": "layer_stats", "run_id": ..., "steps": [...]}
    {"type": "alert", "run_id": ..., "alert": AlertPublic}

with NaN and ±Infinity sent as null. A server with a token wants it here as
`?token=` (browsers cannot set websocket headers) or as a Bearer header; without
it the socket is closed with auth.CLOSE_UNAUTHORIZED and the reason. A
project's token hears of that project's runs only.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from layerwatch.server import store
from layerwatch.server.schemas import AlertPublic, RunPublic, json_safe

log = logging.getLogger(__name__)


# Enough for a few seconds of a busy run; past it the dashboard is not reading.
QUEUE_SIZE = 1000


class LiveHub:
    """Fans events out to every connected dashboard without ever waiting on one.

    A dashboard with a project token hears only its project's runs: the hub learns
    each run's project from the run events, which come before any other event of
    that run (`ingest_events`); an event of a run it does not know goes only to
    dashboards that see every project.
    """

    def __init__(self, queue_size: int = QUEUE_SIZE) -> None:
        self.queue_size = queue_size
        # Each queue with the event loop its dashboard's socket runs on (one loop under
        # uvicorn, but a test client may run each socket on its own) and the one project
        # it may hear of (None: all).
        self._queues: dict[asyncio.Queue[str], tuple[asyncio.AbstractEventLoop, str | None]] = {}
        self._projects: dict[str, str] = {}  # run id -> project: one short entry per run ever announced
        self.dropped = 0

    @property
    def listeners(self) -> int:
        return len(self._queues)

    def subscribe(self, project: str | None = None) -> asyncio.Queue[str]:
        """A new dashboard's queue (of `project`'s events only, unless None); call from the loop that will read it."""
        queue: asyncio.Queue[str] = asyncio.Queue(maxsize=self.queue_size)
        self._queues[queue] = (asyncio.get_running_loop(), project)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[str]) -> None:
        self._queues.pop(queue, None)

    def publish(self, events: list[dict[str, Any]]) -> None:
        """Queue events for every dashboard that may see them; never blocks."""
        for event in events:
            if event.get("type") == "run":
                self._projects[event["run"]["id"]] = event["run"]["project"]
        if not self._queues or not events:
            return
        texts = [(self._projects.get(_run_id(event)), self._text(event)) for event in events]
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        for queue, (loop, project) in list(self._queues.items()):
            mine = [text for owner, text in texts if project is None or owner == project]
            if not mine:
                continue
            if loop is here:
                self._offer(queue, mine)
            elif not loop.is_closed():
                loop.call_soon_threadsafe(self._offer, queue, mine)

    @staticmethod
    def _text(event: dict[str, Any]) -> str:
        return json.dumps(json_safe(event), allow_nan=False)

    def _offer(self, queue: asyncio.Queue[str], texts: list[str]) -> None:
        for text in texts:
            try:
                queue.put_nowait(text)
            except asyncio.QueueFull:
                if self.dropped == 0:
                    log.warning("a dashboard is not keeping up; dropping live events for it")
                self.dropped += 1


def _run_id(event: dict[str, Any]) -> str | None:
    """The run an event is about: `run_id`, or the run of a run event."""
    return event.get("run_id") or event.get("run", {}).get("id")


def ingest_events(result: store.IngestResult, runs: list[store.RunInfo]) -> list[dict[str, Any]]:
    """The live events that announce one committed batch."""
    events: list[dict[str, Any]] = [run_event(run) for run in runs]
    for (run_id, key), (steps, values) in result.scalar_points.items():
        events.append({"type": "scalars", "run_id": run_id, "key": key, "steps": steps, "values": values})
    for run_id, steps in result.stat_steps.items():
        events.append({"type": "layer_stats", "run_id": run_id, "steps": steps})
    events += [alert_event(alert) for alert, _ in result.alerts]
    return events


def run_event(run: store.RunInfo) -> dict[str, Any]:
    """The live event for a run that changed: new, advanced, ended, crashed or revived."""
    return {"type": "run", "run": RunPublic.model_validate(run).model_dump(mode="json")}


def alert_event(alert: store.AlertInfo) -> dict[str, Any]:
    """The live event for a new or updated alert (the diagnosis engine publishes these)."""
    public = AlertPublic(
        id=alert.id,
        rule=alert.rule,
        severity=alert.severity,
        step=alert.first_step,
        last_step=alert.last_step,
        count=alert.count,
        layer=alert.layer,
        message=alert.message,
        remedy=alert.remedy,
        evidence=alert.evidence,
    )
    return {"type": "alert", "run_id": alert.run_id, "alert": public.model_dump(mode="json")}
