"""Servers the reliability tests can hurt: a `layerwatch serve` process that can be SIGKILLed
and restarted on the same port and database, and a uvicorn server in a thread for settings the
CLI does not expose (a small message limit).

Both listen on real loopback sockets; nothing here stands in for the server's own code.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import uvicorn

from layerwatch.server.main import create_app
from layerwatch.server.settings import Settings
from tests.serving import free_port, wait_until_up


class ServerProcess:
    """`python -m server serve` on 127.0.0.1:`port` with SQLite at `db_path`, as a user starts it.

    `kill()` is SIGKILL: no shutdown handler, no WAL checkpoint, connections cut by the kernel.
    `start()` again brings up a fresh process on the same port and database.
    """

    def __init__(self, db_path: Path, port: int | None = None) -> None:
        self.db_path = db_path
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = db_path.with_name(f"server-{self.port}.log")
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> str:
        command = [sys.executable, "-m", "layerwatch", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*command, "--db", f"sqlite:///{self.db_path}"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        try:
            wait_until_up(self.url, self.process)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; its log:\n{self.log_path.read_text(errors='replace')}") from None
        self.starts += 1
        return self.url

    def kill(self) -> None:
        """SIGKILL and reap: the process gets no chance to finish anything."""
        assert self.process is not None, "kill() before start()"
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.process = None

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ThreadedServer:
    """The real app under uvicorn in a daemon thread, with any `Settings` (port chosen here)."""

    def __init__(self, settings: Settings) -> None:
        port = free_port()
        self.settings = Settings(**{**settings.__dict__, "host": "127.0.0.1", "port": port})
        self.url = f"http://127.0.0.1:{port}"
        self.app = create_app(self.settings)
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            # As `layerwatch serve` does: above the app's own limit, so ingest answers an
            # oversize batch with its error message rather than a bare protocol close.
            ws_max_size=self.settings.max_message_bytes + 1024 * 1024,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> ThreadedServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.02)
        wait_until_up(self.url)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)
