"""What `monitor.preflight` returns: findings, one row per check, and the printed table.

A finding has the same fields as a server alert (rule, severity, layer,
message, remedy, evidence) and the same remedy text, from `client_hook.catalog`,
so a preflight finding reads the same on the terminal and on the run's page.
Torch-free: this is formatting only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from client_hook.catalog import RULES
from client_hook.wire import severity_rank

SOURCE = "preflight"  # evidence["source"] of every finding: tells them apart from live alerts
PASSED, SKIPPED = "ok", "skipped"


@dataclass(frozen=True)
class Finding:
    """One problem found; readable as attributes (`f.rule`) or keys (`f["rule"]`)."""

    rule: str
    severity: str
    layer: str | None
    message: str
    remedy: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def as_dict(self) -> dict[str, Any]:
        """The wire form (`wire.FINDING_FIELDS`) for a `findings` frame."""
        return asdict(self)


def finding(
    rule: str, message: str, *, layer: str | None = None, severity: str | None = None, **evidence: Any
) -> Finding:
    """A finding for catalogue rule `rule`: its default severity and remedy unless told otherwise."""
    info = RULES[rule]  # a KeyError here is a typo in a check, not a user error
    return Finding(
        rule=rule,
        severity=severity or info.severity,
        layer=layer,
        message=message,
        remedy=info.remedy,
        evidence={"source": SOURCE, **evidence},
    )


@dataclass(frozen=True)
class CheckRow:
    """One line of the table: a check that ran, passed, was skipped, or one finding of it."""

    check: str
    result: str  # "ok", "skipped", or the finding's severity
    layer: str | None
    measured: str
    remedy: str


class PreflightReport:
    """The outcome of `monitor.preflight`: `ok`, `findings`, and `str()` as a table."""

    def __init__(self) -> None:
        self.findings: list[Finding] = []
        self.rows: list[CheckRow] = []

    @property
    def ok(self) -> bool:
        """False iff any finding is a warning or critical (info findings are not alarms)."""
        return not any(severity_rank(f.severity) >= severity_rank("warning") for f in self.findings)

    def passed(self, check: str, measured: str) -> None:
        self.rows.append(CheckRow(check, PASSED, None, measured, ""))

    def skipped(self, check: str, why: str) -> None:
        self.rows.append(CheckRow(check, SKIPPED, None, why, ""))

    def add(self, found: Finding, measured: str | None = None) -> None:
        self.findings.append(found)
        self.rows.append(CheckRow(found.rule, found.severity, found.layer, measured or found.message, found.remedy))

    def by_rule(self, rule: str) -> list[Finding]:
        return [f for f in self.findings if f.rule == rule]

    def summary(self) -> str:
        counts = {s: sum(f.severity == s for f in self.findings) for s in ("critical", "warning", "info")}
        verdict = "OK" if self.ok else "NOT OK"
        ran = sum(r.result != SKIPPED for r in self.rows)
        found = ", ".join(f"{s}: {n}" for s, n in counts.items() if n) or "nothing found"
        return f"preflight {verdict}: {ran} checks ran, {found}"

    def __str__(self) -> str:
        header = ("check", "result", "layer", "measured", "remedy")
        cells = [header] + [
            (r.check, r.result, "-" if r.layer is None else repr(r.layer), r.measured, r.remedy or "-")
            for r in self.rows
        ]
        # The last column is not padded: a long remedy just runs on.
        widths = [max(len(row[i]) for row in cells) for i in range(len(header) - 1)]
        lines = [" | ".join([*(c.ljust(w) for c, w in zip(row, widths)), row[-1]]).rstrip() for row in cells]
        lines.insert(1, "-+-".join(["-" * w for w in widths] + ["-" * len(header[-1])]))
        return "\n".join([*lines, self.summary()])

    def __repr__(self) -> str:
        return f"<PreflightReport {self.summary()}>"
