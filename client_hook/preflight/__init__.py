"""Before training, once, on copies: the checklist's pre-training tests.

    run.py     the orchestrator: copies the model and batch, isolates the RNG, runs the checks
    checks.py  one function per check, thresholds with their sources
    report.py  what `monitor.preflight` returns: findings, one row per check, the printed table

The user calls `monitor.preflight` (`layerwatch.preflight`), which runs `run_checks`
and then gives the findings to the model's monitor; nothing in this package
imports the monitor or talks to a server.
"""

from client_hook.preflight.report import Finding, PreflightReport
from client_hook.preflight.run import copy_model, run_checks

__all__ = ["Finding", "PreflightReport", "copy_model", "run_checks"]
