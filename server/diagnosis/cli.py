"""`layerwatch diagnose RUN_ID_OR_NAME`: run every rule again on a stored run and print the findings.

Reads the run back from the database in step order (server/diagnosis/replay.py),
so a run diagnosed live can be diagnosed again after a rule improves. With
`--store`, the findings are written as the run's alerts (as live ingest would).
"""

from __future__ import annotations

import argparse
import sys
import time


def add_arguments(parser: argparse.ArgumentParser, default_db: str) -> None:
    parser.add_argument("run", help="run id, or run name (the newest run of that name)")
    parser.add_argument("--db", default=default_db, help="SQLAlchemy database URL (default: %(default)s)")
    parser.add_argument("--store", action="store_true", help="also write the findings as the run's alerts")


def run(args: argparse.Namespace) -> int:
    """Print the findings; exit 0, or 1 when the run is not found."""
    # Imported here: `layerwatch --help` and `layerwatch demo` need none of it.
    from client_hook.wire import severity_rank
    from layerwatch.server import alerting, store
    from layerwatch.server.db import init_db, make_engine, make_session_factory
    from layerwatch.server.diagnosis.engine import diagnose_stored_run

    engine = make_engine(args.db)
    init_db(engine)
    sessions = make_session_factory(engine)
    with sessions() as session:
        found = store.find_run(session, id_or_name=args.run)
        if found is None:
            print(f"layerwatch diagnose: no run with id or name {args.run!r} in {args.db}", file=sys.stderr)
            return 1
        started = time.perf_counter()
        findings = diagnose_stored_run(session, run_id=found.id)
        elapsed = time.perf_counter() - started
        findings.sort(key=lambda fc: (-severity_rank(fc[0].severity), fc[2]))
        print(
            f"run {found.name!r} ({found.id}), project {found.project!r}, {found.status}, last step {found.last_step}"
        )
        if not findings:
            print("no findings: every rule is quiet on this run")
        for finding, times, first in findings:
            where = f" [{finding.layer}]" if finding.layer else ""
            print(f"{finding.severity:8} {finding.rule}{where}  steps {first}..{finding.step} ({times}x)")
            print(f"         {finding.message}")
            print(f"         remedy: {finding.remedy}")
        print(f"{len(findings)} finding(s) in {elapsed:.2f} s")
        if args.store:
            now = time.time()
            for finding, _, first in findings:
                alerting.raise_alert(session, run_id=found.id, finding=finding, now=now, first_step=first)
            session.commit()
            print("stored as the run's alerts")
    engine.dispose()
    return 0
