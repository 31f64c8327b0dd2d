"""The on-disk spool: numbered frames the sender cannot keep in memory while the server is away.

One directory per run holds append-only *segment* files of JSON lines: one frame
per line, encoded exactly as it goes on the wire, so a replay sends the stored
text without decoding it again. A segment is named by the first `seq` it holds
and segments are written in `seq` order, so replaying them oldest first keeps
the run's order. A segment is deleted once every frame in it is acknowledged.

Only the sender thread touches a spool (never the training thread): writes,
reads and the rewrites that drop frames cost that thread's time and the disk's.

The directory never holds more than `max_bytes`. When new frames would not fit,
the oldest frames of the cheapest kind go first (`DROP_ORDER`: histograms, then
layer_stats, then scalars without the loss ...), from the spool and then from
the frames being added; the loss, findings and the run's start and end go last.
Dropping rewrites a segment in place without those frames (never a temporary
copy beside it: that would overshoot the cap for a moment).

Reading tolerates a crash: a torn last line (a write cut short) and any line
that does not decode are skipped, and so is a line whose `seq` is not above the
previous one (what an interrupted in-place rewrite leaves behind).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

log = logging.getLogger("layerwatch")

# Drop classes, cheapest first: a frame's kind, except that scalars holding the loss
# are "loss". Histograms are the bulkiest and the easiest to do without; the loss
# curve, the findings and the run's start and end are what a run's record needs most.
DROP_ORDER: tuple[str, ...] = (
    "histograms",
    "layer_stats",
    "scalars",
    "heartbeat",
    "signals",
    "loss",
    "findings",
    "run_end",
    "run_start",
)
SEGMENT_MAX_BYTES = 4 * 2**20  # a drop rewrites one segment at a time: at most this much read and written
SEGMENT_MIN_BYTES = 4096
SEGMENTS_PER_CAP = 8  # segment size = cap / 8: dropping never rewrites more than an eighth of the spool at once
SUFFIX = ".jsonl"
# The run's run_start frame, kept beside the segments while the spool exists: a spool
# left behind by a finished process (`layerwatch upload`) can introduce its run to a
# server that never saw it, even when the run_start itself was acknowledged long ago.
RUN_START_FILE = "run_start.json"


def default_spool_dir() -> Path:
    """$LAYERWATCH_SPOOL_DIR, else this user's own spool folder (a run's spool is a folder inside).

    The default is private to the user: `$XDG_CACHE_HOME/layerwatch/spool` (else
    `~/.cache/...`; `%LOCALAPPDATA%` on Windows, `~/Library/Caches` on macOS), created
    with mode 0700, never a shared temp folder: `layerwatch upload` of the default
    folder deletes what it delivers, so it must only ever see this user's runs. Where the
    home folder cannot be written (a container's nobody user), it is a 0700 folder in
    the temp directory named for the user id, refused if another user owns it.
    """
    configured = os.environ.get("LAYERWATCH_SPOOL_DIR")
    if configured:
        return Path(configured)
    try:
        return _private_dir(_user_cache_dir() / "layerwatch" / "spool")
    except OSError:
        uid = os.getuid() if hasattr(os, "getuid") else os.getpid()
        return _private_dir(Path(tempfile.gettempdir()) / f"layerwatch-spool-{uid}")


def _user_cache_dir() -> Path:
    if os.name == "nt":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def _private_dir(path: Path) -> Path:
    """`path`, created 0700 if missing and tightened to 0700 if looser; OSError if another user owns it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if os.name != "nt":
        info = path.stat()
        if info.st_uid != os.getuid():
            raise PermissionError(f"spool folder {str(path)!r} belongs to another user (uid {info.st_uid})")
        if info.st_mode & 0o077:
            path.chmod(0o700)
    return path


class Entry(NamedTuple):
    """One numbered frame, encoded: what the sender holds in memory and the spool holds on disk."""

    seq: int
    step: int
    cls: str  # drop class (see DROP_ORDER)
    text: str  # the frame as JSON, one line

    @property
    def size(self) -> int:
        """Bytes on disk (the line and its newline); ASCII JSON, so characters are bytes."""
        return len(self.text) + 1


def drop_class(kind: str, frame: dict[str, Any]) -> str:
    """The frame's kind, or "loss" for a scalars frame that holds the loss."""
    if kind == "scalars" and "loss" in (frame.get("values") or {}):
        return "loss"
    return kind


def encode(frame: dict[str, Any]) -> Entry:
    """Encode a numbered frame once; its text is what is measured, spooled and sent."""
    # ensure_ascii (the default) keeps one character one byte; NaN/Infinity stay allowed (they are data).
    return Entry(frame["seq"], frame["step"], drop_class(frame["kind"], frame), json.dumps(frame))


def read_segment(path: Path) -> tuple[list[Entry], int]:
    """The frames of one segment file in seq order, and how many lines were skipped as unreadable."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    skipped = 1 if lines[-1] else 0  # text after the last newline: a torn write
    entries: list[Entry] = []
    last_seq = -1
    for raw in lines[:-1]:
        try:
            frame = json.loads(raw)
            entry = Entry(frame["seq"], frame["step"], drop_class(frame["kind"], frame), raw.decode("ascii"))
        except (ValueError, KeyError, TypeError, AttributeError):
            skipped += 1
            continue
        if not isinstance(entry.seq, int) or entry.seq <= last_seq:
            skipped += 1  # a duplicate left by an interrupted rewrite, or garbage
            continue
        entries.append(entry)
        last_seq = entry.seq
    return entries, skipped


class _Segment:
    """One segment file and what is known of it without reading it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.bytes = 0  # file size, acknowledged lines included until the file is rewritten or deleted
        self.counts: Counter[str] = Counter()  # unacknowledged frames per drop class
        self.steps: tuple[int, int] | None = None  # (lowest, highest) step written

    def add(self, entries: list[Entry]) -> None:
        self.bytes += sum(e.size for e in entries)
        self.counts.update(e.cls for e in entries)
        low, high = min(e.step for e in entries), max(e.step for e in entries)
        self.steps = (low, high) if self.steps is None else (min(self.steps[0], low), max(self.steps[1], high))

    def reset(self, entries: list[Entry]) -> None:
        self.bytes, self.counts, self.steps = 0, Counter(), None
        if entries:
            self.add(entries)


class Spool:
    """A bounded directory of segments for one run. Not thread-safe: the sender thread's alone."""

    def __init__(
        self, directory: Path, max_bytes: int, on_drop: Callable[[dict[str, int], str], None] | None = None
    ) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"spool max_bytes must be a positive integer, but got {max_bytes!r}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = min(max(max_bytes // SEGMENTS_PER_CAP, SEGMENT_MIN_BYTES), SEGMENT_MAX_BYTES)
        self.writable = True  # False after a write failed (disk full, permissions): replay only
        self._on_drop = on_drop
        self._segments: list[_Segment] = []  # oldest first; the last one takes appends
        self._head: list[Entry] | None = None  # the oldest segment's unacknowledged frames, once read
        self._head_pos = 0  # how many of `_head` are acknowledged
        self.run_start: Entry | None = None  # set by the sender; written as RUN_START_FILE with the first segment
        self._run_start_written = False

    # ------------------------------------------------------------ state

    @property
    def bytes(self) -> int:
        """Bytes the spool's files take on disk (the kept run_start once written included)."""
        start = self.run_start.size if self._run_start_written and self.run_start is not None else 0
        return sum(s.bytes for s in self._segments) + start

    @property
    def _room(self) -> int:
        """Bytes the segments may take: the cap less the run_start copy, written or about to be."""
        start = self.run_start.size if self.run_start is not None else 0
        return self.max_bytes - (start if start <= self.max_bytes else 0)

    @property
    def _segment_bytes(self) -> int:
        return sum(s.bytes for s in self._segments)

    @property
    def frames(self) -> int:
        """Frames written and not yet acknowledged."""
        return sum(sum(s.counts.values()) for s in self._segments)

    def steps(self) -> tuple[int, int] | None:
        """(lowest, highest) step of the frames on disk, or None when empty."""
        spans = [s.steps for s in self._segments if s.steps is not None and sum(s.counts.values())]
        return (min(a for a, _ in spans), max(b for _, b in spans)) if spans else None

    # ------------------------------------------------------------ writing

    def append(self, entries: list[Entry]) -> None:
        """Write `entries` (in seq order, newer than everything here), dropping to stay under the cap.

        Raises OSError when the disk fails; then nothing of `entries` was written
        and the spool accepts no more writes (`writable` is False).
        """
        if not self.writable:
            raise OSError(f"the spool at {self.directory} failed earlier; it no longer takes frames")
        entries = list(entries)
        need = sum(e.size for e in entries)
        if self._segment_bytes + need > self._room:
            entries = self._make_room(entries)
        if entries:
            self._write(entries)

    def _make_room(self, entries: list[Entry]) -> list[Entry]:
        """Drop the oldest frames, cheapest class first, until the spool plus `entries` fit; the kept entries."""
        dropped: Counter[str] = Counter()
        need = sum(e.size for e in entries)
        for cls in DROP_ORDER:
            for segment in list(self._segments):  # oldest first
                if self._segment_bytes + need <= self._room:
                    break
                if segment.counts[cls]:
                    dropped[cls] += self._rewrite_without(segment, cls)
            kept = []
            for entry in entries:  # then the incoming frames, oldest first
                if entry.cls == cls and self._segment_bytes + need > self._room:
                    need -= entry.size
                    dropped[cls] += 1
                else:
                    kept.append(entry)
            entries = kept
            if self._segment_bytes + need <= self._room:
                break
        if dropped and self._on_drop is not None:
            self._on_drop(dict(dropped), f"the spool at {self.directory} is full ({self.max_bytes} bytes)")
        return entries

    def _rewrite_without(self, segment: _Segment, cls: str) -> int:
        """Rewrite `segment` in place without its unacknowledged `cls` frames (and its acknowledged ones)."""
        entries = self._unacked(segment)
        kept = [e for e in entries if e.cls != cls]
        if not kept:
            self._delete(segment)
            return len(entries)
        data = "".join(e.text + "\n" for e in kept).encode("ascii")
        with open(segment.path, "r+b") as f:  # in place: the directory never holds a second copy
            f.write(data)
            f.truncate()
        segment.reset(kept)
        if segment is self._segments[0]:
            self._head, self._head_pos = kept, 0
        return len(entries) - len(kept)

    def _write(self, entries: list[Entry]) -> None:
        """Append to the newest segment, starting new ones at `segment_bytes`; all or nothing."""
        touched: list[tuple[_Segment, int, bool]] = []  # (segment, size before, created here)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            if self.run_start is not None and not self._run_start_written and self.run_start.size <= self.max_bytes:
                (self.directory / RUN_START_FILE).write_text(self.run_start.text + "\n", encoding="ascii")
                self._run_start_written = True
            start = 0
            while start < len(entries):
                segment = self._segments[-1] if self._segments else None
                created = segment is None or segment.bytes >= self.segment_bytes
                if created:
                    segment = _Segment(self.directory / f"{entries[start].seq:012d}{SUFFIX}")
                    self._segments.append(segment)
                touched.append((segment, segment.bytes, created))
                room, end = self.segment_bytes - segment.bytes, start + 1
                used = entries[start].size
                while end < len(entries) and used + entries[end].size <= room:
                    used += entries[end].size
                    end += 1
                chunk = entries[start:end]
                with open(segment.path, "ab") as f:
                    f.write("".join(e.text + "\n" for e in chunk).encode("ascii"))
                segment.add(chunk)
                if segment is self._segments[0] and self._head is not None:
                    self._head.extend(chunk)
                start = end
        except OSError:
            self.writable = False
            self._undo(touched)
            raise

    def _undo(self, touched: list[tuple[_Segment, int, bool]]) -> None:
        """Best effort: put the touched segments back as they were before a failed write."""
        for segment, size, created in reversed(touched):
            try:
                if created:
                    segment.path.unlink(missing_ok=True)
                else:
                    os.truncate(segment.path, size)
            except OSError:
                pass
            if created and segment in self._segments:
                self._segments.remove(segment)
        self._head, self._head_pos = None, 0  # read the head again from what is on disk
        for segment in self._segments:
            self._recount(segment)

    # ------------------------------------------------------------ replaying

    def peek(self, max_frames: int, max_bytes: int) -> list[Entry]:
        """The oldest unacknowledged frames (at least one if any), from one segment, in seq order."""
        while self._segments:
            entries = self._unacked(self._segments[0])
            if entries:
                batch, size = [], 0
                for entry in entries[:max_frames]:
                    if batch and size + entry.size > max_bytes:
                        break
                    batch.append(entry)
                    size += entry.size
                return batch
            self._delete(self._segments[0])  # nothing readable left in it
        return []

    def ack(self, seqs: Iterable[int]) -> int:
        """Mark frames acknowledged (the oldest ones, as `peek` gave them); delete finished segments.

        Returns how many frames of the spool that settled.
        """
        acked = set(seqs)
        if not self._segments or self._head is None:
            return 0
        head, before = self._segments[0], self._head_pos
        while self._head_pos < len(self._head) and self._head[self._head_pos].seq in acked:
            head.counts[self._head[self._head_pos].cls] -= 1
            self._head_pos += 1
        settled = self._head_pos - before
        if self._head_pos == len(self._head):
            self._delete(head)
        return settled

    def remove(self) -> None:
        """Delete the run's spool directory: called once everything in it was acknowledged."""
        for segment in list(self._segments):
            self._delete(segment)
        if self._run_start_written:
            (self.directory / RUN_START_FILE).unlink(missing_ok=True)
            self._run_start_written = False
        try:
            self.directory.rmdir()  # only if empty: never delete what this spool did not write
        except OSError:
            pass

    # ------------------------------------------------------------ internals

    def _unacked(self, segment: _Segment) -> list[Entry]:
        """The segment's unacknowledged frames; the oldest segment's are cached while it is replayed."""
        if segment is self._segments[0]:
            if self._head is None:
                self._head, self._head_pos = self._read(segment), 0
            return self._head[self._head_pos :]
        return self._read(segment)

    def _read(self, segment: _Segment) -> list[Entry]:
        try:
            entries, skipped = read_segment(segment.path)
        except OSError as exc:
            entries, skipped = [], sum(segment.counts.values())
            log.warning("layerwatch: cannot read spool segment %s (%s); its frames are lost", segment.path, exc)
        if skipped and self._on_drop is not None:
            self._on_drop({"spool_unreadable": skipped}, f"unreadable lines in {segment.path}")
        segment.reset(entries)
        segment.bytes = _size(segment.path)
        return entries

    def _recount(self, segment: _Segment) -> None:
        try:
            entries, _ = read_segment(segment.path)
        except OSError:
            entries = []
        segment.reset(entries)
        segment.bytes = _size(segment.path)

    def _delete(self, segment: _Segment) -> None:
        try:
            segment.path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("layerwatch: cannot delete spool segment %s (%s)", segment.path, exc)
        if self._segments and segment is self._segments[0]:
            self._head, self._head_pos = None, 0
        self._segments.remove(segment)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
