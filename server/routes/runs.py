"""REST: runs and what was recorded about them, under /api.

Routes only translate between HTTP and `layerwatch.server.store`; they hold no SQL. Shared
dependencies (session, access, the run of a path) are in `routes/deps.py`.
Responses go through the models in `layerwatch.server.schemas`, which turn NaN and
±Infinity into null.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from client_hook import wire
from layerwatch.server import store
from layerwatch.server.routes.deps import RUN_NOT_FOUND, AccessDep, RunDep, SessionDep
from layerwatch.server.schemas import (
    AlertPublic,
    HeatmapPublic,
    HistogramSeriesPublic,
    LayerSeriesPublic,
    RunDetail,
    RunPublic,
    ScalarSeriesPublic,
    SeriesPublic,
)

router = APIRouter(prefix="/api")


# Literal types give 422s that name the bad value and the allowed ones, and enums in /docs.
TensorKind = Literal[wire.TENSOR_KINDS]  # type: ignore[valid-type]
StatName = Literal[store.HEATMAP_STATS]  # type: ignore[valid-type]


# A step window and a point budget, shared by every series endpoint: the defaults
# show a whole run in ~2000 points per trace (spikes kept); a zoomed-in window
# short enough for the budget comes back at full resolution.
# Steps are stored as 64-bit integers: a bound past that range is a 422, not a database overflow.
StartQuery = Annotated[int | None, Query(ge=0, le=wire.MAX_COUNT, description="first step (inclusive)")]
EndQuery = Annotated[int | None, Query(ge=0, le=wire.MAX_COUNT, description="last step (inclusive)")]
MaxPointsQuery = Annotated[
    int, Query(ge=1, le=1_000_000, description="at most this many points per trace; longer ranges are bucketed")
]


@router.get("/runs")
def list_runs(
    session: SessionDep, access: AccessDep, project: str | None = None, name: str | None = None
) -> list[RunPublic]:
    """All runs, newest first; optionally only one project's, or only those with one name.

    A project token lists its own project's runs only."""
    if access.project is not None:
        if project not in (None, access.project):
            return []
        project = access.project
    return [RunPublic.model_validate(run) for run in store.list_runs(session, project=project, name=name)]


@router.get("/runs/{run_id}", responses=RUN_NOT_FOUND)
def get_run(session: SessionDep, run: RunDep) -> RunDetail:
    """One run with its model description and what series it has recorded (in forward order)."""
    series = store.run_series(session, run_id=run.id, model=run.model)
    return RunDetail.model_validate(
        {
            **RunPublic.model_validate(run).model_dump(),
            "model": run.model,
            "optimizer": run.optimizer,
            "config": run.config,
            "scalar_keys": store.scalar_keys(session, run_id=run.id),
            "series": [SeriesPublic(layer=layer, param=param, kind=kind) for layer, param, kind in series],
        }
    )


@router.get("/runs/{run_id}/scalars", responses=RUN_NOT_FOUND)
def scalars(
    session: SessionDep,
    run: RunDep,
    key: str,
    start: StartQuery = None,
    end: EndQuery = None,
    max_points: MaxPointsQuery = store.DEFAULT_MAX_POINTS,
) -> ScalarSeriesPublic:
    """One scalar (e.g. `loss`) over steps, ascending; a NaN value is null.

    Past `max_points` steps, each bucket of steps gives its minimum and maximum.
    """
    steps, values = store.scalar_series(session, run_id=run.id, key=key, start=start, end=end, max_points=max_points)
    return ScalarSeriesPublic(key=key, steps=steps, values=values)


@router.get("/runs/{run_id}/heatmap", responses=RUN_NOT_FOUND)
def heatmap(
    session: SessionDep,
    run: RunDep,
    kind: TensorKind = "grad",
    stat: StatName = "norm",
    param: Annotated[str | None, Query(description="only rows of this param, e.g. 'weight'")] = None,
    start: StartQuery = None,
    end: EndQuery = None,
    max_points: MaxPointsQuery = store.DEFAULT_MAX_POINTS,
) -> HeatmapPublic:
    """One statistic of every layer of one kind as a layer x step matrix, rows in forward order.

    Past `max_points` steps, each column is a bucket of steps holding its extreme value.
    """
    return HeatmapPublic(
        **store.heatmap(
            session,
            run_id=run.id,
            kind=kind,
            stat=stat,
            param=param,
            model=run.model,
            start=start,
            end=end,
            max_points=max_points,
        )
    )


@router.get("/runs/{run_id}/layer_stats", responses=RUN_NOT_FOUND)
def layer_stats(
    session: SessionDep,
    run: RunDep,
    layer: str,
    param: str,
    kind: TensorKind,
    start: StartQuery = None,
    end: EndQuery = None,
    max_points: MaxPointsQuery = store.DEFAULT_MAX_POINTS,
) -> LayerSeriesPublic:
    """Every statistic of one (layer, param, kind) over steps (bucket extremes past `max_points`)."""
    series = store.layer_series(
        session, run_id=run.id, layer=layer, param=param, kind=kind, start=start, end=end, max_points=max_points
    )
    return LayerSeriesPublic(**series)


@router.get("/runs/{run_id}/histograms", responses=RUN_NOT_FOUND)
def histograms(
    session: SessionDep,
    run: RunDep,
    layer: str,
    param: str,
    kind: TensorKind,
    start: StartQuery = None,
    end: EndQuery = None,
    max_points: MaxPointsQuery = store.DEFAULT_MAX_POINTS,
) -> HistogramSeriesPublic:
    """The histograms of one (layer, param, kind) over steps; bin edges are `wire.hist_edges(lo, hi)`.

    Past `max_points` steps, each bucket of steps gives its last histogram.
    """
    series = store.histogram_series(
        session, run_id=run.id, layer=layer, param=param, kind=kind, start=start, end=end, max_points=max_points
    )
    return HistogramSeriesPublic(**series)


@router.get("/runs/{run_id}/alerts", responses=RUN_NOT_FOUND)
def alerts(session: SessionDep, run: RunDep) -> list[AlertPublic]:
    """The run's alerts in the order they first fired; `step` is the first step, `last_step` the latest."""
    return [
        AlertPublic(
            id=a.id,
            rule=a.rule,
            severity=a.severity,
            step=a.first_step,
            last_step=a.last_step,
            count=a.count,
            layer=a.layer,
            message=a.message,
            remedy=a.remedy,
            evidence=a.evidence,
        )
        for a in store.list_alerts(session, run_id=run.id)
    ]
