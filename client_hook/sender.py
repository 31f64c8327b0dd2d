"""The sender thread: everything between the training thread and the server.

The training thread only ever calls `Sender.submit`: a length check and a
`deque.append` (atomic under the GIL; no lock, no wake-up call: this thread polls
every BATCH_WINDOW_S), so the training thread never waits on this one. This
thread turns queued items into wire frames (resolving the sample's single
device-to-host copy here, off the training thread), numbers them (per-run
`seq` from 0), encodes each once, sends them in batches over one websocket and
keeps every frame until the server acknowledges it, so a reconnect replays
exactly what was not committed.

While the server is away frames pile up: in memory up to `max_memory_bytes`
(their encoded size) and `max_pending` frames, then the oldest go to a bounded
on-disk spool (client_hook/spool.py), replayed first, in seq order, once the
server is back. Past the spool's cap the oldest histograms go first, the loss
last; every frame dropped is counted in `dropped` and reported to the server on
heartbeats and on run_end. The server being absent, refusing or slow never
reaches the training thread.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from client_hook import wire
from client_hook.spool import DROP_ORDER, Entry, Spool, default_spool_dir, encode

log = logging.getLogger("layerwatch")

BATCH_MAX_FRAMES = 256  # frames per websocket message: one server transaction each
BATCH_MAX_BYTES = wire.MAX_MESSAGE_BYTES // 4  # well under the server's message limit
BATCH_WINDOW_S = 0.05  # gather frames this long before sending, unless a batch is full
ACK_TIMEOUT_S = 10.0  # no ack by then: the connection is treated as broken and replayed
RECV_POLL_S = 0.25  # waiting for an ack, look this often whether close() gave up on us
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


def ingest_url(server: str) -> str:
    """http(s)://host:port[/prefix] -> ws(s)://host:port[/prefix]/ws/ingest."""
    parts = urlsplit(server if "://" in server else f"http://{server}")
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"server must be an http(s):// or ws(s):// URL, but got {server!r}")
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/ws/ingest", "", ""))


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


def open_ingest(url: str, token: str | None) -> Any:
    """A plain synchronous websocket to `url` (an /ws/ingest URL), the token as a Bearer header."""
    import inspect

    from websockets.sync.client import connect  # imported here: only the sender thread needs it

    # websockets >= 16 wants `legacy=True` to return a plain connection (no auto-reconnect:
    # replay after reconnect is ours, driven by acks).
    legacy = {"legacy": True} if "legacy" in inspect.signature(connect).parameters else {}
    return connect(
        url,
        additional_headers={"Authorization": f"Bearer {token}"} if token else None,
        open_timeout=2,
        close_timeout=1,
        compression=None,  # frames are small and the CPU is the training's
        max_size=wire.MAX_MESSAGE_BYTES,
        proxy=None,
        **legacy,
    )


def envelope(entries: list[Entry]) -> str:
    """`json.dumps(wire.batch(frames))` built from frames already encoded: no second encoding."""
    return f'{{"protocol": {wire.PROTOCOL_VERSION}, "frames": [{", ".join(e.text for e in entries)}]}}'


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
        self.url = ingest_url(server)
        self.run_id = run_id
        self._token = token
        self._on_alert = on_alert
        self._queue: deque[Item] = deque()
        self._last_drain = 0.0  # time.monotonic() of the latest drain
        self._max_queue = max_queue
        self._max_pending = max_pending
        self._max_memory_bytes = max_memory_bytes
        self._seq = itertools.count()
        self._pending: OrderedDict[int, Entry] = OrderedDict()  # seq -> encoded frame, in memory until acked
        self._pending_bytes = 0
        if spool_dir is None and spool_max_bytes:
            try:
                spool_dir = default_spool_dir()
            except OSError as exc:  # no private folder to be had: memory only, never an error in attach
                log.warning("layerwatch: no spool on disk for this run (%s); frames wait in memory only", exc)
                spool_max_bytes = 0
        # Where this run's frames go on disk (None: no spool, memory only).
        self.spool_path = Path(spool_dir) / run_id if spool_dir is not None else None
        self._spool = Spool(self.spool_path, spool_max_bytes, self._count_drops) if spool_max_bytes else None
        self._run_start: Entry | None = None  # re-sent first on every connection
        self._latest_step = 0
        self._heartbeat_s = float(heartbeat_s)
        self._next_heartbeat = time.monotonic() + self._heartbeat_s
        self._drops_reported: dict[str, int] = {}  # what the latest heartbeat or run_end said
        self._drops_reported_at = 0.0
        self._ws: Any = None
        self._closing = threading.Event()
        self._abandon = threading.Event()  # close() stopped waiting: keep what is left on disk and stop
        self._left: tuple[int, tuple[int, int] | None, bool] | None = None  # set by the thread when abandoning
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
            entries = _snapshot(self._pending)
            spooled = self._spool.frames if self._spool is not None else 0
            left = len(self._queue) + len(entries) + spooled
            spool_steps = self._spool.steps() if self._spool is not None and spooled else None
            all_steps = [e.step for e in entries] + (list(spool_steps) if spool_steps else [])
            steps = (min(all_steps), max(all_steps)) if all_steps else None
            on_disk = bool(spooled)
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
        return bool(self._pending) or (self._spool is not None and self._spool.frames > 0)

    def _delivered(self) -> bool:
        """Everything numbered is acknowledged and the server knows the latest drop counts."""
        with self._lock:
            drops_known = self.dropped == self._drops_reported or self._run_start is None
        return not self._queue and not self._unsent() and drops_known

    def _drain(self, window: float) -> bool:
        """Move queued items into `_pending` as numbered, encoded frames; True if any came.

        With a `window`, items are gathered until `window` s after the previous drain
        (or a full batch): at 1000 steps/s one batch per window, not one per ack round
        trip, each of which costs both sides ~50 us of CPU that training competes for.
        """
        if window > 0 and len(self._queue) < BATCH_MAX_FRAMES:
            wait = window if not self._queue else self._last_drain + window - time.monotonic()
            if wait > 0:
                self._closing.wait(wait)  # a poll, woken early only by close()
        self._last_drain = time.monotonic()
        items = []
        while self._queue and len(items) < BATCH_MAX_FRAMES:
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
        seq = next(self._seq)
        entry = encode(wire.frame(kind, run_id=self.run_id, seq=seq, step=step, **fields))
        if kind == "run_start":
            self._run_start = entry
            if self._spool is not None:
                self._spool.run_start = entry
        self._latest_step = max(self._latest_step, step)
        self._hold(entry)

    def _hold(self, entry: Entry) -> None:
        """Keep `entry` in memory; if it would not fit, make room first, so the caps hold at every moment."""
        if self._pending_bytes + entry.size > self._max_memory_bytes or len(self._pending) + 1 > self._max_pending:
            if not self._spill(entry):
                self._shed(entry)
            return
        self._pending[entry.seq] = entry
        self._pending_bytes += entry.size

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

    def _spill(self, incoming: Entry) -> bool:
        """Move the oldest frames (`incoming` counts as the newest) to the spool, down to half the caps.

        Half, not just under: fewer, larger writes while the server stays away.
        False, with nothing changed, when there is no spool to write to.
        """
        if self._spool is None or not self._spool.writable:
            return False
        spill, size, count = [], self._pending_bytes + incoming.size, len(self._pending) + 1
        for entry in itertools.chain(self._pending.values(), [incoming]):
            if size <= self._max_memory_bytes // 2 and count <= self._max_pending // 2:
                break
            spill.append(entry)
            size -= entry.size
            count -= 1
        try:
            self._spool.append(spill)
        except OSError as exc:
            log.warning(
                "layerwatch: cannot write the spool at %s (%s); frames beyond memory are dropped", self.spool_path, exc
            )
            return False
        with self._lock:
            for entry in spill:
                if self._pending.pop(entry.seq, None) is not None:
                    self._pending_bytes -= entry.size
            if not spill or spill[-1] is not incoming:
                self._pending[incoming.seq] = incoming
                self._pending_bytes += incoming.size
        return True

    def _shed(self, incoming: Entry) -> None:
        """Without a spool: drop the oldest frames, cheapest class first (`incoming` the newest), to 3/4 of the caps."""
        # Down to 3/4, not just under: each pass walks the whole buffer once per class.
        max_bytes, max_frames = self._max_memory_bytes * 3 // 4, self._max_pending * 3 // 4
        size, count, keep_incoming = self._pending_bytes + incoming.size, len(self._pending) + 1, True
        dropped: dict[str, int] = {}
        for cls in DROP_ORDER:
            victims = [e for e in self._pending.values() if e.cls == cls] + ([incoming] if incoming.cls == cls else [])
            for entry in victims:
                if size <= max_bytes and count <= max_frames:
                    break
                if entry is incoming:
                    keep_incoming = False
                else:
                    del self._pending[entry.seq]
                    self._pending_bytes -= entry.size
                size -= entry.size
                count -= 1
                dropped[cls] = dropped.get(cls, 0) + 1
        if keep_incoming:
            self._pending[incoming.seq] = incoming
            self._pending_bytes += incoming.size
        if dropped:
            self._count_drops(dropped, f"memory is full ({self._max_memory_bytes} bytes) and there is no spool")

    def _send_next(self) -> None:
        """Send one batch, the spool's oldest frames first, and settle what the server acknowledged."""
        from_spool = self._spool is not None and self._spool.frames > 0
        if from_spool:
            entries = self._spool.peek(BATCH_MAX_FRAMES, BATCH_MAX_BYTES)
            from_spool = bool(entries)
        if not from_spool:
            entries, size = [], 0
            for entry in itertools.islice(self._pending.values(), BATCH_MAX_FRAMES):
                if entries and size + entry.size > BATCH_MAX_BYTES:
                    break
                entries.append(entry)
                size += entry.size
        if entries:
            self._send_batch(entries)

    def _settle(self, seqs: list[int]) -> int:
        """Forget acknowledged (or rejected) frames wherever they are held; how many there were."""
        settled = 0
        with self._lock:
            for seq in seqs:
                entry = self._pending.pop(seq, None)
                if entry is not None:
                    self._pending_bytes -= entry.size
                    settled += 1
        if self._spool is not None:
            settled += self._spool.ack(seqs)
        return settled

    def _connect(self) -> bool:
        try:
            self._ws = open_ingest(self.url, self._token)
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
        self._ws.send(envelope(entries))
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while True:
            if self._abandon.is_set():
                raise ConnectionAbortedError("close() stopped waiting")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no ack within {ACK_TIMEOUT_S} s")
            try:
                message = json.loads(self._ws.recv(timeout=min(RECV_POLL_S, remaining)))
            except TimeoutError:
                continue
            kind = message.get("kind")
            if kind == "ack":
                settled = self._settle(message.get("seqs", {}).get(self.run_id, []))
                with self._lock:
                    self.acked += settled
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
                self._settle([e.seq for e in entries])
                self._count_drop("rejected", len(entries))
                raise ConnectionError(f"server rejected a batch: {message.get('error')}")
            self._warn_once(f"kind:{kind}", "layerwatch: ignoring a server message of kind %r", kind)

    def _finish(self) -> None:
        """Everything was delivered: the spool directory goes, and so does the connection."""
        if self._spool is not None:
            self._spool.remove()
        self._left = (0, None, False)

    def _keep_on_disk(self) -> None:
        """close() stopped waiting: move what is queued and in memory to the spool, note what is left."""
        try:
            while self._queue:
                self._drain(0.0)
            if self._spool is not None and self._spool.writable and self._pending:
                self._spool.append(list(self._pending.values()))
                self._pending.clear()
                self._pending_bytes = 0
        except Exception as exc:  # the disk failed too: what memory holds is lost with the process
            log.warning("layerwatch: could not write the undelivered frames to %s (%s)", self.spool_path, exc)
        spooled = self._spool.frames if self._spool is not None else 0
        spans = [(e.step, e.step) for e in self._pending.values()]
        if spooled and self._spool is not None and self._spool.steps() is not None:
            spans.append(self._spool.steps())
        steps = (min(a for a, _ in spans), max(b for _, b in spans)) if spans else None
        self._left = (len(self._pending) + spooled, steps, spooled > 0)

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


def _snapshot(pending: OrderedDict[int, Entry]) -> list[Entry]:
    """The entries of a buffer another thread may be changing: a retry or two, then whatever is known."""
    for _ in range(3):
        try:
            return list(pending.values())
        except RuntimeError:  # changed during iteration
            time.sleep(0.01)
    return []
