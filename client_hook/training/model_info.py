"""What the run_start frame says about the model and the optimizer.

Module names are exactly as `model.named_modules()` gives them (the root is
""), listed in forward order once a forward has been seen: the order in which
modules *started* their forward in the first training forward; modules never
called follow in registration order, marked `called: false`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import nn


def param_owners(model: nn.Module) -> dict[int, tuple[str, str]]:
    """id(parameter) -> (module name, parameter name) for every parameter of `model`.

    A tied parameter (one tensor in two modules) belongs to the first module
    that registers it, as in `model.named_parameters()`.
    """
    owners: dict[int, tuple[str, str]] = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), (module_name, param_name))
    return owners


def describe_model(
    model: nn.Module, forward_order: list[str] | None, optimized: set[int], rms: dict[int, float]
) -> dict[str, Any]:
    """The `model` field of run_start: modules in forward order with their parameters; `rms`: each
    parameter's RMS by id (`weight_rms`, read at attach)."""
    modules = dict(model.named_modules())
    order = [name for name in (forward_order or []) if name in modules]
    called = set(order)
    order += [name for name in modules if name not in called]
    owners = param_owners(model)
    described = []
    for name in order:
        module = modules[name]
        params = []
        for param_name, param in module.named_parameters(recurse=False):
            if owners.get(id(param)) != (name, param_name):
                continue  # a tied parameter is described once, where it is first registered
            params.append(
                {
                    "name": param_name,
                    "shape": list(param.shape),
                    "numel": param.numel(),
                    "requires_grad": param.requires_grad,
                    "in_optimizer": id(param) in optimized,
                    "rms": rms.get(id(param)),
                    "dtype": str(param.dtype).removeprefix("torch."),
                }
            )
        described.append(
            {
                "name": name,
                "type": type(module).__name__,
                "params": params,
                "called": name in called if forward_order is not None else None,
                "leaf": next(iter(module.children()), None) is None,
            }
        )
    return {
        "modules": described,
        "num_params": sum(p.numel() for p in model.parameters()),
        # The labels the signals' per-step `grad_norms` are aligned with (wire.SIGNAL_FIELDS).
        "tensors": tensor_labels(model),
    }


def weight_rms(model: nn.Module) -> dict[int, float]:
    """id(parameter) -> its RMS now (at attach): one fused norm per device, read back once. The rules judge
    an update ratio against it (a weight that starts far below the others is meant to grow fast)."""
    by_device: dict[torch.device, list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.numel() and p.is_floating_point() and p.device.type != "meta":
            by_device.setdefault(p.device, []).append(p)
    out: dict[int, float] = {}
    for params in by_device.values():
        try:
            with torch.no_grad():
                # float32 norms of half tensors without a float32 copy of the model
                norms = torch.stack(torch._foreach_norm([p.detach() for p in params], 2, dtype=torch.float32))
                norms = norms.tolist()
        except Exception:  # a parameter kind the fused norm does not take: the RMS is simply missing
            continue
        for p, norm in zip(params, norms):
            if math.isfinite(norm):
                out[id(p)] = float(f"{norm / p.numel() ** 0.5:.4g}")
    return out


def tensor_labels(model: nn.Module) -> list[str]:
    """ "layer.param" of every parameter in `model.parameters()` order (tied ones once, at their owner)."""
    owners = param_owners(model)
    labels = []
    for p in model.parameters():
        layer, name = owners.get(id(p), ("", "?"))
        labels.append(f"{layer}.{name}" if layer else name)
    return labels


def _plain(value: Any) -> Any:
    """A hyperparameter as JSON: numbers, strings, bools, lists of those; else its repr."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)  # a tensor lr lives on the CPU in practice; read once at start
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, numbers.Number):
        return float(value) if not isinstance(value, int) else value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return repr(value)


def describe_optimizer(optimizer: torch.optim.Optimizer | None) -> dict[str, Any] | None:
    """The `optimizer` field of run_start: its class and each group's hyperparameters."""
    if optimizer is None:
        return None
    groups = []
    for group in optimizer.param_groups:
        hyper = {k: _plain(v) for k, v in group.items() if k != "params"}
        hyper["num_params"] = sum(p.numel() for p in group["params"])
        groups.append(hyper)
    return {"type": type(optimizer).__name__, "param_groups": groups}


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """`lr` of group 0 as "lr", the other groups' as "lr/1", "lr/2", ..."""
    lrs: dict[str, float] = {}
    for i, group in enumerate(optimizer.param_groups):
        lr = group.get("lr")
        if lr is not None:
            # float() of a CPU tensor lr needs no device sync; a CUDA one would.
            lrs["lr" if i == 0 else f"lr/{i}"] = float(lr)
    return lrs
