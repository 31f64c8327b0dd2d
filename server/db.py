"""The database engine and sessions: SQLite by default, PostgreSQL as well.

SQLite gets WAL mode (readers never wait for the writer, which matters while a
dashboard polls during ingest), synchronous=NORMAL (durable at every
checkpoint; safe in WAL mode and much cheaper than FULL), a 10 s busy timeout
and foreign keys on. Nothing else here is specific to one database.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from layerwatch.server.jsonvalues import json_text
from layerwatch.server.store import rollup
from layerwatch.server.tables import Base

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 10_000


def _sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def dump_json(value: Any) -> str:
    """JSON columns' serializer on every backend: strict JSON, since PostgreSQL's json type
    rejects the bare NaN/Infinity tokens Python writes. A NaN in a run's config or a
    finding's evidence is data; it reads back as the string "NaN"."""
    return json.dumps(json_text(value), allow_nan=False)


def make_engine(db_url: str) -> Engine:
    """An engine for `db_url`; for a SQLite file, its folder is created if missing."""
    url = make_url(db_url)
    kwargs: dict[str, Any] = {"json_serializer": dump_json}
    if url.get_backend_name() == "sqlite":
        # Sessions are used from the threadpool that runs sync routes and ingest.
        kwargs["connect_args"] = {"check_same_thread": False}
        if url.database in (None, "", ":memory:"):
            # An in-memory database lives in one connection; share it.
            kwargs["poolclass"] = StaticPool
        else:
            Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, **kwargs)
    if url.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def init_db(engine: Engine) -> None:
    """Create the tables that do not exist yet, and add the nullable columns a newer
    version added to tables a database from an older version already has."""
    Base.metadata.create_all(engine)
    _add_missing_columns(engine)
    _fill_missing_rollups(engine)
    log.info("database ready at %s", engine.url.render_as_string(hide_password=True))


def _add_missing_columns(engine: Engine) -> None:
    """ALTER TABLE ... ADD COLUMN for each column the models have and the database lacks.

    Only nullable columns are ever added (old rows read them as NULL), which is
    how this schema grows: a column is never renamed or retyped."""
    existing = inspect(engine)
    with engine.begin() as connection:
        for table in Base.metadata.sorted_tables:
            have = {c["name"] for c in existing.get_columns(table.name)}
            for column in table.columns:
                if column.name in have:
                    continue
                if not column.nullable:
                    raise RuntimeError(
                        f"the database at {engine.url.render_as_string(hide_password=True)} lacks the column "
                        f"{table.name}.{column.name}, which cannot be added to existing rows: use a new database"
                    )
                kind = column.type.compile(dialect=engine.dialect)
                preparer = engine.dialect.identifier_preparer
                connection.exec_driver_sql(
                    f"ALTER TABLE {preparer.quote(table.name)} ADD COLUMN {preparer.quote(column.name)} {kind}"
                )
                log.info("added column %s.%s to the database", table.name, column.name)


def _fill_missing_rollups(engine: Engine) -> None:
    """Fill the step rollups of stored runs that lack them: every run of a database from before
    them, once (about 3 s per million stored rows on 2 cores), or one whose filling was cut
    short. A run has them when each rolled-up table it has complete buckets in has rollup rows."""
    with Session(engine) as session:
        missing = rollup.runs_missing_rollups(session)
        if not missing:
            return
        log.info("filling the step rollups of %d stored runs (once, for runs stored before them)", len(missing))
        for run_id in missing:
            rollup.rebuild(session, run_id=run_id)
            session.commit()  # run by run: an interrupted fill keeps what it did and resumes
    log.info("step rollups filled")


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit (results outlive the transaction)."""
    return sessionmaker(engine, expire_on_commit=False)


# One writer at a time in this process: SQLite allows a single writer, and
# queuing here is cheaper than the busy-timeout retries (and the "database is
# locked" errors past them) that concurrent clients would otherwise cause.
# Ingest, the webhook routes, the webhook worker and the crashed-run sweeper share it.
WRITE_LOCK = threading.Lock()
