"""The sender thread: everything between the training thread and the server.

The training thread only ever calls `Sender.submit`: a length check and a
`deque.append` (atomic under the GIL; no lock, no wake-up call: this thread polls
every BATCH_WINDOW_S), so the training thread never waits on this one. This
thread turns queued items into wire frames (resolving the sample's single
device-to-host copy here, off the training thread), numbers them (per-run
`seq` from 0), sends them in batches over one websocket and keeps
every frame until the server acknowledges it, so a reconnect replays exactly
what was not committed. The server being absent, refusing or slow never
reaches the training thread; the cost is memory, bounded by `max_pending`.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from client_hook import wire

log = logging.getLogger("layerwatch")

BATCH_MAX_FRAMES = 256  # frames per websocket message: one server transaction each
BATCH_WINDOW_S = 0.05  # gather frames this long before sending, unless a batch is full
ACK_TIMEOUT_S = 10.0  # no ack by then: the connection is treated as broken and replayed
RECONNECT_MIN_S, RECONNECT_MAX_S = 0.25, 5.0
# Kinds dropped first when the pending buffer is full; loss and run frames are kept last.
DROP_ORDER = ("histograms", "layer_stats", "scalars")


class Item(Protocol):
    """Something the training thread queued; turned into frames in this thread."""

    def frames(self) -> list[tuple[str, int, dict[str, Any]]]:
        """(kind, step, fields) for each frame this item becomes."""
        ...


class Frame:
    """A ready frame: kind, step and fields, no host copy to wait for."""

    __slots__ = ("kind", "step", "fields")

    def __init__(self, kind: str, step: int, **fields: Any) -> None:
        self.kind, self.step, self.fields = kind, step, fields

    def frames(self) -> list[tuple[str, int, dict[str, Any]]]:
        return [(self.kind, self.step, self.fields)]


def ingest_url(server: str) -> str:
    """http(s)://host:port[/prefix] -> ws(s)://host:port[/prefix]/ws/ingest."""
    parts = urlsplit(server if "://" in server else f"http://{server}")
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"server must be an http(s):// or ws(s):// URL, but got {server!r}")
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/ws/ingest", "", ""))


class Sender:
    """A daemon thread that delivers one run's frames, at least once, in order."""

    def __init__(
        self,
        *,
        server: str,
        run_id: str,
        token: str | None = None,
        on_alert: Callable[[dict[str, Any]], None] | None = None,
        max_queue: int = 10_000,
        max_pending: int = 100_000,
    ) -> None:
        self.url = ingest_url(server)
        self.run_id = run_id
        self._token = token
        self._on_alert = on_alert
        self._queue: deque[Item] = deque()
        self._max_queue = max_queue
        self._max_pending = max_pending
        self._seq = itertools.count()
        self._pending: OrderedDict[int, dict[str, Any]] = OrderedDict()  # seq -> frame, until acked
        self._run_start: dict[str, Any] | None = None  # re-sent first on every connection
        self._ws: Any = None
        self._closing = threading.Event()
        self._lock = threading.Lock()  # guards the counters read by close() and status()
        self.acked = 0
        self.dropped: dict[str, int] = {}
        self.connected = False
        self._warned: set[str] = set()
        self._alerts_seen: set[tuple[str, str | None, str]] = set()
        self._thread = threading.Thread(target=self._run, name="layerwatch-sender", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ training thread

    def submit(self, item: Item) -> bool:
        """Queue `item` without blocking; False (and counted) if the queue is full."""
        if len(self._queue) >= self._max_queue:
            self._count_drop("queue_full")
            return False
        self._queue.append(item)
        return True

    def close(self, timeout: float) -> int:
        """Deliver what is queued, waiting at most `timeout` s; return frames left undelivered."""
        self._closing.set()
        self._thread.join(timeout)
        left = len(self._queue) + len(self._pending)
        if left:
            steps = [f["step"] for f in self._pending.values()]
            where = f" (steps {min(steps)}..{max(steps)})" if steps else ""
            log.warning(
                "layerwatch: %d frame(s)%s not acknowledged by %s within %.1f s; they are lost",
                left,
                where,
                self.url,
                timeout,
            )
        self._disconnect()
        return left

    # ------------------------------------------------------------ sender thread

    def _run(self) -> None:
        backoff = RECONNECT_MIN_S
        next_try = 0.0
        while True:
            drained = self._drain(BATCH_WINDOW_S)
            if self._closing.is_set() and not drained and not self._queue and not self._pending:
                return
            if self._ws is None and time.monotonic() >= next_try:
                if self._connect():
                    backoff = RECONNECT_MIN_S
                else:
                    next_try = time.monotonic() + backoff
                    backoff = min(backoff * 2, RECONNECT_MAX_S)
            if self._ws is not None and self._pending:
                try:
                    self._send_pending()
                except Exception as exc:  # connection dropped mid-batch: replay after reconnect
                    self._warn_once(
                        f"lost:{type(exc).__name__}",
                        "layerwatch: connection to %s lost (%s); will replay",
                        self.url,
                        exc,
                    )
                    self._disconnect()
            elif self._ws is None and self._closing.is_set():
                time.sleep(0.05)  # waiting for a server while close() waits for us

    def _drain(self, window: float) -> bool:
        """Move queued items into `_pending` as numbered frames; True if any came."""
        if not self._queue:
            self._closing.wait(window)  # a poll, woken early only by close()
        items = []
        while self._queue and len(items) < BATCH_MAX_FRAMES:
            items.append(self._queue.popleft())
        if not items:
            return False
        for item in items:
            try:
                produced = item.frames()
            except Exception as exc:  # a bad sample must not stop the thread
                self._warn_once(
                    f"item:{type(exc).__name__}", "layerwatch: could not encode a sample (%s); skipped", exc
                )
                continue
            for kind, step, fields in produced:
                seq = next(self._seq)
                frame = wire.frame(kind, run_id=self.run_id, seq=seq, step=step, **fields)
                if kind == "run_start":
                    self._run_start = frame
                self._pending[seq] = frame
        self._bound_pending()
        return True

    def _bound_pending(self) -> None:
        """Keep `_pending` under `max_pending`, dropping histograms first, loss last."""
        excess = len(self._pending) - self._max_pending
        for kind in DROP_ORDER:
            if excess <= 0:
                return
            victims = [seq for seq, f in self._pending.items() if f["kind"] == kind][:excess]
            for seq in victims:
                del self._pending[seq]
            if victims:
                self._count_drop(kind, len(victims))
                excess -= len(victims)

    def _connect(self) -> bool:
        import inspect

        from websockets.sync.client import connect  # imported here: only this thread needs it

        # websockets >= 16 wants `legacy=True` to return a plain connection (no auto-reconnect:
        # replay after reconnect is ours, driven by acks).
        legacy = {"legacy": True} if "legacy" in inspect.signature(connect).parameters else {}
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else None
        try:
            self._ws = connect(
                self.url,
                additional_headers=headers,
                open_timeout=2,
                close_timeout=1,
                compression=None,  # frames are small and the CPU is the training's
                max_size=wire.MAX_MESSAGE_BYTES,
                proxy=None,
                **legacy,
            )
        except Exception as exc:
            self._warn_once(
                "connect", "layerwatch: server %s not reachable (%s); training goes on, data is kept", self.url, exc
            )
            self._ws = None
            return False
        if self._run_start is not None and self._run_start["seq"] not in self._pending:
            # The server may have lost the run (a new database): say who we are again.
            # It ignores the frame if (run, seq) is already stored.
            try:
                self._send_batch([self._run_start])
            except Exception as exc:
                self._warn_once("hello", "layerwatch: server %s refused the run (%s)", self.url, exc)
                self._disconnect()
                return False
        self.connected = True
        log.info("layerwatch: connected to %s", self.url)
        return True

    def _send_pending(self) -> None:
        while self._pending:
            frames = list(itertools.islice(self._pending.values(), BATCH_MAX_FRAMES))
            self._send_batch(frames)

    def _send_batch(self, frames: list[dict[str, Any]]) -> None:
        self._ws.send(json.dumps(wire.batch(frames)))
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while True:
            message = json.loads(self._ws.recv(timeout=max(0.0, deadline - time.monotonic())))
            kind = message.get("kind")
            if kind == "ack":
                acked = message.get("seqs", {}).get(self.run_id, [])
                with self._lock:
                    for seq in acked:
                        if self._pending.pop(seq, None) is not None:
                            self.acked += 1
                return
            if kind == "alert":
                self._alert(message.get("alert") or {})
                continue
            if kind == "error":
                # The server refused this batch (a schema or version mismatch): resending
                # it would fail forever, so it is dropped and said once.
                self._warn_once(
                    f"error:{message.get('error')}", "layerwatch: server rejected data: %s", message.get("error")
                )
                for frame in frames:
                    self._pending.pop(frame["seq"], None)
                self._count_drop("rejected", len(frames))
                raise ConnectionError(f"server rejected a batch: {message.get('error')}")
            self._warn_once(f"kind:{kind}", "layerwatch: ignoring a server message of kind %r", kind)

    def _alert(self, alert: dict[str, Any]) -> None:
        key = (str(alert.get("rule")), alert.get("layer"), str(alert.get("severity")))
        if key not in self._alerts_seen:
            self._alerts_seen.add(key)
            where = f" in {alert['layer']!r}" if alert.get("layer") else ""
            log.warning(
                "layerwatch [%s] %s%s: %s", alert.get("severity"), alert.get("rule"), where, alert.get("message")
            )
        if self._on_alert is not None:
            try:
                self._on_alert(alert)
            except Exception:
                log.exception("layerwatch: on_alert callback raised; ignored")

    def _disconnect(self) -> None:
        ws, self._ws = self._ws, None
        self.connected = False
        if ws is not None:
            try:
                ws.close()
            except Exception:
                pass

    def _count_drop(self, why: str, n: int = 1) -> None:
        with self._lock:
            self.dropped[why] = self.dropped.get(why, 0) + n
        self._warn_once(f"drop:{why}", "layerwatch: dropping data (%s); the run's record will have gaps", why)

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)
