"""The frames numbered but not yet acknowledged: in memory up to the caps, then on disk, then shed.

Held in seq order, each frame encoded once (`spool.Entry`). Two caps bound
memory at every moment: `max_memory_bytes` (encoded size) and `max_frames`.
A frame that would break them first pushes the oldest ones to the on-disk
spool (down to half the caps: fewer, larger writes while the server stays
away); without a spool, or once it cannot be written, the oldest frames are
shed instead, the cheapest class first (`spool.DROP_ORDER`: histograms before
the loss), and counted through `on_drop`. The next batch to send comes from
the spool first (its frames are the older), then from memory.

Used by the sender thread only; `close()` on the training thread reads it
through `snapshot` when that thread is stuck.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from client_hook.sending.spool import DROP_ORDER, Entry, Spool
from client_hook.sending.transport import BATCH_MAX_BYTES, BATCH_MAX_FRAMES, batches

log = logging.getLogger("layerwatch")

# (frames left, (lowest step, highest step) or None, whether any are on disk)
Left = tuple[int, tuple[int, int] | None, bool]


class Pending:
    """Unacknowledged frames of one run, bounded in memory, overflowing to a spool."""

    def __init__(
        self,
        *,
        max_frames: int,
        max_memory_bytes: int,
        spool: Spool | None,
        on_drop: Callable[[dict[str, int], str], None],
    ) -> None:
        self.max_frames = max_frames
        self.max_memory_bytes = max_memory_bytes
        self.spool = spool
        self._on_drop = on_drop
        self._memory: OrderedDict[int, Entry] = OrderedDict()  # seq -> encoded frame
        self.bytes = 0  # encoded size of what memory holds
        self._lock = threading.Lock()  # settle/spill against a snapshot from close()

    @property
    def spool_path(self) -> Path | None:
        return self.spool.directory if self.spool is not None else None

    def in_memory(self) -> list[Entry]:
        """The frames memory holds now, oldest first."""
        return snapshot(self._memory)

    def unsent(self) -> bool:
        return bool(self._memory) or (self.spool is not None and self.spool.frames > 0)

    def hold(self, entry: Entry) -> None:
        """Keep `entry`; if it would not fit, make room first, so the caps hold at every moment."""
        if self.bytes + entry.size > self.max_memory_bytes or len(self._memory) + 1 > self.max_frames:
            if not self._spill(entry):
                self._shed(entry)
            return
        self._memory[entry.seq] = entry
        self.bytes += entry.size

    def next_batch(self) -> list[Entry]:
        """The oldest unacknowledged frames, one batch's worth: the spool's first."""
        if self.spool is not None and self.spool.frames > 0:
            entries = self.spool.peek(BATCH_MAX_FRAMES, BATCH_MAX_BYTES)
            if entries:
                return entries
        return next(batches(itertools.islice(self._memory.values(), BATCH_MAX_FRAMES)), [])

    def settle(self, seqs: list[int]) -> int:
        """Forget acknowledged (or rejected) frames wherever they are held; how many there were."""
        settled = 0
        with self._lock:
            for seq in seqs:
                entry = self._memory.pop(seq, None)
                if entry is not None:
                    self.bytes -= entry.size
                    settled += 1
        if self.spool is not None:
            settled += self.spool.ack(seqs)
        return settled

    def keep_on_disk(self) -> Left:
        """Move what memory holds to the spool (as far as it can); what is left undelivered, and where."""
        try:
            if self.spool is not None and self.spool.writable and self._memory:
                self.spool.append(list(self._memory.values()))
                with self._lock:
                    self._memory.clear()
                    self.bytes = 0
        except Exception as exc:  # the disk failed too: what memory holds is lost with the process
            log.warning("layerwatch: could not write the undelivered frames to %s (%s)", self.spool_path, exc)
        return self.left()

    def left(self) -> Left:
        """How many frames are undelivered, their steps, and whether any are on disk (safe from any thread)."""
        entries = snapshot(self._memory)
        spooled = self.spool.frames if self.spool is not None else 0
        spans = [(e.step, e.step) for e in entries]
        spool_steps = self.spool.steps() if self.spool is not None and spooled else None
        if spool_steps is not None:
            spans.append(spool_steps)
        steps = (min(a for a, _ in spans), max(b for _, b in spans)) if spans else None
        return len(entries) + spooled, steps, spooled > 0

    def remove_spool(self) -> None:
        """Everything was delivered: the run's spool folder goes."""
        if self.spool is not None:
            self.spool.remove()

    def _spill(self, incoming: Entry) -> bool:
        """Move the oldest frames (`incoming` counts as the newest) to the spool, down to half the caps.

        False, with nothing changed, when there is no spool to write to.
        """
        if self.spool is None or not self.spool.writable:
            return False
        spill, size, count = [], self.bytes + incoming.size, len(self._memory) + 1
        for entry in itertools.chain(self._memory.values(), [incoming]):
            if size <= self.max_memory_bytes // 2 and count <= self.max_frames // 2:
                break
            spill.append(entry)
            size -= entry.size
            count -= 1
        try:
            self.spool.append(spill)
        except OSError as exc:
            log.warning(
                "layerwatch: cannot write the spool at %s (%s); frames beyond memory are dropped", self.spool_path, exc
            )
            return False
        with self._lock:
            for entry in spill:
                if self._memory.pop(entry.seq, None) is not None:
                    self.bytes -= entry.size
            if not spill or spill[-1] is not incoming:
                self._memory[incoming.seq] = incoming
                self.bytes += incoming.size
        return True

    def _shed(self, incoming: Entry) -> None:
        """Without a spool: drop the oldest frames, cheapest class first (`incoming` the newest), to 3/4 of the caps."""
        # Down to 3/4, not just under: each pass walks the whole buffer once per class.
        max_bytes, max_frames = self.max_memory_bytes * 3 // 4, self.max_frames * 3 // 4
        size, count, keep_incoming = self.bytes + incoming.size, len(self._memory) + 1, True
        dropped: dict[str, int] = {}
        with self._lock:
            for cls in DROP_ORDER:
                victims = [e for e in self._memory.values() if e.cls == cls]
                victims += [incoming] if incoming.cls == cls else []
                for entry in victims:
                    if size <= max_bytes and count <= max_frames:
                        break
                    if entry is incoming:
                        keep_incoming = False
                    else:
                        del self._memory[entry.seq]
                        self.bytes -= entry.size
                    size -= entry.size
                    count -= 1
                    dropped[cls] = dropped.get(cls, 0) + 1
            if keep_incoming:
                self._memory[incoming.seq] = incoming
                self.bytes += incoming.size
        if dropped:
            self._on_drop(dropped, f"memory is full ({self.max_memory_bytes} bytes) and there is no spool")


def snapshot(memory: OrderedDict[int, Entry]) -> list[Entry]:
    """The entries of a buffer another thread may be changing: a retry or two, then whatever is known."""
    for _ in range(3):
        try:
            return list(memory.values())
        except RuntimeError:  # changed during iteration
            time.sleep(0.01)
    return []
