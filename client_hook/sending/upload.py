"""`layerwatch upload`: deliver what a finished training left in its spool.

When `close()` gives up waiting for a server that is away, the frames it could
not deliver stay on disk (`<spool_dir>/<run_id>/`, see client_hook/sending/spool.py).
This sends them later, exactly as the sender would have: the run's `run_start`
first (kept beside the segments), then every frame in `seq` order, in batches,
each acknowledged before the next. The server stores each (run, seq) once, so
an upload that is cut off can simply be run again. A run's folder is deleted
only when every frame in it was acknowledged.

Torch-free (the `layerwatch` command runs without torch): only the spool
reader, the wire schema and the transport (the sender thread's own send-and-await-ack).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from client_hook.sending import transport
from client_hook.sending.spool import RUN_START_FILE, SUFFIX, Entry, read_segment

ACK_TIMEOUT_S = 60.0  # a large batch on a busy server; no ack by then is a failure


class UploadError(Exception):
    """A run could not be delivered; the message says which and why. Its files are kept."""


@dataclass
class Uploaded:
    run_id: str
    directory: Path
    frames: int  # frames sent and acknowledged (the run_start included)
    steps: tuple[int, int] | None  # the lowest and highest step among them
    skipped: int  # unreadable lines (a torn write) left out
    refused: list[str] = field(default_factory=list)  # why the server refused frames (the rest stored)


def run_folders(path: Path) -> list[Path]:
    """The run folders at `path`: `path` itself if it holds segments, else its subfolders that do."""
    if not path.is_dir():
        raise UploadError(f"{str(path)!r} is not a folder: give a spool folder or one run's folder inside it")
    if _is_run_folder(path):
        return [path]
    return sorted(p for p in path.iterdir() if p.is_dir() and _is_run_folder(p))


def _is_run_folder(path: Path) -> bool:
    return any(path.glob(f"*{SUFFIX}")) or (path / RUN_START_FILE).is_file()


def read_run(directory: Path) -> tuple[list[Entry], int]:
    """Every frame in a run's folder in seq order (run_start first, once), and the unreadable line count."""
    entries: dict[int, Entry] = {}
    skipped = 0
    start = directory / RUN_START_FILE
    if start.is_file():
        found, bad = read_segment(start)
        entries.update((e.seq, e) for e in found)
        skipped += bad
    for segment in sorted(directory.glob(f"*{SUFFIX}")):
        found, bad = read_segment(segment)
        entries.update((e.seq, e) for e in found)
        skipped += bad
    ordered = [entries[seq] for seq in sorted(entries)]
    # The server needs to know the run before anything else of it: run_start goes first.
    ordered.sort(key=lambda e: e.cls != "run_start")
    return ordered, skipped


def upload_run(directory: Path, *, server: str, token: str | None = None) -> Uploaded:
    """Send one run's spooled frames and delete its folder once all are acknowledged."""
    entries, skipped = read_run(directory)
    if not entries:
        raise UploadError(f"{str(directory)!r} holds no readable frames")
    run_ids = {json.loads(e.text)["run_id"] for e in entries}
    if len(run_ids) != 1:
        raise UploadError(f"{str(directory)!r} mixes frames of several runs: {sorted(run_ids)}")
    run_id = run_ids.pop()
    ranks = {json.loads(e.text).get("rank") or 0 for e in entries}  # a rank > 0 of a DDP run spools apart
    if len(ranks) != 1:
        raise UploadError(f"{str(directory)!r} mixes frames of several ranks: {sorted(ranks)}")
    rank = ranks.pop()
    url = transport.ingest_url(server)
    try:
        ws = transport.open_ingest(url, token)
    except Exception as exc:
        raise UploadError(f"cannot reach {url} ({exc}); the frames stay in {str(directory)!r}") from None
    refused: list[str] = []
    try:
        for batch in transport.batches(entries):
            refused += _deliver(ws, batch, run_id, url, rank)
    finally:
        ws.close()
    for path in [*directory.glob(f"*{SUFFIX}"), directory / RUN_START_FILE]:
        path.unlink(missing_ok=True)
    try:
        directory.rmdir()  # only if empty: never delete what the spool did not write
    except OSError:
        pass
    steps = [e.step for e in entries]
    return Uploaded(run_id, directory, len(entries) - len(refused), (min(steps), max(steps)), skipped, refused)


def _deliver(ws: object, batch: list[Entry], run_id: str, url: str, rank: int = 0) -> list[str]:
    """Send one batch; return once every frame of it is acknowledged or refused (alerts on the way are
    skipped): the reasons of the refused ones, whose frames the server will never take."""
    refused: dict[int, str] = {}
    try:
        acked = transport.send_batch(
            ws,
            batch,
            run_id,
            timeout=ACK_TIMEOUT_S,
            rank=rank,
            on_refused=lambda entry, error: refused.__setitem__(entry.seq, error),
        )
    except TimeoutError:
        raise UploadError(f"{url} sent no ack for run {run_id!r} within {ACK_TIMEOUT_S:g} s") from None
    except transport.Rejected as exc:
        raise UploadError(f"{url} refused run {run_id!r}: {exc}") from None
    except Exception as exc:
        raise UploadError(f"the connection to {url} failed while sending run {run_id!r} ({exc})") from None
    missing = {e.seq for e in batch} - set(acked) - set(refused)
    if missing:
        raise UploadError(f"{url} did not acknowledge {len(missing)} frame(s) of run {run_id!r}")
    return list(refused.values())
