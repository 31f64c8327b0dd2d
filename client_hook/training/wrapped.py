"""What frameworks wrap around the user's model and optimizer, and how layerwatch finds what is inside.

- Models: torch.compile's `OptimizedModule` holds the module as `_orig_mod`, DDP and
  DataParallel as `module`. Layers are named and hooked on the innermost module, so names
  are those of the user's model (no `_orig_mod.` / `module.` prefix).
- Optimizers: accelerate's `AcceleratedOptimizer` (what transformers' Trainer hands its
  callbacks) subclasses `torch.optim.Optimizer` without running its `__init__`, so it has
  no hook registries; Lightning's `LightningOptimizer` holds the optimizer as `_optimizer`.
  The hooks go on the torch optimizer inside, whose `step()` the wrapper calls.
  `ZeroRedundancyOptimizer` is a hookable optimizer itself (its hooks see every parameter).
- GradScaler: the one a wrapper steps through (accelerate's `.scaler`, Lightning's
  precision plugin's `.scaler`), so skipped steps are seen without the user passing it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Wrappers whose layers are their `.module`'s: hooked and named as the module itself, so names
# carry no "module." prefix. The forward still goes through the wrapper, which calls `.module`:
# hooks on `.module` see the input batch as the model gets it (DDP has moved it to the device by
# then), and a replayed forward (signals' non-finite localisation) runs `.module` on one rank
# alone, never the wrapper's collectives (DDP syncs buffers at the start of its forward).
PARALLEL_WRAPPERS: tuple[type[nn.Module], ...] = (nn.parallel.DistributedDataParallel, nn.DataParallel)
# torch.compile's wrapper, by class name: importing torch._dynamo to name it would cost every attach.
_COMPILED = "OptimizedModule"
# Attributes under which optimizer wrappers keep the optimizer they wrap: Lightning, then
# accelerate / transformers / DeepSpeed-style wrappers. Not `optim`: ZeroRedundancyOptimizer keeps
# its rank's shard optimizer there, which sees only part of the parameters.
_OPTIMIZER_ATTRS: tuple[str, ...] = ("_optimizer", "optimizer")
_MAX_DEPTH = 8  # wrappers of wrappers; a cycle of attributes must not loop forever


def _inner_model(model: nn.Module) -> nn.Module | None:
    """The module one wrapper holds, or None when `model` is no wrapper."""
    if isinstance(model, PARALLEL_WRAPPERS):
        return model.module
    inner = getattr(model, "_orig_mod", None) if type(model).__name__ == _COMPILED else None
    return inner if isinstance(inner, nn.Module) else None


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The module a (DistributedDataParallel, DataParallel) wrapper trains, else `model` itself.

    `attach` monitors that module: the training's forward reaches it through the wrapper.
    """
    while isinstance(model, PARALLEL_WRAPPERS):
        model = model.module
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's own module inside torch.compile's and DDP's wrappers (any nesting), else `model`.

    Layers are named and hooked on it; a compiled model's top-level hooks stay on the compiled
    wrapper, which runs them eagerly, outside the graph.
    """
    inner = _inner_model(model)
    while inner is not None:
        model, inner = inner, _inner_model(inner)
    return model


def is_compiled(model: nn.Module) -> bool:
    """Whether `model` is or wraps a torch.compile'd module (`torch.compile(model)`, or `model.compile()`
    in place, which sets `_compiled_call_impl`)."""
    current: nn.Module | None = model
    while current is not None:
        if type(current).__name__ == _COMPILED or getattr(current, "_compiled_call_impl", None) is not None:
            return True
        current = _inner_model(current)
    return False


def hookable(optimizer: Any) -> bool:
    """Whether step hooks can be registered on `optimizer` (a torch optimizer whose __init__ ran)."""
    return isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "_optimizer_step_pre_hooks")


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The hookable torch optimizer in `optimizer` or the wrappers around it; None if there is none."""
    current = optimizer
    for _ in range(_MAX_DEPTH):
        held = (getattr(current, a, None) for a in _OPTIMIZER_ATTRS)
        inner = next((o for o in held if isinstance(o, torch.optim.Optimizer)), None)
        if inner is None or inner is current:
            break
        current = inner
    return current if hookable(current) else None


def _is_scaler(value: Any) -> bool:
    # torch.amp.GradScaler; torch.cuda.amp.GradScaler and frameworks' subclasses derive from it.
    return isinstance(value, torch.amp.GradScaler)


def find_scaler(optimizer: Any) -> torch.amp.GradScaler | None:
    """The GradScaler a framework's optimizer wrapper steps through, if any (None: none, or not told)."""
    current = optimizer
    for _ in range(_MAX_DEPTH):
        if current is None:
            return None
        scaler = getattr(current, "scaler", None)
        if _is_scaler(scaler):
            return scaler  # accelerate's AcceleratedOptimizer
        plugin = getattr(getattr(current, "_strategy", None), "precision_plugin", None)
        if _is_scaler(getattr(plugin, "scaler", None)):
            return plugin.scaler  # Lightning: LightningOptimizer -> strategy -> MixedPrecision
        current = next((getattr(current, a) for a in _OPTIMIZER_ATTRS if hasattr(current, a)), None)
    return None
