"""layerwatch: a live training monitor for PyTorch — the documented entry point.

    import layerwatch
    mon = layerwatch.attach(model, optimizer=opt)       # the same as client_hook.monitor.attach
    report = layerwatch.preflight(model, batch=(x, y), loss_fn=F.cross_entropy)

The installed distribution has two top-level names: this package and `client_hook`
(the training side, kept importable as `from client_hook import monitor`). The server
and the dashboard's files are installed under this one: `layerwatch.server`,
`layerwatch.web` (mapped from the repository's `server/` and `web/` folders by
pyproject.toml), so no generic top-level `server` or `web` package is installed and a
user's own `server.py` or an installed `web.py` cannot shadow them.

The training API is resolved on first use (PEP 562): importing `layerwatch.server`
(which a server image does, without torch installed) never imports torch.
"""

from __future__ import annotations

from typing import Any

from client_hook import __version__

__all__ = ["Monitor", "__version__", "attach", "preflight"]

# Public name -> (module, attribute); each is imported when first asked for.
_LAZY = {
    "attach": ("client_hook.monitor", "attach"),
    "Monitor": ("client_hook.monitor", "Monitor"),
    "preflight": ("client_hook.monitor", "preflight"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'layerwatch' has no attribute {name!r}")
    import importlib

    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
