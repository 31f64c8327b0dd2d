"""Queries on a long run: loss series, layer x step heatmap, histogram-over-time, through a real server.

The run (STEPS steps of loss, LAYERS layers of gradient statistics every step,
histograms every HIST_EVERY steps) is written straight into the SQLite file
through the tables, its step rollups filled the way `init_db` fills those of a
database from before them (`rollup.rebuild`), then `layerwatch serve` answers
the dashboard's default requests (downsampled to 1000-2000 points per trace,
from the rollups) and zoomed-in windows (full resolution, from the exact rows).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import httpx
from sqlalchemy import insert

from bench._common import figure, machine, parser, percentile
from client_hook import wire
from layerwatch.server import store
from layerwatch.server.db import init_db, make_engine, make_session_factory
from layerwatch.server.store import rollup
from layerwatch.server.tables import Histogram, LayerStat, Project, Run, Scalar


def build_run(url: str, *, steps: int, layers: int, hist_every: int, run_id: str = "long") -> None:
    """A finished run of `steps` steps written directly into the tables (tuples through the
    driver's executemany, in chunks), then its rollups filled as `init_db` fills an old database's."""
    engine = make_engine(url)
    init_db(engine)
    rng = random.Random(0)
    model = {"modules": [{"name": f"layer{i}", "type": "Linear", "params": ["weight"]} for i in range(layers)]}
    stat_sql = f"INSERT INTO layer_stats VALUES ({', '.join('?' * len(LayerStat.__table__.columns))})"
    hist_sql = f"INSERT INTO histograms VALUES ({', '.join('?' * len(Histogram.__table__.columns))})"
    counts = store.pack_counts(range(wire.HIST_BINS))
    with make_session_factory(engine)() as session:
        session.add(Project(id=1, name="bench"))
        session.add(Run(id=run_id, project_id=1, name=run_id, status="finished", created_at=time.time(),
                        updated_at=time.time(), last_step=steps - 1, every=1, model=model))  # fmt: skip
        session.flush()
        driver = session.connection()
        for first in range(0, steps, 2000):
            chunk = range(first, min(first + 2000, steps))
            session.execute(insert(Scalar), [{"run_id": run_id, "key": "loss", "step": s, "value": 2 / (1 + s / 1000)
                                              + (50.0 if s == steps // 3 else 0.0)} for s in chunk])  # fmt: skip
            stats = []
            for s in chunk:
                for i in range(layers):
                    v = rng.random()  # mean std rms norm min max nonfinite zero_frac numel update_ratio sat_frac
                    stats.append((run_id, s, f"layer{i}", "weight", "grad", v, v, v, v, v, v, 0, v, 4096, v, None))
            driver.exec_driver_sql(stat_sql, stats)
            hists = [(run_id, s, f"layer{i}", "weight", "grad", -1.0, 1.0, counts)
                     for s in chunk if s % hist_every == 0 for i in range(layers)]  # fmt: skip
            driver.exec_driver_sql(hist_sql, hists)
        session.commit()
        rollup.rebuild(session, run_id=run_id)
        session.commit()
    engine.dispose()


def main() -> None:
    cli = parser(__doc__)
    cli.add_argument("--db", type=Path, help="keep the built run in this SQLite file, and reuse it if it exists")
    args = cli.parse_args()
    steps, layers, hist_every, repeats = (2000, 10, 10, 3) if args.quick else (100_000, 50, 10, 10)
    print(f"machine: {machine()}")
    import tempfile

    from bench._common import server as _  # noqa: F401 - same import path as the other benchmarks
    from tests.serving import serve

    with tempfile.TemporaryDirectory(prefix="layerwatch-queries-") as tmp:
        db = args.db or Path(tmp) / "long.db"
        began = time.perf_counter()
        if not db.exists():  # the full run: ~1 minute to build on 2 cores
            build_run(f"sqlite:///{db}", steps=steps, layers=layers, hist_every=hist_every)
        figure("stored run", f"{steps} steps x {layers} layers ({time.perf_counter() - began:.0f} s to build)")
        with serve(db) as url, httpx.Client(base_url=url, timeout=60) as client:
            queries = {
                "loss series": ("/api/runs/long/scalars", {"key": "loss"}, "values"),
                "heatmap (layer x step)": ("/api/runs/long/heatmap", {"kind": "grad", "stat": "norm"}, "steps"),
                "histogram over time": ("/api/runs/long/histograms",
                                        {"layer": "layer0", "param": "weight", "kind": "grad"}, "steps"),  # fmt: skip
                "layer series (one layer, every stat)": (
                    "/api/runs/long/layer_stats", {"layer": "layer7", "param": "weight", "kind": "grad"}, "steps"),
                "loss zoomed (1000 steps, full resolution)": (
                    "/api/runs/long/scalars", {"key": "loss", "start": steps // 2, "end": steps // 2 + 999}, "values"),
                "heatmap zoomed (1000 steps, full resolution)": (
                    "/api/runs/long/heatmap", {"kind": "grad", "stat": "norm", "start": steps // 2,
                                               "end": steps // 2 + 999}, "steps"),
            }  # fmt: skip
            for name, (path, params, field) in queries.items():
                times, body = [], {}
                for _ in range(repeats):
                    started = time.perf_counter()
                    response = client.get(path, params=params)
                    times.append(time.perf_counter() - started)
                    response.raise_for_status()
                    body = response.json()
                points = len(body[field])
                p50, worst = percentile(times, 50) * 1e3, max(times) * 1e3
                figure(f"{name}", f"p50 {p50:.0f} ms, max {worst:.0f} ms, {points} points", "< 200 ms")
            loss = client.get("/api/runs/long/scalars", params={"key": "loss"}).json()
            figure("loss spike kept when downsampled", str(max(v for v in loss["values"] if v is not None) > 40))


if __name__ == "__main__":
    main()
