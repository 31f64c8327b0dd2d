"""One websocket to the server's /ws/ingest: connect, send a batch, wait for its ack.

The one send-and-await-ack of the client, used by the sender thread (live, with
replay on reconnect) and by `layerwatch upload` (a finished run's spool). A
batch is `wire.batch` of frames already encoded once (`spool.encode`): the
envelope is built around their text, never re-encoded. The server answers a
batch with one `ack` naming the (run, seq) pairs it committed, or one `error`;
alerts raised by the batch may arrive before the ack.

Torch-free: the `layerwatch` command (upload) runs without torch.
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from client_hook import wire
from client_hook.sending.spool import Entry

BATCH_MAX_FRAMES = 256  # frames per websocket message: one server transaction each
BATCH_MAX_BYTES = wire.MAX_MESSAGE_BYTES // 4  # well under the server's message limit
RECV_POLL_S = 0.25  # while waiting for an ack, look this often whether the caller gave up


class Rejected(ConnectionError):
    """The server refused a batch (a schema or version mismatch): resending it would fail forever."""


class Retryable(ConnectionError):
    """The server could not store a batch for a passing reason of its own (storage full or locked):
    nothing of it was stored, and it is to be sent again later."""


def ingest_url(server: str) -> str:
    """http(s)://host:port[/prefix] -> ws(s)://host:port[/prefix]/ws/ingest."""
    parts = urlsplit(server if "://" in server else f"http://{server}")
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"server must be an http(s):// or ws(s):// URL, but got {server!r}")
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/ws/ingest", "", ""))


def open_ingest(url: str, token: str | None) -> Any:
    """A plain synchronous websocket to `url` (an /ws/ingest URL), the token as a Bearer header."""
    from websockets.sync.client import connect  # imported here: only a sending thread needs it

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


def batches(entries: Iterable[Entry]) -> Iterator[list[Entry]]:
    """`entries` cut into batches of at most BATCH_MAX_FRAMES frames and BATCH_MAX_BYTES (one frame at least)."""
    batch: list[Entry] = []
    size = 0
    for entry in entries:
        if batch and (len(batch) >= BATCH_MAX_FRAMES or size + entry.size > BATCH_MAX_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(entry)
        size += entry.size
    if batch:
        yield batch


def send_batch(
    ws: Any,
    entries: list[Entry],
    run_id: str,
    *,
    timeout: float,
    rank: int | None = None,
    on_alert: Callable[[dict[str, Any]], None] | None = None,
    stop: Callable[[], bool] | None = None,
    on_other: Callable[[str | None], None] | None = None,
    on_refused: Callable[[Entry, str], None] | None = None,
) -> list[int]:
    """Send one batch and wait for its ack: the seqs of `run_id` (of `rank`, for a rank > 0) the server committed.

    Frames the server refused (the ack's `refused`, by index in this batch) go to `on_refused`
    with the reason: they are not stored and will never be, so the caller settles them.

    Raises TimeoutError (no ack within `timeout` s), Rejected (the server's
    `error`), ConnectionAbortedError (`stop()` became true while waiting) or the
    websocket's own error when the connection fails. Alerts that arrive first
    go to `on_alert`; a message of another kind to `on_other`.
    """
    ws.send(envelope(entries))
    deadline = time.monotonic() + timeout
    while True:
        if stop is not None and stop():
            raise ConnectionAbortedError("the caller stopped waiting")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no ack within {timeout:g} s")
        try:
            message = json.loads(ws.recv(timeout=min(RECV_POLL_S, remaining)))
        except TimeoutError:
            continue
        kind = message.get("kind")
        if kind == "ack":
            for refusal in message.get("refused") or []:
                index = refusal.get("index") if isinstance(refusal, dict) else None
                if on_refused is not None and isinstance(index, int) and 0 <= index < len(entries):
                    on_refused(entries[index], str(refusal.get("error")))
            return wire.acked_seqs(message, run_id, rank)
        if kind == "error":
            if message.get("retry"):
                raise Retryable(str(message.get("error")))
            raise Rejected(str(message.get("error")))
        if kind == "alert":
            if on_alert is not None:
                on_alert(message.get("alert") or {})
        elif on_other is not None:
            on_other(kind)
