"""A real `layerwatch serve` process for tests: free port, temp SQLite file, always stopped.

Shared by the end-to-end, packaging, CLI and browser tests, so that every test
that needs a server starts it the same way a user does.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

START_TIMEOUT_S = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(db_path: Path, port: int | None = None, args: Sequence[str] = ()) -> Iterator[str]:
    """Run `python -m server serve [args]` on loopback with SQLite at `db_path`; yield its base URL.

    The server's output goes to a log file beside the database, quoted in the
    error if it does not come up. The process is always terminated on exit.
    """
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = db_path.with_name(f"server-{port}.log")
    command = [sys.executable, "-m", "layerwatch", "serve", "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [*command, "--db", f"sqlite:///{db_path}", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        try:
            wait_until_up(url, process)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; its log:\n{log_path.read_text(errors='replace')}") from None
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_up(url: str, process: subprocess.Popen[bytes] | None = None, timeout: float = START_TIMEOUT_S) -> dict:
    """Poll `/api/health` until it answers; return its JSON. RuntimeError if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"layerwatch serve exited with {process.returncode}")
        try:
            response = httpx.get(f"{url}/api/health", timeout=1)
            if response.status_code == 200:
                return response.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"layerwatch serve did not answer at {url} within {timeout} s")
