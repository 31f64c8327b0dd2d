"""The sender thread: everything between the training thread and the server.

The training thread only ever calls `Sender.submit`: a length check and a
`deque.append` (atomic under the GIL; no lock, no wake-up call: this thread polls
every BATCH_WINDOW_S), so the training thread never waits on this one. This
thread turns queued items into wire frames (resolving the sample's single
device-to-host copy here, off the training thread), numbers them (per-run
`seq` from 0), encodes each once, sends them in batches over one websocket and
keeps every frame until the server acknowledges it, so a reconnect replays
exactly what was not committed.

While the server is away frames pile up in `pending.Pending` (memory up to its
caps, then the bounded on-disk spool, replayed first once the server is back;
past the spool's cap the oldest histograms go first, the loss last); every frame
dropped is counted in `dropped` and reported to the server on heartbeats and on
run_end. The server being absent, refusing or slow never reaches the training
thread. The chain, one job each (as TensorBoard's writer): this file (the queue,
numbering, heartbeats and the thread loop) -> `pending.py` (what waits for an
ack: caps, spill, shed) -> `transport.py` (one websocket: send a batch, await
its ack; shared with `layerwatch upload`).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from client_hook import wire
from client_hook.sending import transport
from client_hook.sending.pending import Left, Pending
from client_hook.sending.spool import Entry, Spool, default_spool_dir, encode

log = logging.getLogger("layerwatch")

BATCH_WINDOW_S = 0.05  # gather frames this long before sending, unless a batch is full
ACK_TIMEOUT_S = 10.0  # no ack by then: the connection is treated as broken and replayed
RECONNECT_MIN_S, RECONNECT_MAX_S = 0.25, 5.0
DEFAULT_MEMORY_BYTES = 64 * 2**20  # encoded frames held in memory before the oldest go to disk
DEFAULT_SPOOL_BYTES = 512 * 2**20  # on-disk cap per run; 0 disables the spool
DROPS_REPORT_MIN_S = 1.0  # a changed drop count is reported by a heartbeat at most this often
ABANDON_WAIT_S = 2.5  # after close()'s timeout: time to move memory to the spool (covers a 2 s connect)


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


def check_limits(**limits: Any) -> None:
    """ValueError naming the bad value for any of the Sender's size and time limits given."""
    for name, value in limits.items():
        if name == "heartbeat_s":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"heartbeat_s must be a positive number of seconds, but got {value!r}")
            continue
        low = 0 if name == "spool_max_bytes" else 1  # 0 bytes of spool: no spool
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, but got {value!r}")


class Sender:
    """A daemon thread that delivers one run's frames, at least once, in order."""

    def __init__(
        self,
        *,
        server: str,
        run_id: str,
        rank: int | None = None,
        token: str | None = None,
        on_alert: Callable[[dict[str, Any]], None] | None = None,
        max_queue: int = 10_000,
        max_pending: int = 100_000,
        max_memory_bytes: int = DEFAULT_MEMORY_BYTES,
        spool_dir: str | Path | None = None,
        spool_max_bytes: int = DEFAULT_SPOOL_BYTES,
        heartbeat_s: float = wire.HEARTBEAT_S,
    ) -> None:
        check_limits(
            max_queue=max_queue,
            max_pending=max_pending,
            max_memory_bytes=max_memory_bytes,
            spool_max_bytes=spool_max_bytes,
            heartbeat_s=heartbeat_s,
        )
        self.url = transport.ingest_url(server)
        self.run_id = run_id
        # A process of a distributed training: its frames carry its rank and are numbered in its own seq space.
        self.rank = rank
        self._token = token
        self._on_alert = on_alert
        self._queue: deque[Item] = deque()
        self._last_drain = 0.0  # time.monotonic() of the latest drain
        self._max_queue = max_queue
        self._seq = itertools.count()
        if spool_dir is None and spool_max_bytes:
            try:
                spool_dir = default_spool_dir()
            except OSError as exc:  # no private folder to be had: memory only, never an error in attach
                log.warning("layerwatch: no spool on disk for this run (%s); frames wait in memory only", exc)
                spool_max_bytes = 0
        # Where this run's frames go on disk (None: no spool, memory only); the ranks > 0 of one
        # distributed run (often on one host, one spool folder) each in a folder of their own.
        folder = f"{run_id}.rank{rank}" if rank else run_id
        self.spool_path = Path(spool_dir) / folder if spool_dir is not None else None
        spool = Spool(self.spool_path, spool_max_bytes, self._count_drops) if spool_max_bytes else None
        # What waits for an ack: memory up to the caps, then the spool, then shed.
        self.pending = Pending(
            max_frames=max_pending, max_memory_bytes=max_memory_bytes, spool=spool, on_drop=self._count_drops
        )
        self._run_start: Entry | None = None  # re-sent first on every connection
        self._latest_step = 0
        self._heartbeat_s = float(heartbeat_s)
        self._next_heartbeat = time.monotonic() + self._heartbeat_s
        self._drops_reported: dict[str, int] = {}  # what the latest heartbeat or run_end said
        self._drops_reported_at = 0.0
        self._ws: Any = None
        self._closing = threading.Event()
        self._abandon = threading.Event()  # close() stopped waiting: keep what is left on disk and stop
        self._left: Left | None = None  # set by the thread when it stops
        self._lock = threading.Lock()  # guards the counters read by close() and status()
        self.acked = 0
        self.dropped: dict[str, int] = {}
        self.connected = False
        self._warned: set[str] = set()
        self._alerts_seen: set[tuple[str, str | None, str]] = set()
        self._pid = os.getpid()  # a forked child (a DataLoader worker) shares the socket but not this thread
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
        """Deliver everything (memory and spool), waiting at most `timeout` s; return frames left undelivered.

        Frames still undelivered then are written to the spool (as far as its cap
        allows) and stay there; one warning says how many, which steps, and where.
        """
        if os.getpid() != self._pid:
            return 0  # a forked child: the parent's run and socket are the parent's to close
        self._closing.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._abandon.set()
            self._thread.join(ABANDON_WAIT_S)
        if self._left is not None:
            left, steps, on_disk = self._left
        else:  # the thread is stuck (a hanging connect): what it holds, read without it
            left, steps, on_disk = self.pending.left()
            left += len(self._queue)
        if left:
            where = f" (steps {steps[0]}..{steps[1]})" if steps else ""
            fate = f"they stay in the spool directory at {self.spool_path}" if on_disk else "they are lost"
            log.warning(
                "layerwatch: %d frame(s)%s not acknowledged by %s within %.1f s; %s",
                left,
                where,
                self.url,
                timeout,
                fate,
            )
        self._disconnect()
        return left

    # ------------------------------------------------------------ sender thread

    def _run(self) -> None:
        backoff = RECONNECT_MIN_S
        next_try = 0.0
        while True:
            if self._abandon.is_set():
                self._keep_on_disk()
                return
            busy = self._ws is not None and self._unsent()
            self._drain(0.0 if busy else BATCH_WINDOW_S)
            self._heartbeat_if_due()
            if self._closing.is_set() and self._delivered():
                self._finish()
                return
            if self._ws is None and time.monotonic() >= next_try:
                if self._connect():
                    backoff = RECONNECT_MIN_S
                else:
                    next_try = time.monotonic() + backoff
                    backoff = min(backoff * 2, RECONNECT_MAX_S)
            if self._ws is not None and self._unsent():
                try:
                    self._send_next()
                except transport.Retryable as exc:  # the server's storage failed: kept, sent again later
                    self._warn_once(
                        "retry",
                        "layerwatch: server %s could not store data for now (%s); it is kept and sent again",
                        self.url,
                        exc,
                    )
                    self._disconnect()
                    next_try = time.monotonic() + backoff  # not at once: its storage needs time
                    backoff = min(backoff * 2, RECONNECT_MAX_S)
                except Exception as exc:  # connection dropped mid-batch: replay after reconnect
                    if not self._abandon.is_set():
                        self._warn_once(
                            f"lost:{type(exc).__name__}",
                            "layerwatch: connection to %s lost (%s); will replay",
                            self.url,
                            exc,
                        )
                    self._disconnect()
            elif self._closing.is_set():
                time.sleep(0.05)  # waiting for a server (or a heartbeat's turn) while close() waits for us

    def _unsent(self) -> bool:
        return self.pending.unsent()

    def _delivered(self) -> bool:
        """Everything numbered is acknowledged and the server knows the latest drop counts."""
        with self._lock:
            drops_known = self.dropped == self._drops_reported or self._run_start is None
        return not self._queue and not self._unsent() and drops_known

    def _drain(self, window: float) -> bool:
        """Move queued items into `pending` as numbered, encoded frames; True if any came.

        With a `window`, items are gathered until `window` s after the previous drain
        (or a full batch): at 1000 steps/s one batch per window, not one per ack round
        trip, each of which costs both sides ~50 us of CPU that training competes for.
        """
        if window > 0 and len(self._queue) < transport.BATCH_MAX_FRAMES:
            wait = window if not self._queue else self._last_drain + window - time.monotonic()
            if wait > 0:
                self._closing.wait(wait)  # a poll, woken early only by close()
        self._last_drain = time.monotonic()
        items = []
        while self._queue and len(items) < transport.BATCH_MAX_FRAMES:
            items.append(self._queue.popleft())
        if not items:
            return False
        for item in items:
            started = time.perf_counter()
            try:
                produced = item.frames()
            except Exception as exc:  # a bad sample must not stop the thread
                self._warn_once(
                    f"item:{type(exc).__name__}", "layerwatch: could not encode a sample (%s); skipped", exc
                )
                continue
            for kind, step, fields in produced:
                if kind == "run_end":
                    fields = self._with_drops(fields)
                self._number(kind, step, fields)
            # An item that wants to know what it cost this thread (a sample, for the adaptive budget).
            on_encoded = getattr(item, "on_encoded", None)
            if on_encoded is not None:
                on_encoded(time.perf_counter() - started)
        return True

    def _number(self, kind: str, step: int, fields: dict[str, Any]) -> None:
        """Give a frame the run's next seq, encode it once and hold it until acked."""
        fields, fixed = wire.fit_names(kind, fields)
        if fixed:
            old, new = fixed[0]
            self._warn_once(
                "names",
                "layerwatch: a name the server cannot take (empty, or over %d characters) is sent as a valid one: "
                "%r as %r (the same way every time; later ones are fitted without a word)",
                wire.MAX_NAME_LEN,
                old if len(old) <= 80 else old[:77] + "...",
                new if len(new) <= 80 else new[:40] + "..." + new[-20:],
            )
        seq = next(self._seq)
        entry = encode(wire.frame(kind, run_id=self.run_id, seq=seq, step=step, rank=self.rank, **fields))
        if kind == "run_start":
            self._run_start = entry
            if self.pending.spool is not None:
                self.pending.spool.run_start = entry
        self._latest_step = max(self._latest_step, step)
        self.pending.hold(entry)

    def _with_drops(self, fields: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            drops = dict(self.dropped)
        self._drops_reported, self._drops_reported_at = drops, time.monotonic()
        return {**fields, "dropped": drops} if drops else fields

    def _heartbeat_if_due(self) -> None:
        """Every `heartbeat_s` while connected, and soon after the drop counts change, say we are alive."""
        if self._ws is None or self._run_start is None:
            return  # undeliverable now: frames replayed later revive the run themselves
        now = time.monotonic()
        with self._lock:
            drops_changed = self.dropped != self._drops_reported
        due = now >= self._next_heartbeat and not self._closing.is_set()
        if due or (drops_changed and now >= self._drops_reported_at + DROPS_REPORT_MIN_S):
            self._next_heartbeat = now + self._heartbeat_s
            self._number("heartbeat", self._latest_step, self._with_drops({"time": time.time()}))

    def _send_next(self) -> None:
        """Send one batch, the oldest frames first, and settle what the server acknowledged."""
        entries = self.pending.next_batch()
        if entries:
            self._send_batch(entries)

    def _connect(self) -> bool:
        try:
            self._ws = transport.open_ingest(self.url, self._token)
        except Exception as exc:
            self._warn_once(
                "connect", "layerwatch: server %s not reachable (%s); training goes on, data is kept", self.url, exc
            )
            self._ws = None
            return False
        if self._run_start is not None:
            # The server may have lost the run (a new database), or the run_start waits in
            # the spool behind other frames: say who we are first. A stored (run, seq) is ignored.
            try:
                self._send_batch([self._run_start])
            except Exception as exc:
                self._warn_once("hello", "layerwatch: server %s refused the run (%s)", self.url, exc)
                self._disconnect()
                return False
        self.connected = True
        log.info("layerwatch: connected to %s", self.url)
        return True

    def _send_batch(self, entries: list[Entry]) -> None:
        """Send one batch and wait for its ack (or rejection); raises when the connection fails."""
        try:
            acked = transport.send_batch(
                self._ws,
                entries,
                self.run_id,
                timeout=ACK_TIMEOUT_S,
                rank=self.rank,
                on_alert=self._alert,
                stop=self._abandon.is_set,
                on_other=lambda kind: self._warn_once(
                    f"kind:{kind}", "layerwatch: ignoring a server message of kind %r", kind
                ),
                on_refused=self._refused,
            )
        except transport.Rejected as exc:
            # Resending it would fail forever, so the batch is dropped and said once (the first reason).
            self._warn_once("rejected", "layerwatch: server rejected data: %s", exc)
            self.pending.settle([e.seq for e in entries])
            self._count_drop("rejected", len(entries))
            raise
        settled = self.pending.settle(acked)
        with self._lock:
            self.acked += settled

    def _refused(self, entry: Entry, error: str) -> None:
        """One frame the server refused (the rest of its batch was stored): it never will be; said once."""
        self.pending.settle([entry.seq])
        self._count_drop("refused")
        self._warn_once("refused", "layerwatch: the server refused a frame (%s); the rest of the run goes on", error)

    def _finish(self) -> None:
        """Everything was delivered: the spool directory goes, and so does the connection."""
        self.pending.remove_spool()
        self._left = (0, None, False)

    def _keep_on_disk(self) -> None:
        """close() stopped waiting: move what is queued and in memory to the spool, note what is left."""
        try:
            while self._queue:
                self._drain(0.0)
        except Exception as exc:
            log.warning("layerwatch: could not encode the frames still queued (%s)", exc)
        self._left = self.pending.keep_on_disk()

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

    def _count_drops(self, counts: dict[str, int], why: str) -> None:
        """Count dropped frames by class; the first time, one warning names what and how many."""
        with self._lock:
            for cls, n in counts.items():
                self.dropped[cls] = self.dropped.get(cls, 0) + n
        what = ", ".join(f"{n} {cls}" for cls, n in counts.items())
        self._warn_once(
            "drop:frames",
            "layerwatch: %s: dropped the oldest frames (%s), cheapest first; the run's record will have gaps "
            "(later drops are counted in status()['dropped'] and reported to the server)",
            why,
            what,
        )

    def _count_drop(self, why: str, n: int = 1) -> None:
        with self._lock:
            self.dropped[why] = self.dropped.get(why, 0) + n
        self._warn_once(f"drop:{why}", "layerwatch: dropping data (%s); the run's record will have gaps", why)

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)
