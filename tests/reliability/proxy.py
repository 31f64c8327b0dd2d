"""A TCP proxy that cuts connections at random points: the flaky network between client and server.

Each accepted connection is forwarded to the target by two pump threads (one
per direction). The first `cuts` connections each get a byte budget per
direction drawn from a seeded RNG; when either budget runs out the proxy
forwards exactly up to it (so the cut lands mid-websocket-frame, mid-batch or
mid-ack) and then closes both sides, with a FIN or, at random, a RST. Later
connections pass through untouched, so a run can always finish.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
from dataclasses import dataclass

CHUNK = 65536


@dataclass
class Cut:
    """One cut: which connection, in which direction the budget ran out, after how many bytes, how."""

    connection: int
    direction: str  # "up" (client -> server) or "down" (server -> client)
    after_bytes: int
    reset: bool


class FlakyProxy:
    """Listens on 127.0.0.1 (a free port); `url` is what the client should use instead of the server's."""

    def __init__(self, target_port: int, *, seed: int, cuts: int, max_up: int, max_down: int) -> None:
        self.target_port = target_port
        self._rng = random.Random(seed)
        self._cuts_left = cuts
        self._max_up, self._max_down = max_up, max_down
        self.cuts: list[Cut] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stopped = threading.Event()
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def close(self) -> None:
        self._stopped.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()  # the server is away: the client sees a refused handshake
                continue
            # Budgets drawn in accept order from one seeded RNG: the same run cuts at the same bytes.
            if self._cuts_left > 0:
                self._cuts_left -= 1
                budgets = {"up": self._rng.randint(1, self._max_up), "down": self._rng.randint(1, self._max_down)}
                reset = self._rng.random() < 0.5
            else:
                budgets, reset = {}, False
            Connection(self, self.connections, client, upstream, budgets, reset).start()
            self.connections += 1

    def _record(self, cut: Cut) -> None:
        with self._lock:
            self.cuts.append(cut)


class Connection:
    """One proxied connection: two pumps sharing one close."""

    def __init__(
        self,
        proxy: FlakyProxy,
        number: int,
        client: socket.socket,
        upstream: socket.socket,
        budgets: dict[str, int],
        reset: bool,
    ) -> None:
        self.proxy, self.number = proxy, number
        self.client, self.upstream = client, upstream
        self.budgets, self.reset = budgets, reset
        self._closed = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> None:
        for direction, src, dst in (("up", self.client, self.upstream), ("down", self.upstream, self.client)):
            threading.Thread(target=self._pump, args=(direction, src, dst), daemon=True).start()

    def _pump(self, direction: str, src: socket.socket, dst: socket.socket) -> None:
        sent = 0
        budget = self.budgets.get(direction)
        try:
            while not self._closed.is_set():
                data = src.recv(CHUNK)
                if not data:
                    break
                if budget is not None and sent + len(data) >= budget:
                    dst.sendall(data[: budget - sent])
                    self.proxy._record(Cut(self.number, direction, budget, self.reset))
                    self._close(abort=self.reset)
                    return
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass  # the other pump closed the sockets, or a peer went away
        self._close(abort=False)

    def _close(self, *, abort: bool) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            for sock in (self.client, self.upstream):
                try:
                    if abort:  # linger 0: close() sends a RST instead of a FIN
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    else:
                        sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
