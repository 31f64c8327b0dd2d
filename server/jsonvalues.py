"""Non-finite floats in JSON: the server's two rules, side by side, so none is written twice.

JSON has no NaN or Infinity (PostgreSQL's json type and a browser's JSON.parse
both reject Python's bare `NaN` tokens), and the server means two things by one:
- a *measurement* on its way out (a loss, a statistic, webhook evidence numbers):
  `json_safe` makes it null; the dashboard draws a gap, a NaN loss is data to show;
- a *value a user or a rule wrote* (a run's config, a finding's evidence):
  `json_text` keeps it readable as the string "NaN", "Infinity" or "-Infinity", so
  "the loss was NaN" survives storage and reads back the same on every backend.
"""

from __future__ import annotations

import math
from typing import Any


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float, however deeply nested, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_text(value: Any) -> Any:
    """`value` with each non-finite float as the string "NaN", "Infinity" or "-Infinity" (dict keys as str)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {str(k): json_text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_text(v) for v in value]
    return value
