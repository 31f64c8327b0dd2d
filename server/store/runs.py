"""Run rows: the runs list, one run, its project, its scalar keys and stored series, the
module order the heatmaps follow, and marking silent runs crashed (for server/liveness.py)."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from client_hook import wire
from layerwatch.server.records import (
    RunInfo,
)
from layerwatch.server.store import rollup
from layerwatch.server.tables import Alert, Project, Run, Scalar


def _alert_counts(session: Session, run_ids: Any) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(wire.SEVERITIES, 0))
    rows = session.execute(
        select(Alert.run_id, Alert.severity, func.count())
        .where(Alert.run_id.in_(run_ids))
        .group_by(Alert.run_id, Alert.severity)
    )
    for run_id, severity, n in rows:
        counts[run_id][severity] = n
    return counts


def _run_info(run: Run, project: str, alert_counts: dict[str, int]) -> RunInfo:
    return RunInfo(
        id=run.id,
        name=run.name,
        project=project,
        status=run.status,
        created_at=run.created_at,
        updated_at=run.updated_at,
        finished_at=run.finished_at,
        last_step=run.last_step,
        last_loss=run.last_loss,
        every=run.every,
        alert_counts=alert_counts,
        model=run.model,
        optimizer=run.optimizer,
        config=run.config,
        dropped=run.dropped,
    )


def list_runs(session: Session, *, project: str | None = None, name: str | None = None) -> list[RunInfo]:
    """Runs, newest first, optionally only those of one project and/or with one name."""
    query = select(Run, Project.name).join(Project, Run.project_id == Project.id)
    if project is not None:
        query = query.where(Project.name == project)
    if name is not None:
        query = query.where(Run.name == name)
    rows = session.execute(query.order_by(Run.created_at.desc(), Run.id)).all()
    counts = _alert_counts(session, [run.id for run, _ in rows]) if rows else {}
    none = dict.fromkeys(wire.SEVERITIES, 0)
    return [_run_info(run, project_name, counts.get(run.id, none)) for run, project_name in rows]


def get_run(session: Session, *, run_id: str) -> RunInfo | None:
    row = session.execute(
        select(Run, Project.name).join(Project, Run.project_id == Project.id).where(Run.id == run_id)
    ).first()
    if row is None:
        return None
    run, project_name = row
    counts = _alert_counts(session, [run_id])
    return _run_info(run, project_name, counts.get(run_id, dict.fromkeys(wire.SEVERITIES, 0)))


def secret_hash(secret: str) -> str:
    """What is stored of a run's write secret: its SHA-256, hex (the secret is random: no salt needed)."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def run_secret_hashes(session: Session, run_ids: list[str]) -> dict[str, str | None]:
    """{run id: its secret hash, None for a run started without a secret} of the stored `run_ids`."""
    if not run_ids:
        return {}
    rows = session.execute(select(Run.id, Run.secret_hash).where(Run.id.in_(run_ids)))
    return {run_id: hashed for run_id, hashed in rows}


def run_projects(session: Session, run_ids: list[str]) -> dict[str, str]:
    """{run id: project name} of those of `run_ids` that are stored (one query)."""
    if not run_ids:
        return {}
    rows = session.execute(
        select(Run.id, Project.name).join(Project, Run.project_id == Project.id).where(Run.id.in_(run_ids))
    )
    return {run_id: project for run_id, project in rows}


def run_name_and_project(session: Session, *, run_id: str) -> tuple[str, str] | None:
    """(name, project name) of a stored run, or None: from the session's own rows when it holds them
    (as ingest's does), so usually without a query. For the webhook payload."""
    run = session.get(Run, run_id)
    if run is None:
        return None
    project = session.get(Project, run.project_id)
    return run.name, project.name if project is not None else ""


def find_run(session: Session, *, id_or_name: str) -> RunInfo | None:
    """The run with this id, else the newest run with this name, else None."""
    run = get_run(session, run_id=id_or_name)
    if run is not None:
        return run
    newest = session.scalar(
        select(Run.id).where(Run.name == id_or_name).order_by(Run.created_at.desc(), Run.id).limit(1)
    )
    return None if newest is None else get_run(session, run_id=newest)


def scalar_keys(session: Session, *, run_id: str) -> list[str]:
    return list(session.scalars(select(Scalar.key).where(Scalar.run_id == run_id).distinct().order_by(Scalar.key)))


def mark_crashed(session: Session, *, before: float) -> list[str]:
    """Mark `running` runs last updated before `before` as `crashed`; commit; return their ids.

    Call it holding the ingest write lock, so that no batch of those runs commits in between.
    """
    stale = (Run.status == "running") & (Run.updated_at < before)
    run_ids = list(session.scalars(select(Run.id).where(stale)))
    if run_ids:
        # The condition again: on a database shared by several servers, another may have just stored a frame.
        session.execute(update(Run).where(stale, Run.id.in_(run_ids)).values(status="crashed"))
        session.commit()
    return run_ids


def forward_order(model: dict[str, Any] | None) -> Any:
    """A sort key for (layer, param, kind): the model's module order (forward order),
    then the module's own parameter order, then the wire's kind order. Names the
    model does not list go last, alphabetically."""
    modules = (model or {}).get("modules") or []
    layer_index: dict[str, int] = {}
    param_index: dict[str, dict[str, int]] = {}
    for i, module in enumerate(modules):
        name = module.get("name")
        layer_index.setdefault(name, i)
        params = [p.get("name") if isinstance(p, dict) else p for p in module.get("params") or []]
        param_index.setdefault(name, {p: j for j, p in enumerate(params)})
    last = len(modules)
    kinds = {k: i for i, k in enumerate(wire.TENSOR_KINDS)}

    def key(series: tuple[str, str, str]) -> tuple[Any, ...]:
        layer, param, kind = series
        params = param_index.get(layer, {})
        return (
            layer_index.get(layer, last),
            layer,
            params.get(param, len(params)),
            param,
            kinds.get(kind, len(kinds)),
            kind,
        )

    return key


def run_series(session: Session, *, run_id: str, model: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    """The (layer, param, kind) series that have layer statistics, in forward order.

    Read as one bucket spanning the whole run, so from the coarsest rollups and
    a few exact steps at the end: a DISTINCT over a long run's rows takes seconds.
    """
    newest = rollup.newest_step(session, rollup.LAYER_STATS, run_id, {})
    if newest is None:
        return []
    top = rollup.LEVELS[-1]
    rows = rollup.cells(
        session, rollup.LAYER_STATS, run_id=run_id, where={}, aggregates=("first_step",), first=0, last=newest,
        width=top * (newest // top + 1), level=top,
    )  # fmt: skip
    return sorted({(layer, param, kind) for _, kind, layer, param, _ in rows}, key=forward_order(model))


# ---------------------------------------------------------------- series
