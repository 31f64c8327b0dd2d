"""The always-on per-step signals (`wire.SIGNAL_FIELDS`): cheap, on device, every step.

Sampled statistics say how each layer is doing every few steps; these say,
for *every* optimizer step, what the diagnosis rules must never miss:

- the model's mode and its input batch (mean/std from a fixed strided subset,
  whether anything is non-finite, and a fingerprint that repeats when the same
  batch repeats) — read in a forward pre-hook on the top module;
- whether the model's output went non-finite — its sum, taken in a forward hook
  on the top module, is non-finite exactly when an element is (or the sum
  overflows float32, i.e. the output is absurd anyway); `isfinite()` itself is a
  composite op several times dearer. On the CPU, where reading the sum costs no
  device sync, the first few such forwards are *replayed* under `no_grad`
  with per-module hooks to name the first module whose output went non-finite
  (RNG state and module buffers are restored, so the replay leaves no trace);
- whether `.grad` still held the previous step's values when the next backward
  began (a tensor hook on the output fires at the very start of backward);
- every gradient's norm as the optimizer sees it (`torch._foreach_norm`, one
  fused call), for the global norm and to name gradients holding NaN/Inf.

All of it is packed into one small vector per step and copied to the host once
(non-blocking on CUDA; the sender thread waits, not training).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from client_hook.tensors import HostCopy, first_float_tensor

FINGERPRINT_ELEMENTS = 4096  # elements of the input that enter the fingerprint's weighted sum
MAX_LOCALISATIONS = 3  # non-finite forwards replayed per run to name the first bad module
TARGET_ELEMENTS = 1 << 16  # at most this many target elements are counted per step (strided)
STALE_PROBES = 1  # parameters whose .grad is checked at the start of the next backward

# Slots of the per-step vector; gradient norms follow them.
_IN_SUM, _IN_SUB_SUM, _IN_SUB_SQ, _IN_DOT, _OUT_SUM, _STALE, _GRAD_NORM = range(7)
_WIDTH = 7


@torch.no_grad()
def input_summary(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[sum, subset sum, subset sum of squares, subset weighted sum] of `x`, float64, on its device.

    One pass over the whole input (its sum: non-finite iff an element is, and
    half of the fingerprint); the rest reads a fixed strided subset of at most
    FINGERPRINT_ELEMENTS, which estimates mean and std well enough to tell
    standardized data from raw pixels, and costs the same for any batch size.
    """
    flat = x.detach().reshape(-1)
    subset = flat[:: subset_stride(flat.numel())][: weights.numel()]
    # float32 sums (a float64 accumulation of the whole input costs ~8x more on CPU);
    # the subset statistics are only compared with thresholds 1e-3 and 10.
    parts = [flat.sum(), subset.sum(), subset.dot(subset), subset.dot(weights[: subset.numel()].to(subset.dtype))]
    return torch.stack(parts).double()


def subset_stride(numel: int) -> int:
    """The stride of the strided input subset: at most FINGERPRINT_ELEMENTS elements are read."""
    return max(1, numel // FINGERPRINT_ELEMENTS)


class SignalsItem:
    """One step's signals, decoded into a `signals` frame in the sender thread."""

    def __init__(self, step: int, vector: torch.Tensor | None, labels: list[str], fields: dict[str, Any]) -> None:
        self.step, self.labels, self.fields = step, labels, fields
        self._copy = HostCopy(vector) if vector is not None else None  # the step's one small copy

    def frames(self) -> list[tuple[str, int, dict[str, Any]]]:
        fields = dict(self.fields)
        if self._copy is not None:
            v = self._copy.get().tolist()
            n = max(fields.pop("_input_n", 0), 1)
            if fields.pop("_has_input", False):
                finite = math.isfinite(v[_IN_SUM])
                mean = v[_IN_SUB_SUM] / n
                fields["input_mean"] = mean if finite else None
                fields["input_std"] = math.sqrt(max(v[_IN_SUB_SQ] / n - mean * mean, 0.0)) if finite else None
                fields["input_nonfinite"] = 0 if finite else 1  # "any", from the sum: no extra pass
                fields["input_fingerprint"] = f"{v[_IN_SUM]:.17g}/{v[_IN_DOT]:.17g}"
            if fields.pop("_has_output", False):
                fields["output_nonfinite"] = not math.isfinite(v[_OUT_SUM])
            if fields.pop("_has_stale", False):
                fields["grads_stale"] = bool(v[_STALE])
            if self.labels:
                norms = v[_WIDTH:]
                fields["grad_norm"] = v[_GRAD_NORM]
                fields["nonfinite_grads"] = [label for label, n in zip(self.labels, norms) if not math.isfinite(n)]
        return [("signals", self.step, fields)] if fields else []


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


class StepSignals:
    """The always-on hooks of one model; `end_step` packs and resets them."""

    def __init__(self, model: nn.Module, names: dict[nn.Module, str], params: list[tuple[str, nn.Parameter]]) -> None:
        """`params`: ("layer.param" label, parameter) in model order. Register `before_forward`
        and `after_forward` on the top module (forward pre-hook and hook, `with_kwargs=True`),
        wrapped so that they run only for grad-enabled forwards and never raise."""
        self.model, self._names, self._params = model, names, params
        self._weights: dict[torch.device, torch.Tensor] = {}
        self._localisations = 0
        self._replaying = False
        self._check_stale = False
        self._probes: list[nn.Parameter] = []
        self.optimized: set[int] | None = None  # ids of the optimizer's parameters, when there is one
        self._reset()

    def _reset(self) -> None:
        self._training: bool | None = None
        self._input: torch.Tensor | None = None
        self._input_n = 0
        self._output_sum: torch.Tensor | None = None
        self._stale: torch.Tensor | bool | None = None
        self._norms: torch.Tensor | None = None
        self._norm_labels: list[str] = []
        self._first_nonfinite: str | None = None
        self._rng: torch.Tensor | None = None

    # ------------------------------------------------------------ hooks

    def before_forward(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if self._replaying:
            return
        self._training = module.training
        x = first_float_tensor((args, kwargs))
        if x is None or x.numel() == 0:
            return
        if self._input is None:  # the step's first forward (gradient accumulation: its first micro-batch)
            weights = self._fingerprint_weights(x.device)
            self._input = input_summary(x, weights)
            self._input_n = min(len(range(0, x.numel(), subset_stride(x.numel()))), weights.numel())
        if x.device.type == "cpu" and self._localisations < MAX_LOCALISATIONS:
            self._rng = torch.get_rng_state()  # ~5 KB copy: lets a replay see the same dropout masks

    def after_forward(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if self._replaying:
            return
        out = first_float_tensor(output)
        if out is None:
            return
        total = out.detach().sum()  # non-finite iff an element is (a float64 sum costs ~8x more)
        self._output_sum = total if self._output_sum is None else self._output_sum + total
        if self._check_stale and out.requires_grad:
            out.register_hook(self._at_backward_start)
            self._check_stale = False
        # On the CPU the flag is already on the host: reading it costs nothing.
        if out.device.type == "cpu" and self._first_nonfinite is None and not math.isfinite(total.item()):
            if self._localisations < MAX_LOCALISATIONS and self._rng is not None:
                self._localisations += 1
                self._first_nonfinite = self._locate(args, kwargs)

    def _at_backward_start(self, grad: torch.Tensor) -> None:
        """Fires when backward reaches the model's output: no parameter gradient is added yet."""
        try:
            held = [p.grad for p in self._probes if p.grad is not None]
            if not held:  # zero_grad(set_to_none=True), the default: known clean, no tensor op
                self._stale = False
            else:
                with torch.no_grad():
                    self._stale = torch.stack([g.ne(0).any() for g in held]).any()
        except Exception:  # never into the user's backward; the signal is simply missing
            self._stale = None
        return None  # the gradient flows on unchanged

    # ------------------------------------------------------------ optimizer side

    def read_grad_norms(self) -> None:
        """Every gradient's L2 norm as the optimizer sees it; one fused call."""
        labelled = [(label, p.grad) for label, p in self._params if p.grad is not None and not p.grad.is_sparse]
        if not labelled:
            return
        self._norm_labels = [label for label, _ in labelled]
        norms = torch._foreach_norm([g.detach() for _, g in labelled])
        self._norms = torch.stack(norms).to(torch.float64)

    def grad_norms(self, count: int) -> torch.Tensor | None:
        """This step's gradient norms (float64, model order, gradients present and dense), if `count` of them
        were read: the collector reuses them as the exact norms of a sample's gradient rows."""
        return self._norms if self._norms is not None and self._norms.numel() == count else None

    def end_step(self, step: int) -> SignalsItem:
        """Pack this step's signals (one vector, one copy) and get ready for the next step."""
        device = next((t.device for t in (self._input, self._output_sum, self._norms) if t is not None), None)
        vector = None
        fields: dict[str, Any] = {}
        if self._training is not None:
            fields["training"] = self._training
        if self._first_nonfinite is not None:
            fields["first_nonfinite"] = self._first_nonfinite
        if device is not None:
            # One stack and one cat of 0-d tensors: a handful of tiny ops per step.
            nan = torch.full((), math.nan, dtype=torch.float64, device=device)
            head = list(self._input.unbind()) if self._input is not None else [nan] * 4
            head.append(self._output_sum if self._output_sum is not None else nan)
            if isinstance(self._stale, torch.Tensor):
                head.append(self._stale.to(torch.float64))
            else:  # None (not checked) or False (no gradient held at all)
                head.append(nan if self._stale is None else torch.zeros((), dtype=torch.float64, device=device))
            head.append(self._norms.norm() if self._norms is not None else nan)
            fields["_has_input"] = self._input is not None
            fields["_input_n"] = self._input_n
            fields["_has_output"] = self._output_sum is not None
            fields["_has_stale"] = self._stale is not None
            parts = [torch.stack(head)]
            if self._norms is not None:
                parts.append(self._norms)
            vector = torch.cat(parts) if len(parts) > 1 else parts[0]
        item = SignalsItem(step, vector, self._norm_labels if self._norms is not None else [], fields)
        # Only parameters the optimizer holds: optimizer.zero_grad() never zeroes the others,
        # so a parameter left out of the optimizer would look stale in a correct loop.
        held = [
            p for _, p in self._params if p.grad is not None and (self.optimized is None or id(p) in self.optimized)
        ]
        self._probes = held[-STALE_PROBES:]
        self._check_stale = True
        self._reset()
        return item

    # ------------------------------------------------------------ localisation

    def _locate(self, args: Any, kwargs: Any) -> str | None:
        """Replay this forward to find the first module (in the order outputs were produced) gone non-finite.

        Runs under no_grad with the RNG state of the original forward and
        restores RNG and buffers afterwards, so training sees no difference.
        """
        x = first_float_tensor((args, kwargs))
        if x is not None and not bool(torch.isfinite(x).all()):
            return "input"
        found: list[str] = []

        def spot(module: nn.Module, _args: Any, output: Any) -> None:
            out = first_float_tensor(output)
            if not found and out is not None and not bool(torch.isfinite(out).all()):
                found.append(self._names.get(module, "?"))

        handles = [m.register_forward_hook(spot) for m in self._names if m is not self.model]
        rng_after = torch.get_rng_state()
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        self._replaying = True
        try:
            torch.set_rng_state(self._rng)
            with torch.no_grad():
                self.model(*args, **kwargs)
        finally:
            self._replaying = False
            for handle in handles:
                handle.remove()
            torch.set_rng_state(rng_after)
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
        return found[0] if found else self._names.get(self.model, "")

    def _fingerprint_weights(self, device: torch.device) -> torch.Tensor:
        weights = self._weights.get(device)
        if weights is None:
            # Fixed, position-dependent weights: a reordered batch changes the fingerprint.
            weights = torch.linspace(1.0, 2.0, FINGERPRINT_ELEMENTS, device=device)
            self._weights[device] = weights
        return weights


def target_counts(step: int, targets: Any) -> SignalsItem | None:
    """The class counts of `mon.log(targets=...)` as a signals item; None if they are not class labels."""
    if not isinstance(targets, torch.Tensor) or targets.numel() == 0:
        return None
    if targets.is_floating_point() or targets.is_complex():
        return None  # regression targets (or one-hot/soft labels): no classes to count
    flat = targets.detach().reshape(-1)
    flat = flat[:: max(1, flat.numel() // TARGET_ELEMENTS)]
    return _TargetCounts(step, flat)


class _TargetCounts(SignalsItem):
    """Targets copied to the host without waiting; counted in the sender thread."""

    def __init__(self, step: int, flat: torch.Tensor) -> None:
        # A CPU tensor is cloned (at most TARGET_ELEMENTS): the caller may reuse its buffer.
        super().__init__(step, flat if flat.device.type == "cuda" else flat.clone(), [], {})

    def frames(self) -> list[tuple[str, int, dict[str, Any]]]:
        values, counts = torch.unique(self._copy.get(), return_counts=True)
        counts_by_class = {str(int(v)): int(c) for v, c in zip(values.tolist(), counts.tolist())}
        return [("signals", self.step, {"target_counts": counts_by_class})]
