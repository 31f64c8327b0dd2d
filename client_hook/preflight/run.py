"""The checklist's "before you train" tests, run on copies: what `monitor.preflight` calls.

    report = monitor.preflight(model, batch=(x, y), loss_fn=F.cross_entropy)
    print(report); report.ok; report.findings

The training-debugging guides start the same way (Karpathy, "A Recipe for
Training Neural Networks"; "37 reasons why your neural network is not
working"): check the batch, check the loss at init against ln C, make sure
every weight gets a gradient and moves after one step, make sure samples do not
mix across the batch, overfit one batch. The checks themselves are in
`checks.py`; this file makes them harmless: everything runs on deep
copies of the model and of the batch, on the model's own device, with the RNG
state (torch CPU/CUDA, `random`, numpy) saved and restored, so the user's
model, optimizer, data and random streams are exactly as they were.

Nothing here talks to a server: `client_hook.monitor.preflight` runs these
checks, then hands the findings to the model's monitor (or a short-lived one),
so this package never imports the monitor.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import random
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from client_hook.preflight import checks
from client_hook.preflight.report import Finding, PreflightReport
from client_hook.training.tensors import first_float_tensor

__all__ = ["run_checks", "copy_model", "PreflightReport", "Finding"]

log = logging.getLogger("layerwatch")

# The default optimizer of the overfitting run. Adam at 3e-4 is Karpathy's safe
# default for a long run, but it only takes a 2-layer MLP from 2.35 to 1.8 in 100
# steps on one batch; at 1e-2 every healthy test model (MLP, CNN+BatchNorm, tanh,
# dropout) falls below OVERFIT_FRACTION of its initial loss in about 30 steps.
DEFAULT_LR = 1e-2
PREFLIGHT_SEED = 0  # seeds the copies' RNG: the same model and batch give the same report
MIXING_SAMPLES = 2  # batch_mixing looks at the first and the last sample of the batch
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")

OptimizerArg = Callable[[Any], torch.optim.Optimizer] | torch.optim.Optimizer | None


def run_checks(
    model: nn.Module,
    batch: tuple[Any, Any],
    loss_fn: Callable[..., torch.Tensor] = F.cross_entropy,
    optimizer: OptimizerArg = None,
    steps: int = 100,
) -> tuple[PreflightReport, list[str]]:
    """Run the pre-training checks on copies of `model` and `batch`: the report, and the copy's forward order.

    `batch` is `(x, y)`: the model is called as `model(x)` (`model(*x)` for a
    tuple, `model(**x)` for a dict) and the loss as `loss_fn(output, y)`.
    `optimizer` is a factory (`params -> Optimizer`), an optimizer instance (an
    equivalent one of the same class and param-group hyperparameters is built
    on the copy, parameters matched by name), or None for Adam(lr=DEFAULT_LR).
    A batch the model or loss cannot take raises ValueError naming the shapes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, but got {type(model).__name__}")
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"batch must be a pair (x, y), but got {type(batch).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, but got {loss_fn!r}")
    if optimizer is not None and not callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a factory, an Optimizer or None, but got {type(optimizer).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, but got {steps!r}")

    device = _device(model)
    report = PreflightReport()
    with _isolated_rng(device):
        order = _run(report, model, batch, loss_fn, optimizer, steps, device)
    return report, order


# ------------------------------------------------------------------ the run


def _run(
    report: PreflightReport,
    model: nn.Module,
    batch: tuple[Any, Any],
    loss_fn: Callable[..., torch.Tensor],
    optimizer: OptimizerArg,
    steps: int,
    device: torch.device,
) -> list[str]:
    """Every check, in checklist order; returns the forward order of the modules."""
    x, y = _copy_to(batch[0], device), _copy_to(batch[1], device)
    checks.check_input(report, first_float_tensor(x))
    checks.check_targets(report, y)

    work = copy_model(model).train()
    names = {m: name for name, m in work.named_modules()}
    with _watch(work, names) as seen:
        out, loss = _forward(work, x, y, loss_fn)
    loss0 = float(loss.detach())  # host sync: preflight runs once, before training
    output = first_float_tensor(out)
    kind, smoothing = _loss_kind(loss_fn)
    checks.check_output_finite(report, seen.first_nonfinite, loss0)
    if output is not None:
        classes = checks.num_classes(output, y)
        checks.check_loss_at_init(report, loss0, classes, ce_like=kind is not None)
        producer = next((n for n in seen.finished if n and seen.outputs.get(n) is output), None)
        checks.check_softmax_before_loss(report, output, kind == "cross_entropy", producer)
    else:
        classes = None
        report.skipped("loss_at_init", "the model returned no floating-point tensor")
        report.skipped("softmax_before_loss", "the model returned no floating-point tensor")

    # One backward, one step: every trainable weight must get a gradient and move.
    params = _named_params(work)
    trainable = [(m, n, p) for m, n, p in params if p.requires_grad]
    frozen = [(m, n) for m, n, p in params if not p.requires_grad]
    opt = _build_optimizer(optimizer, model, work)
    opt_name = _describe(opt)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    usable = checks.check_gradients(report, trainable, frozen)
    before = {(m, n): p.detach().clone() for m, n, p in trainable if (m, n) in usable}
    opt.step()
    after = {(m, n): p for m, n, p in trainable}
    checks.check_updates(report, lambda m, n: not torch.equal(before[(m, n)], after[(m, n)]), usable, opt_name)

    # Overfit the one batch (the first step is already taken).
    floor = _smoothing_floor(smoothing, classes)
    losses = [loss0]
    target = floor + checks.OVERFIT_FRACTION * (loss0 - floor)
    for k in range(steps):
        _, loss = _forward(work, x, y, loss_fn)
        losses.append(float(loss.detach()))
        if losses[-1] <= target or k == steps - 1 or not torch.isfinite(loss):
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    checks.check_overfit(report, losses, floor, steps, opt_name)

    _check_mixing(report, model, x)
    return seen.order


def _check_mixing(report: PreflightReport, model: nn.Module, x: Any) -> None:
    """batch_mixing: gradients of sample i's output w.r.t. the inputs of the other samples, in eval mode."""
    probe = copy_model(model).eval()  # eval: BatchNorm uses running stats, dropout is off
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in probe.modules())
    x = _copy_to(x, _device(probe))
    x0 = first_float_tensor(x)
    if x0 is None or x0.dim() == 0 or x0.shape[0] < 2:
        checks.check_batch_mixing(report, 0.0, None, has_bn, skipped="needs a floating-point input of 2+ samples")
        return
    x0.requires_grad_(True)
    names = {m: name for name, m in probe.named_modules()}
    with _watch(probe, names) as seen:
        out = first_float_tensor(_call(probe, x))
    n = x0.shape[0]
    if out is None or out.dim() == 0 or out.shape[0] != n or not out.requires_grad:
        checks.check_batch_mixing(report, 0.0, None, has_bn, skipped="the output has no batch dimension")
        return

    def leak(t: torch.Tensor, i: int) -> tuple[float, float]:
        """(|grad on other samples|, |grad on sample i|) of a random projection of t[i]."""
        (grad,) = torch.autograd.grad((t[i] * torch.randn_like(t[i])).sum(), x0, retain_graph=True, allow_unused=True)
        if grad is None:
            return 0.0, 0.0
        others = torch.cat([grad[:i], grad[i + 1 :]])
        return float(others.norm()), float(grad[i].norm())

    worst, own, sample = 0.0, 0.0, 0
    for i in sorted({0, n - 1})[:MIXING_SAMPLES]:
        cross, mine = leak(out, i)
        if cross > worst:
            worst, own, sample = cross, mine, i
    where = None
    if worst > 0:  # place it: the first module (in finishing order) whose output already mixes
        for name in seen.finished:
            t = seen.outputs.get(name)
            if name and t is not None and t.dim() > 0 and t.shape[0] == n and t.requires_grad:
                if leak(t, sample)[0] > 0:
                    where = name
                    break
    checks.check_batch_mixing(report, worst, where, has_bn, own=own)


# ------------------------------------------------------------------ copies, calls, hooks


def _device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _copy_to(value: Any, device: torch.device) -> Any:
    """A deep copy of a batch (tensors, tuples, lists, dicts) on `device`; the user's tensors are not touched."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device, copy=True)
    if isinstance(value, (tuple, list)):
        return type(value)(_copy_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _copy_to(v, device) for k, v in value.items()}
    return copy.deepcopy(value)


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy without layerwatch's own hooks (a monitor attached to `model` must not see the copy run)."""
    ours = [
        fn
        for m in model.modules()
        for attr in _HOOK_DICTS
        for fn in getattr(m, attr, {}).values()
        if (getattr(fn, "__module__", None) or "").startswith("client_hook.")
    ]
    memo: dict[int, Any] = {id(fn): fn for fn in ours}  # shared, not copied: they are removed below
    try:
        twin = copy.deepcopy(model, memo)
    except Exception as exc:
        raise TypeError(
            f"preflight works on a copy, and copy.deepcopy(model) raised {type(exc).__name__}: {exc}"
        ) from exc
    for m in twin.modules():
        for attr in _HOOK_DICTS:
            hooks = getattr(m, attr, None)
            if not hooks:
                continue
            for key in [
                k for k, fn in hooks.items() if (getattr(fn, "__module__", None) or "").startswith("client_hook.")
            ]:
                del hooks[key]
    return twin


def _call(model: nn.Module, x: Any) -> Any:
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def _shapes(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return str(tuple(value.shape))
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_shapes(v) for v in value) + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_shapes(v)}" for k, v in value.items()) + "}"
    return type(value).__name__


def _forward(model: nn.Module, x: Any, y: Any, loss_fn: Callable[..., torch.Tensor]) -> tuple[Any, torch.Tensor]:
    """model(x) and loss_fn(output, y), with errors that name the shapes involved."""
    try:
        out = _call(model, x)
    except Exception as exc:
        raise ValueError(f"model raised {type(exc).__name__} on input of shape {_shapes(x)}: {exc}") from exc
    try:
        loss = loss_fn(out, y)
    except Exception as exc:
        raise ValueError(
            f"loss_fn raised {type(exc).__name__} on output of shape {_shapes(out)} and targets of shape "
            f"{_shapes(y)}: {exc}"
        ) from exc
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn must return a tensor, but got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"loss_fn must return a single number, but got a tensor of shape {tuple(loss.shape)}")
    if not loss.requires_grad:
        raise ValueError("the loss does not require grad: no parameter of the model reaches it")
    return out, loss.reshape(())


class _Seen:
    """What one watched forward showed: start order, finishing order, outputs, the first non-finite one."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.finished: list[str] = []
        self.outputs: dict[str, torch.Tensor] = {}
        self.first_nonfinite: str | None = None


@contextlib.contextmanager
def _watch(model: nn.Module, names: dict[nn.Module, str]) -> Iterator[_Seen]:
    seen = _Seen()

    def start(module: nn.Module, args: Any) -> None:
        if names[module] not in seen.order:
            seen.order.append(names[module])

    def finish(module: nn.Module, args: Any, output: Any) -> None:
        name = names[module]
        if name in seen.outputs:
            return  # a module called twice: its first call stands
        out = first_float_tensor(output)
        if out is None:
            return
        seen.finished.append(name)
        seen.outputs[name] = out
        if seen.first_nonfinite is None and name and not bool(torch.isfinite(out.detach()).all()):
            seen.first_nonfinite = name

    handles = [h for m in names for h in (m.register_forward_pre_hook(start), m.register_forward_hook(finish))]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _named_params(model: nn.Module) -> list[tuple[str, str, nn.Parameter]]:
    """(module, name, parameter) for each parameter once; a tied one belongs to its first module."""
    seen: set[int] = set()
    out = []
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                out.append((module_name, name, p))
    return out


# ------------------------------------------------------------------ the optimizer


def _build_optimizer(optimizer: OptimizerArg, model: nn.Module, work: nn.Module) -> torch.optim.Optimizer:
    if optimizer is None:
        return torch.optim.Adam(work.parameters(), lr=DEFAULT_LR)
    if isinstance(optimizer, torch.optim.Optimizer):
        return _rebuild(optimizer, model, work)
    built = optimizer(work.parameters())
    if not isinstance(built, torch.optim.Optimizer):
        raise TypeError(f"the optimizer factory must return a torch.optim.Optimizer, but got {type(built).__name__}")
    return built


def _rebuild(optimizer: torch.optim.Optimizer, model: nn.Module, work: nn.Module) -> torch.optim.Optimizer:
    """The same optimizer class and param-group hyperparameters, over the copy's parameters (matched by name).

    Parameters the user's optimizer does not hold stay out of it here too, which
    is what `weights_not_updating` is there to find. The optimizer state
    (momentum, Adam moments) is not copied: this is a first step.
    """
    name_of = {id(p): name for name, p in model.named_parameters()}
    twin = dict(work.named_parameters())
    groups = []
    for group in optimizer.param_groups:
        params = [twin[name_of[id(p)]] for p in group["params"] if id(p) in name_of]
        if params:
            groups.append({**copy.deepcopy({k: v for k, v in group.items() if k != "params"}), "params": params})
    if not groups:
        raise ValueError(f"the {type(optimizer).__name__} passed as optimizer holds none of the model's parameters")
    try:
        return type(optimizer)(groups, **copy.deepcopy(optimizer.defaults))
    except TypeError:  # a custom optimizer whose defaults are not all constructor arguments
        return type(optimizer)(groups)


def _describe(opt: torch.optim.Optimizer) -> str:
    lrs = sorted({float(g["lr"]) for g in opt.param_groups if "lr" in g})
    return f"{type(opt).__name__}(lr={', '.join(f'{lr:g}' for lr in lrs)})" if lrs else type(opt).__name__


def _loss_kind(loss_fn: Callable[..., Any]) -> tuple[str | None, float]:
    """("cross_entropy" | "nll" | None, label smoothing) for the losses whose value at init is ln C."""
    smoothing = 0.0
    while isinstance(loss_fn, functools.partial):
        smoothing = float(loss_fn.keywords.get("label_smoothing", smoothing))
        loss_fn = loss_fn.func
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return "cross_entropy", float(loss_fn.label_smoothing)
    if isinstance(loss_fn, nn.NLLLoss):
        return "nll", 0.0
    if loss_fn is F.cross_entropy:
        return "cross_entropy", smoothing
    if loss_fn is F.nll_loss:
        return "nll", 0.0
    return None, 0.0


def _smoothing_floor(smoothing: float, classes: int | None) -> float:
    """The least cross-entropy with label smoothing eps over C classes: the entropy of the smoothed target."""
    if not smoothing or not classes or classes < 2:
        return 0.0
    on, off = 1 - smoothing + smoothing / classes, smoothing / classes
    return -(on * torch.tensor(on).log() + (classes - 1) * off * torch.tensor(off).log()).item()


# ------------------------------------------------------------------ RNG isolation


@contextlib.contextmanager
def _isolated_rng(device: torch.device) -> Iterator[None]:
    """Save torch (CPU, and CUDA if initialised), `random` and numpy RNG state; seed; restore on the way out.

    `torch.manual_seed` is avoided on purpose: with CUDA not yet initialised it
    queues a seed for later, which would change the user's CUDA stream.
    """
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    py = random.getstate()
    try:
        import numpy as np

        np_state: Any = np.random.get_state()
    except ImportError:  # numpy is optional for torch
        np, np_state = None, None
    grad_mode = torch.is_grad_enabled()
    try:
        torch.default_generator.manual_seed(PREFLIGHT_SEED)
        if device.type == "cuda":
            torch.cuda.manual_seed(PREFLIGHT_SEED)  # this device only; its state is restored below
        torch.set_grad_enabled(True)
        yield
    finally:
        torch.set_grad_enabled(grad_mode)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(py)
        if np is not None:
            np.random.set_state(np_state)
