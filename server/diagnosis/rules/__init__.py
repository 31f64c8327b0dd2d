"""One module per rule id of DIAGNOSTICS.md.

Each module defines `RULE_ID` (a key of `client_hook.catalog.RULES`), its
thresholds as UPPER_CASE constants with their source, and a pure
`check(view, state) -> list[Finding]` called once per step in step order;
`state` is the rule's own dict for the run (what it must remember from further
back than the view's window). Modules are found by listing this package, so a
new rule is one new file.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from client_hook.catalog import RULES as CATALOG


def load_rules() -> list[ModuleType]:
    """Every rule module of this package, sorted by id; each checked against the catalogue."""
    modules = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        rule_id = getattr(module, "RULE_ID", None)
        if rule_id not in CATALOG or not callable(getattr(module, "check", None)):
            raise ImportError(f"rule module {module.__name__} needs a catalogued RULE_ID and a check(view, state)")
        modules.append(module)
    return modules


RULES: list[ModuleType] = load_rules()
