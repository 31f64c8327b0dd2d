"""The ingest websocket, /ws/ingest: validate, store, then acknowledge.

One text message is one batch (see `client_hook.wire`). A batch is validated
frame by frame, its valid frames stored in one transaction in a worker thread
(the event loop never waits on the database), and only after the commit acked
with their seqs; a frame that is not valid is named in the ack's `refused`
(index and reason: never stored, never acked) and does not sink the rest of
its batch. Then the live hub hears what changed. A message that is not a
batch at all is answered with an error that names the problem and closes this
connection only: what was stored stays, and other connections go on.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

import orjson
from fastapi import APIRouter, WebSocket, WebSocketDisconnect, status
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from client_hook import wire
from layerwatch.server import alerting, auth, origins, store
from layerwatch.server.db import WRITE_LOCK
from layerwatch.server.diagnosis.engine import Engine
from layerwatch.server.live import LiveHub, alert_event, ingest_events
from layerwatch.server.settings import Settings

log = logging.getLogger(__name__)

router = APIRouter()


class BadMessage(Exception):
    """A message this connection must be closed for; `code` is the websocket close code."""

    def __init__(self, text: str, code: int = status.WS_1008_POLICY_VIOLATION) -> None:
        super().__init__(text)
        self.code = code


def _parse(message: dict[str, Any], limit: int) -> tuple[list[tuple[int, dict[str, Any]]], list[dict[str, Any]]]:
    """The valid frames of one websocket message with their index in it, and the refused ones
    (`wire.split_batch`), or BadMessage naming what is wrong with the message as a whole."""
    text = message.get("text")
    if text is None:
        raise BadMessage("binary messages are not accepted: send each batch as a JSON text message")
    size = len(text.encode("utf-8"))
    if size > limit:
        raise BadMessage(
            f"message of {size} bytes is over this server's limit of {limit} bytes: send smaller batches",
            status.WS_1009_MESSAGE_TOO_BIG,
        )
    try:
        batch = orjson.loads(text)  # strict JSON, ~4x faster than json on a batch of rows
    except orjson.JSONDecodeError:
        # What orjson refuses, Python's json may take: NaN and Infinity tokens (a NaN loss is
        # data), integers past 64 bits (validation then names them); else its error is the clearer.
        try:
            batch = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadMessage(f"message is not valid JSON: {exc}") from None
        except RecursionError:
            raise BadMessage("message is nested too deeply to be a batch") from None
    try:
        return wire.split_batch_indexed(batch)
    except wire.SchemaError as exc:
        raise BadMessage(str(exc)) from None


def _check_writers(
    session: Session, frames: list[tuple[int, dict[str, Any]]], proven: set[str], refused: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The frames this connection may write: of a run with a secret, only once a run_start carrying it
    came over this connection; the others join `refused`, by index. `proven` remembers, per connection,
    the runs it may write (proven, or started without a secret), so a batch of those needs no lookup:
    only runs not proven yet, and run_starts (checked against the secret every time), are looked up.

    The first run_start of a run sets its secret (stored as a hash, in this batch's transaction: under
    the write lock, no other connection can set it between). A run started without one (an older
    client) is written as before, and never adopts one later: that would lock its own client out."""
    looked_up = {f["run_id"]: None for _, f in frames if f["kind"] == "run_start" or f["run_id"] not in proven}
    known: dict[str, str | None] = store.run_secret_hashes(session, list(looked_up))
    proven.update(run_id for run_id, hashed in known.items() if hashed is None)  # no secret: anyone, as before
    kept = []
    for i, f in frames:
        run_id = f["run_id"]
        problem = None
        if f["kind"] == "run_start":
            given = store.secret_hash(f["secret"]) if f.get("secret") else None
            if run_id not in known:
                known[run_id] = given  # a new run: this run_start sets who may write it
                if given is not None:
                    proven.add(run_id)
            elif known[run_id] is not None:
                if given is not None and hmac.compare_digest(given, known[run_id]):
                    proven.add(run_id)
                else:
                    problem = f"run {run_id!r} belongs to another client: this run_start does not carry its secret"
        elif known.get(run_id) is not None and run_id not in proven:
            problem = (
                f"run {run_id!r} belongs to the client that started it: this connection has not sent its "
                "run_start with the run's secret"
            )
        if problem is None:
            kept.append(f)
        else:
            entry = {"index": i, "error": f"frame {i} ({f['kind']!r}): {problem}"}
            refused.append({**entry, **{k: f[k] for k in ("run_id", "seq", "rank") if k in f}})
    refused.sort(key=lambda r: r["index"])
    return kept


def _check_access(session: Session, frames: list[dict[str, Any]], access: auth.Access, allowed: set[str]) -> None:
    """BadMessage unless every run these frames belong to (as stored, and as a run_start
    names it) is of the project this connection's token opens. `allowed` remembers the
    runs already checked on this connection (one lookup per run, not per batch)."""
    for f in frames:
        if f["kind"] == "run_start" and not access.allows(f["project"]):
            raise BadMessage(access.refusal(f["run_id"], f["project"]))
    unchecked = list({f["run_id"]: None for f in frames if f["run_id"] not in allowed})
    for run_id, project in store.run_projects(session, unchecked).items():
        if not access.allows(project):
            raise BadMessage(access.refusal(run_id, project))
    allowed.update(unchecked)  # stored ones are its project's; new ones are named by a run_start checked above


def _receive(
    sessions: sessionmaker[Session],
    diagnosis: Engine,
    message: dict[str, Any],
    limit: int,
    access: auth.Access,
    allowed: set[str],
    proven: set[str],
) -> tuple[store.IngestResult, list[store.RunInfo], list[dict[str, Any]]]:
    """Runs in a worker thread: parse and validate (a 16 MB batch takes a while to parse;
    the event loop keeps serving dashboards meanwhile), check the token may send these
    runs, commit the batch's valid frames, then read the changed runs for the live push.
    Also returns the refused frames."""
    indexed, refused = _parse(message, limit)
    if not indexed:
        _log_refused(refused)
        return store.IngestResult(), [], refused
    with WRITE_LOCK, sessions() as session:
        # Checked under the write lock, in the batch's own transaction: no other writer can
        # store one of these runs, under another project, between the check and the write.
        frames = _check_writers(session, indexed, proven, refused)
        _log_refused(refused)
        if not frames:
            return store.IngestResult(), [], refused
        if access.project is not None:
            _check_access(session, frames, access, allowed)
        result = store.ingest_batch(session, frames=frames, raise_alert=alerting.raise_alert)
        # The rules run on what was just committed; their alerts commit separately, after
        # the data (store first: a rule failure can never lose a frame).
        try:
            result.alerts += diagnosis.process(session, frames)
        except Exception:
            session.rollback()
            log.exception("diagnosing a batch failed; the batch itself is stored")
    with sessions() as session:
        runs = [store.get_run(session, run_id=run_id) for run_id in result.changed_runs]
    return result, [run for run in runs if run is not None], refused


def _passing(exc: Exception) -> bool:
    """Whether a storage failure passes on its own (disk full, database locked or away): the client is
    told to keep the batch and send it again, rather than that its data is refused."""
    return isinstance(exc, (OperationalError, InterfaceError, OSError)) or getattr(exc, "connection_invalidated", False)


def _first_line(exc: Exception) -> str:
    """The database's own message without the SQL and parameters SQLAlchemy appends."""
    text = str(getattr(exc, "orig", None) or exc)
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _log_refused(refused: list[dict[str, Any]]) -> None:
    if refused:
        log.warning("ingest refused %d frame(s) of a batch; the first: %s", len(refused), refused[0]["error"])


async def _reject(websocket: WebSocket, text: str, code: int, retry: bool = False) -> None:
    log.warning("ingest from %s rejected: %s", websocket.client, text)
    try:
        await websocket.send_json(wire.error(text, retry=retry))
        # A close reason is at most 123 bytes of UTF-8 (not characters: a bad value quoted in
        # the text may be non-ASCII, or a lone surrogate, which "replace" turns into "?").
        reason = text.encode("utf-8", "replace")[:120].decode("utf-8", "ignore")
        await websocket.close(code=code, reason=reason)
    except (WebSocketDisconnect, RuntimeError):
        pass  # the client is gone already; nothing to tell it


@router.websocket("/ws/ingest")
async def ingest(websocket: WebSocket) -> None:
    settings: Settings = websocket.app.state.settings
    sessions: sessionmaker[Session] = websocket.app.state.sessions
    hub: LiveHub = websocket.app.state.hub
    diagnosis: Engine = websocket.app.state.diagnosis

    if not origins.origin_allowed(websocket, settings.allow_origins):
        log.warning("ingest from %s refused: origin %r", websocket.client, websocket.headers.get("origin"))
        await origins.refuse_origin(websocket)
        return
    await websocket.accept()
    try:
        access = auth.websocket_access(websocket, settings)
    except auth.Refused as exc:
        problem = str(exc)
        if problem == auth.TOKEN_REQUIRED:
            problem = "this server requires a token: send 'Authorization: Bearer <token>' or '?token=<token>'"
        await _reject(websocket, problem, status.WS_1008_POLICY_VIOLATION)
        return
    allowed: set[str] = set()  # runs this connection was checked to be allowed to send
    proven: set[str] = set()  # runs this connection sent the secret of (their run_start)
    log.info("ingest connection from %s", websocket.client)
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            log.info("ingest connection from %s closed", websocket.client)
            return
        try:
            result, runs, refused = await run_in_threadpool(
                _receive, sessions, diagnosis, message, settings.max_message_bytes, access, allowed, proven
            )
        except BadMessage as exc:
            await _reject(websocket, str(exc), exc.code)
            return
        except store.UnknownRunError as exc:
            await _reject(websocket, str(exc), status.WS_1008_POLICY_VIOLATION)
            return
        except Exception as exc:  # a database failure: this batch is not stored, so it is not acked
            log.exception("storing a batch from %s failed", websocket.client)
            retry = _passing(exc)
            text = f"the server could not store this batch{' for now' if retry else ''}: {_first_line(exc)}"
            await _reject(
                websocket, text, status.WS_1013_TRY_AGAIN_LATER if retry else status.WS_1011_INTERNAL_ERROR, retry
            )
            return
        # Committed: dashboards hear of it whether or not its client is still there to be acked.
        hub.publish(ingest_events(result, runs))
        try:
            for alert, change in result.alerts:
                # Back to the training process, which logs it once and calls on_alert. Findings
                # the client made itself (preflight) are not echoed.
                sent = alert.run_id in result.acked or alert.run_id in result.acked_ranks
                if change in (store.ALERT_NEW, store.ALERT_ESCALATED) and sent:
                    if (alert.evidence or {}).get("source") != "preflight":
                        public = alert_event(alert)["alert"]
                        await websocket.send_json({"kind": "alert", "alert": {**public, "run_id": alert.run_id}})
            # After the alerts: the client reads up to the ack, so it sees them before it sends on
            # (and, at close, before it hangs up). Everything was committed before either.
            await websocket.send_json(wire.ack(result.acked, result.acked_ranks, refused))
        except WebSocketDisconnect:
            # The client left, or the server is stopping (SIGTERM closes every socket with 1012 and
            # lets the commit in flight finish): no ack, so the client replays it, and is stored once.
            log.info("ingest connection from %s closed before its ack; that batch is stored", websocket.client)
            return
        log.debug("stored %d frames, %d replayed", result.stored_frames, result.replayed_frames)
