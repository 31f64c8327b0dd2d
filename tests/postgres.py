"""A real, throwaway PostgreSQL server for the tests that check "the same code on PostgreSQL".

`PostgresServer` runs `initdb` into a temporary folder and `pg_ctl start` on a
free loopback port; `new_database()` hands each test a fresh, empty database
of its own. Debian's `postgresql` package provides the binaries (tests/run.sh
installs it); as root the server runs as the `postgres` user, since PostgreSQL
refuses to run as root.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.serving import free_port

START_TIMEOUT_S = 30


def _bin(name: str) -> str:
    """The path of a PostgreSQL server program, from PATH or Debian's versioned folder."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise RuntimeError(
            f"PostgreSQL's {name!r} was not found: install the server ('apt-get install -y postgresql'); "
            "tests/run.sh does this on a fresh machine"
        )
    return found


class PostgresServer:
    """One PostgreSQL cluster on 127.0.0.1:<free port>, trust auth, removed on stop()."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="layerwatch-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._names = itertools.count()
        self._as_user: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL will not run as root
            shutil.chown(self.root, "postgres", "postgres")
            self._as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *command: str) -> None:
        done = subprocess.run([*self._as_user, *command], capture_output=True, text=True, timeout=START_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed with {done.returncode}:\n{done.stdout}\n{done.stderr}")

    def start(self) -> PostgresServer:
        self._run(_bin("initdb"), "-D", str(self.data), "-U", "layerwatch", "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-o", options, "-w", "start")
        return self

    def stop(self) -> None:
        try:
            self._run(_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://layerwatch@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh empty database; its SQLAlchemy URL."""
        import psycopg  # only the PostgreSQL tests need the driver

        name = f"t{next(self._names)}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=layerwatch dbname=postgres", autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return self.url(name)
