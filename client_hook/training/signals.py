"""The always-on per-step signals (`wire.SIGNAL_FIELDS`): cheap, on device, every step.

Sampled statistics say how each layer is doing every few steps; these say,
for *every* optimizer step, what the diagnosis rules must never miss:

- the model's mode and its input batch (mean/std and a fingerprint that repeats
  when the same batch repeats, from a fixed strided subset of 256 elements; the
  NaN/Inf count) — read in a forward pre-hook on the top module; on the CPU the
  input is counted whole only when the output went non-finite (NaN/Inf reach it);
- whether the model's output went non-finite — its sum, taken in a forward hook
  on the top module, is non-finite exactly when an element is (or the sum
  overflows float32, i.e. the output is absurd anyway); `isfinite()` itself is a
  composite op several times dearer. On the CPU, where reading the sum costs no
  device sync, the first few such forwards are *replayed* under `no_grad`
  with per-module hooks to name the first module whose output went non-finite
  (RNG state and module buffers are restored, so the replay leaves no trace);
- whether `.grad` still held the previous step's values in every backward of
  the next step (a hook on one parameter, registered once, fires when its new
  gradient is ready and before it is added to `.grad`);
- every gradient's norm as the optimizer sees it (`torch._foreach_norm`, one
  fused call): sent per tensor (`grad_norms`, 4 significant digits, null where a
  parameter has no gradient), so the rules that judge gradients layer by layer
  (vanishing, dead network, parameters that never get one) read every step, not
  only the sampled ones; also the global norm and the gradients holding NaN/Inf.

Every op costs ~2-10 us of dispatch on the CPU whatever its size, so the
per-step work is ~8 ops in all (one full pass: the gradient norms), and nothing
but the output's sum is read back in the training thread: on the CPU the 0-d
results are read at the end of the step (~0.3 us each, no sync there); on other
devices they are packed into one small vector and copied to the host once,
non-blocking (the sender thread waits, not training).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from client_hook.training import stats, updates
from client_hook.training.tensors import HostCopy, batch_tensor, first_float_tensor

FINGERPRINT_ELEMENTS = 256  # strided input elements read for mean, std (error ~1/16 of std) and the fingerprint
MAX_LOCALISATIONS = 3  # non-finite forwards replayed per run to name the first bad module
TARGET_ELEMENTS = 1 << 16  # at most this many target elements are counted per step (strided)
PROBE_ELEMENTS = 1024  # gradient elements read at the start of backward to tell stale from zeroed
OUTPUT_STEPS = 60  # the first steps whose output is probed (what kind of numbers the model returns) ...
OUTPUT_EVERY = 50  # ... and every this many steps after them
OUTPUT_ROWS = 64  # output rows (along the last dimension) the probe reads
KEEP_STEPS = 20  # the first steps whose probability outputs are kept until log(targets=...) to name the loss
KEEP_NUMEL = 1 << 20  # ... if at most this many elements (a reference, not a copy)
PROB_ATOL = 1e-3  # rows are probabilities when non-negative and summing to 1 this closely (preflight's)
NORM_DIGITS = 4  # significant digits of each per-tensor gradient norm sent every step
PROBE_MIN_NUMEL = 8  # the probe is the smallest parameter of at least this size (a bias, usually)
# Modules that draw random numbers in training mode: their forwards are replayed with the same RNG state.
RANDOM_MODULES: tuple[type[nn.Module], ...] = (nn.modules.dropout._DropoutNd, nn.RReLU)


def input_summary(
    x: torch.Tensor, weights: torch.Tensor, stride: int, *, whole: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """([subset sum, subset weighted sum], subset sum of squares, sum of all of `x` if `whole`), in x's dtype.

    `weights` is `subset_weights(...)`, a (2, n) matrix of ones and fixed position
    weights; n and `stride` are `input_layout(x.shape)`. The strided subset of n
    elements estimates mean and std well enough to tell standardized data from raw
    pixels (the rules compare them with 1e-3 and 10) and fingerprints the batch (its
    sum and position-weighted sum), at the same cost for any batch size: a view and
    two ops (mv, dot), each ~2-10 us of dispatch on the CPU. The sum of the whole
    input (non-finite iff an element is) is one more op and a full pass; on the CPU
    the hooks skip it, as a non-finite input shows in the output's sum, read there
    anyway (`nonfinite_count`). Call it under no_grad (the hooks run there).
    """
    flat = x if x.is_contiguous() else x.reshape(-1)  # a copy only for a non-contiguous input
    subset = flat.as_strided((weights.shape[1],), (stride,))  # a view, in storage order
    if subset.dtype != weights.dtype:  # float16/bfloat16: sums in float32 (65504 is float16's largest)
        subset = subset.to(weights.dtype)
    total = flat.sum(dtype=_sum_dtype(x.dtype)) if whole else None
    return torch.mv(weights, subset), subset.dot(subset), total


def _sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precisions (a float16 sum of a large input or output overflows to inf: a false
    "non-finite"), the dtype itself otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def nonfinite_count(x: torch.Tensor) -> int:
    """NaN/Inf elements of `x`: a host read, for the rare step whose output went non-finite (CPU)."""
    return x.numel() - int(torch.isfinite(x).sum())


def input_layout(shape: tuple[int, ...]) -> tuple[int, int]:
    """(n, stride) of an input's strided subset: at most FINGERPRINT_ELEMENTS elements, a prime stride
    that divides no dimension (`stats.prime_stride`), so the subset crosses every row and column."""
    stride = stats.prime_stride(tuple(shape), FINGERPRINT_ELEMENTS)
    return -(-math.prod(shape) // stride), stride


def subset_weights(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[ones; linspace(1, 2)] of width n: one mv gives the subset's sum and its position-weighted sum
    (fixed, position-dependent weights: a reordered batch changes the fingerprint)."""
    return torch.stack([torch.ones(n), torch.linspace(1.0, 2.0, n)]).to(dtype=dtype, device=device)


class SignalsItem:
    """One step's signals as the training thread left them; the `signals` frame is made in the sender thread.

    `values` are 0-d tensors (or floats already on the host) in a fixed order: on
    the CPU they are read into floats when the item is made (so the queue holds no
    tensor); on other devices they are packed into one vector and copied to the
    host once, non-blocking (`packed`), and the sender thread waits for that copy.
    """

    __slots__ = ("step", "fields", "values", "labels", "present", "input_n", "tokens", "ratios", "_copy")

    def __init__(
        self,
        step: int,
        fields: dict[str, Any],
        values: list[Any],
        labels: list[str],
        input_n: int,
        packed: bool,
        tokens: bool = False,
        present: list[bool] | None = None,
        ratios: tuple[updates.UpdateProbe, int] | None = None,
    ) -> None:
        """`tokens`: the input batch is integer (token ids): fingerprinted, but a mean and std of ids mean nothing.
        `present`: per model tensor, whether it had a gradient (whose norm is among `values`, in that order).
        `ratios`: the update probe and how many update ratios are among `values` (before the norms)."""
        self.step, self.fields, self.labels, self.input_n, self.tokens = step, fields, labels, input_n, tokens
        self.present = present or []
        self.ratios = ratios
        self._copy = HostCopy(_pack(values)) if packed else None
        # On the CPU the values are read now, in the training thread (~0.3 us each): an item waits
        # up to a sender window (several steps) in the queue, and small tensors kept alive that
        # long fragment the heap under the training's own large buffers, which then come back
        # as fresh pages every step (measured: CNN +5% a step with 4 steps' items held).
        self.values: list[float] = [] if packed else _host_values(values)

    def frames(self) -> list[tuple[str, int, dict[str, Any]]]:
        fields = dict(self.fields)
        v = self._copy.get().tolist() if self._copy is not None else self.values
        at = 0
        if self.input_n:
            sub_sum, sub_dot, sub_sq = v[0:3]  # the order end_step appends them in
            at = 3
            if "input_nonfinite" in fields and fields["input_nonfinite"] is None:
                fields["input_nonfinite"] = 0 if math.isfinite(v[3]) else 1  # "any", from the whole input's sum
                at = 4
            mean = sub_sum / self.input_n
            std = math.sqrt(max(sub_sq / self.input_n - mean * mean, 0.0)) if math.isfinite(sub_sq) else math.nan
            finite = not fields.get("input_nonfinite") and math.isfinite(mean) and math.isfinite(std)
            if not self.tokens:  # token ids are labels, not magnitudes: no normalisation to judge
                fields["input_mean"] = mean if finite else None
                fields["input_std"] = std if finite else None
            fields["input_fingerprint"] = f"{sub_sum:.17g}/{sub_dot:.17g}"
        if "output_nonfinite" in fields:
            fields["output_nonfinite"] = not math.isfinite(v[at])
            at += 1
        if fields.get("output_info", {}).pop("pending", False):
            fields["output_info"].update(zip(PROBE_STATS, v[at : at + len(PROBE_STATS)]))
            at += len(PROBE_STATS)
            if fields["output_info"].pop("grad_pending", False):
                fields["output_info"].update(_implied_targets(v[at : at + len(GRAD_PROBE_STATS)]))
                at += len(GRAD_PROBE_STATS)
        if "grads_stale" in fields:
            fields["grads_stale"] = v[at] != 0  # max |g| of the probe: any non-zero (or NaN) element
            at += 1
        if self.ratios is not None:
            probe, count = self.ratios
            fields["update_ratios"] = probe.per_tensor(v[at : at + count])
            at += count
        if self.labels:
            norms = v[at:]
            # The global L2 norm, summed in float64 here: inf if a norm is inf, NaN if one is NaN.
            fields["grad_norm"] = math.sqrt(sum(n * n for n in norms))
            fields["nonfinite_grads"] = [label for label, n in zip(self.labels, norms) if not math.isfinite(n)]
            if self.present:
                fields["grad_norms"] = _per_tensor(self.present, norms)
        return [("signals", self.step, fields)] if fields else []


def _per_tensor(present: list[bool], norms: list[float]) -> list[float | None]:
    """One entry per model tensor: its norm to NORM_DIGITS significant digits (the rules compare ratios
    of 1e-5 and exact zeros; full precision would double the frame), None where it had no gradient."""
    found = iter(norms)
    return [float(f"{next(found):.{NORM_DIGITS}g}") if has else None for has in present]


def _host_values(values: list[Any]) -> list[float]:
    """The values as floats, flattened (CPU tensors and floats: read in place, no copy)."""
    out: list[float] = []
    for value in values:
        read = value.tolist() if isinstance(value, torch.Tensor) else value
        if isinstance(read, list):
            out.extend(read)
        else:
            out.append(float(read))
    return out


def _pack(values: list[Any]) -> torch.Tensor:
    """One float64 vector of a step's values (0-d and 1-d tensors, floats) for a single host copy.

    Floats become `torch.full` on the tensors' device (a fill kernel; `torch.tensor(x, device=...)`
    would be a blocking host-to-device copy). cat promotes dtypes: bool, float16, float32 -> one dtype.
    """
    device = next(t.device for t in values if isinstance(t, torch.Tensor))
    parts = [
        (t if t.dim() == 1 else t.reshape(1))
        if isinstance(t, torch.Tensor)
        else torch.full((1,), t, dtype=torch.float64, device=device)
        for t in values
    ]
    return torch.cat(parts).to(torch.float64)


class StepSignals:
    """The always-on hooks of one model; `end_step` hands the step over and resets them.

    Per step on the CPU: a view and 2 ops for the input, 1 for the output (read at
    once), 2 for the stale probe, 1 fused call for the gradient norms; nothing is
    packed or copied, the 0-d results are read at the step's end. When packing (off
    the CPU): the whole input's sum, one cat, one non-blocking copy more.
    """

    def __init__(
        self,
        model: nn.Module,
        names: dict[nn.Module, str],
        params: list[tuple[str, nn.Parameter]],
        pack: bool | None = None,
    ) -> None:
        """`params`: ("layer.param" label, parameter) in model order. Register `before_forward`
        and `after_forward` on the top module (forward pre-hook and hook, `with_kwargs=True`),
        wrapped so that they run only for grad-enabled forwards and never raise. `pack`: copy
        the step's values to the host as one vector (default: on every device but the CPU)."""
        self.model, self._names, self._params = model, names, params
        self.pack = pack
        self._layouts: dict[tuple[torch.Size, torch.dtype, torch.device], tuple[int, int, torch.Tensor]] = {}
        self._localisations = 0
        self._replaying = False
        self._check_stale = False
        self._probe: nn.Parameter | None = None
        self._probe_handle: RemovableHandle | None = None
        small = sorted((p for _, p in params if p.numel() >= PROBE_MIN_NUMEL), key=lambda p: p.numel())
        self._by_size = small + sorted((p for _, p in params if p.numel() < PROBE_MIN_NUMEL), key=lambda p: -p.numel())
        self.optimized: set[int] | None = None  # ids of the optimizer's parameters, when there is one
        # The RNG state is kept for a replay only if a module draws random numbers (get_rng_state
        # is a ~5 KB copy, ~5-8 us a step); a functional dropout in a custom forward is not seen,
        # and its replay then draws other masks (the bad module is usually named all the same).
        self._random = any(isinstance(m, RANDOM_MODULES) for m in model.modules())
        self._labels: list[str] = []
        self._half = any(p.dtype in (torch.float16, torch.bfloat16) for _, p in params)  # fixed at attach
        self._present: list[bool] = []  # which parameters had a gradient when `_labels` was built
        self._updates = updates.UpdateProbe([p for _, p in params])
        self._steps = 0  # steps ended so far (the output probe's schedule)
        # (step, output shape, the output if it may be probabilities): read by `target_check` at log().
        self.last_output: tuple[int, list[int], torch.Tensor | None] | None = None
        self._reset()

    def _reset(self) -> None:
        self._training: bool | None = None
        self._input: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        self._input_n = 0
        self._input_tokens = False
        self._input_nonfinite: int | None = None  # counted on the host (CPU), from the output's sum
        self._output_sum: torch.Tensor | float | None = None
        self._output: tuple[list[int], torch.Tensor | None, torch.Tensor | None] | None = None
        self._output_grad: list[torch.Tensor] = []  # filled by `output_grad_probe` in the step's backward
        self._stale: torch.Tensor | float | None = None
        self._ratios: torch.Tensor | None = None  # this step's update ratios (`updates.due` steps)
        self._norms: list[torch.Tensor] | None = None
        self._device: torch.device | None = None
        self._first_nonfinite: str | None = None
        self._rng: torch.Tensor | None = None

    # ------------------------------------------------------------ hooks

    def before_forward(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if self._replaying:
            return
        self._training = module.training
        x = batch_tensor(args, kwargs)  # float features or integer token ids; never a 0-d keyword
        if x is None:
            return
        if self._input is None:  # the step's first forward (gradient accumulation: its first micro-batch)
            tokens = not x.is_floating_point()
            key = (x.shape, x.dtype, x.device)
            layout = self._layouts.get(key)
            if layout is None:  # once per input shape: (n, stride, weights)
                n, stride = input_layout(x.shape)
                # Token ids summed in float64: exact for any vocabulary (< 2**53), so equal batches match.
                dtype = torch.float64 if tokens else _sum_dtype(x.dtype)
                layout = self._layouts[key] = (n, stride, subset_weights(n, dtype, x.device))
            n, stride, weights = layout
            # The whole input's sum where the output's sum is not read in the training thread (packed);
            # integers are never non-finite.
            self._input = input_summary(x, weights, stride, whole=self._packs(x.device) and not tokens)
            self._input_n = n
            self._input_tokens = tokens
            if tokens:
                self._input_nonfinite = 0
            self._device = x.device
        if self._random and x.device.type == "cpu" and self._localisations < MAX_LOCALISATIONS:
            self._rng = torch.get_rng_state()  # ~5 KB copy: lets a replay see the same dropout masks

    def after_forward(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if self._replaying:
            return
        out = first_float_tensor(output)
        if out is None:
            return
        if self._output is None and (self._steps < OUTPUT_STEPS or self._steps % OUTPUT_EVERY == 0):
            self._output = output_probe(out, keep=self._steps < KEEP_STEPS)  # the step's first forward only
            if self._output[1] is not None:
                self._output_grad = []
                output_grad_probe(out, self._output_grad)
        # Non-finite iff an element is (or it overflows float32: absurd anyway); hooks run under no_grad.
        total = out.sum(dtype=_sum_dtype(out.dtype))
        if out.device.type != "cpu":  # reading it would be a device sync: the sender thread reads it
            self._output_sum = total if self._output_sum is None else self._output_sum + total
            self._device = self._device or out.device
            return
        # On the CPU the sum is already on the host: reading it costs ~1 us and no sync.
        value = total.item()
        self._output_sum = value if self._output_sum is None else self._output_sum + value
        if self._input is not None and self._input[2] is None and self._input_nonfinite is None:
            # The input's NaN/Inf would have reached the output: count them only then (a rare full pass).
            x = batch_tensor(args, kwargs) if not math.isfinite(value) else None
            self._input_nonfinite = nonfinite_count(x) if x is not None else 0
        if self._first_nonfinite is None and not math.isfinite(value):
            if self._localisations < MAX_LOCALISATIONS:
                self._localisations += 1
                self._first_nonfinite = self._locate(args, kwargs)

    def _at_probe_grad(self, grad: torch.Tensor) -> None:
        """Fires in every backward when the probe's new gradient is ready, before it is added to `.grad`.

        Stale means no backward of the step found `.grad` clean (None or zero): each
        backward between two optimizer steps looks, and the smallest 1-norm it saw is
        kept. A loop that never zeroes finds the previous step's values every time;
        gradient accumulation zeroes after the step, so its first micro-batch finds
        zeros; a GAN's discriminator gets a gradient from the generator's backward
        right after its own step (stale there), then is zeroed before its own next
        backward (clean): not flagged, rightly. Once one backward found it clean the
        step is known clean and the others do not look.
        """
        if not self._check_stale:
            return None
        enabled = torch.is_grad_enabled()  # backward with create_graph=True runs with grad mode on
        torch._C._set_grad_enabled(False)
        try:
            held = self._probe.grad if self._probe is not None else None
            if held is None:  # zero_grad(set_to_none=True), the default: known clean, no tensor op
                self._stale = 0.0
                self._check_stale = False
            else:
                # The 1-norm (no squares to underflow) of a strided subset of a small parameter's gradient:
                # zeroed gradients give exactly 0, what the previous step left gives > 0 (or NaN). One op
                # and a view (the inf-norm would be ~30x dearer on the CPU, a bool mask ~10x); one more
                # (the minimum) from the step's second backward on.
                flat = held if held.is_contiguous() else held.reshape(-1)
                n = min(flat.numel(), PROBE_ELEMENTS)
                norm = torch.linalg.vector_norm(flat.as_strided((n,), (flat.numel() // n,)), 1)
                self._stale = norm if self._stale is None else torch.minimum(self._stale, norm)
        except Exception:  # never into the user's backward; the signal is simply missing
            self._stale = None
            self._check_stale = False
        finally:
            torch._C._set_grad_enabled(enabled)
        return None  # the gradient flows on unchanged

    def _watch(self, probe: nn.Parameter | None) -> None:
        """Hook `probe` (once; again only when the probe changes): no per-step registration (~5-15 us)."""
        if probe is self._probe:
            return
        self.remove()
        if probe is not None and probe.requires_grad:
            self._probe_handle = probe.register_hook(self._at_probe_grad)
            self._probe = probe

    def remove(self) -> None:
        """Remove the probe's hook (the top module's hooks are the collector's); safe twice."""
        if self._probe_handle is not None:
            self._probe_handle.remove()
        self._probe, self._probe_handle = None, None

    # ------------------------------------------------------------ optimizer side

    def read_grad_norms(self) -> None:
        """Every gradient's L2 norm as the optimizer sees it; one fused call, nothing read back."""
        grads, present = [], []
        for _, p in self._params:
            g = p.grad
            dense = g is not None and not g.is_sparse
            present.append(dense)
            if dense:
                grads.append(g)
        if not grads:
            return
        if present != self._present:  # labels rebuilt only when the set of gradients changes
            self._present = present
            self._labels = [label for (label, _), has in zip(self._params, present) if has]
        # Hooks run under no_grad: no detach needed. Half-precision norms in float32: a float16 norm
        # past 65504 would name a healthy gradient non-finite.
        self._norms = torch._foreach_norm(grads, 2, dtype=torch.float32) if self._half else torch._foreach_norm(grads)
        self._device = self._device or grads[0].device

    def before_update(self, step: int) -> None:
        """Before optimizer step `step` updates the weights: copy their subsets if the step is read."""
        if updates.due(step):
            self._updates.before_step()

    def after_update(self) -> None:
        """After the update: this step's ratios, if read before it (sent with the step's signals)."""
        self._ratios = self._updates.after_step()
        if self._ratios is not None:
            self._device = self._device or self._ratios.device

    def grad_norms(self, count: int) -> list[torch.Tensor] | None:
        """This step's gradient norms (0-d tensors, model order, gradients present and dense), if `count` of
        them were read: the collector reuses them as the exact norms of a sample's gradient rows."""
        return self._norms if self._norms is not None and len(self._norms) == count else None

    def end_step(self, step: int, *, skipped: bool = False) -> SignalsItem:
        """Hand this step's signals over (on the CPU read as floats, no tensor op) and get ready for the next step.

        `skipped`: the step's optimizer step did not run (AMP); sent as `skipped: true`, absent otherwise.
        """
        fields: dict[str, Any] = {}
        values: list[Any] = []
        if skipped:
            fields["skipped"] = True
        if self._training is not None:
            fields["training"] = self._training
        if self._first_nonfinite is not None:
            fields["first_nonfinite"] = self._first_nonfinite
        if self._input is not None:
            sums, sub_sq, total = self._input
            values += [sums, sub_sq]  # sums: [subset sum, subset weighted sum]
            if self._input_nonfinite is not None:
                fields["input_nonfinite"] = self._input_nonfinite
            elif total is not None:
                fields["input_nonfinite"] = None  # filled in by the sender thread from the whole input's sum
                values.append(total)
            # else (CPU, no floating output to tell by): not observed, the field stays absent
        if self._output_sum is not None:
            fields["output_nonfinite"] = None  # filled in by the sender thread
            values.append(self._output_sum)
        if self._output is not None:
            shape, probe, kept = self._output
            fields["output_info"] = {"shape": shape}
            if probe is not None:
                fields["output_info"]["pending"] = True  # its statistics are filled in by the sender thread
                values.append(probe)
                if self._output_grad:  # the backward reached the output (it has before the optimizer steps)
                    fields["output_info"]["grad_pending"] = True
                    values.append(self._output_grad[0])
            self.last_output = (step, shape, kept)
        if self._stale is not None:
            fields["grads_stale"] = None
            values.append(self._stale)
        if self._ratios is not None:
            values.append(self._ratios)
        if self._norms is not None:
            values += self._norms
        item = SignalsItem(
            step,
            fields,
            values,
            self._labels if self._norms is not None else [],
            self._input_n if self._input is not None else 0,
            packed=self._packs() and any(isinstance(v, torch.Tensor) for v in values),  # floats are on the host
            tokens=self._input_tokens,
            present=self._present if self._norms is not None else None,
            ratios=(self._updates, len(self._ratios)) if self._ratios is not None else None,
        )
        self._watch(self._probe_candidate())
        self._check_stale = True
        self._steps += 1
        self._reset()
        return item

    def _packs(self, device: torch.device | None = None) -> bool:
        """Whether this step's values go to the host as one packed copy (`pack`; default: off the CPU)."""
        device = device or self._device
        if self.pack is not None:
            return self.pack
        return device is not None and device.type != "cpu"

    def _probe_candidate(self) -> nn.Parameter | None:
        """The smallest parameter (of at least PROBE_MIN_NUMEL elements, if any) holding a gradient
        that the optimizer steps: usually found at the first look in `_by_size`.

        Only those: optimizer.zero_grad() never zeroes the others, so a parameter
        left out of the optimizer would look stale in a correct loop.
        """
        for p in self._by_size:
            if p.grad is not None and (self.optimized is None or id(p) in self.optimized):
                return p
        return None

    # ------------------------------------------------------------ localisation

    def _locate(self, args: Any, kwargs: Any) -> str | None:
        """Replay this forward to find the first module (in the order outputs were produced) gone non-finite.

        Runs under no_grad with the RNG state of the original forward (when a module
        draws random numbers) and restores RNG and buffers afterwards, so training
        sees no difference.
        """
        x = batch_tensor(args, kwargs)
        if x is not None and x.is_floating_point() and not bool(torch.isfinite(x).all()):
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
            if self._rng is not None:  # kept when a module draws random numbers: the same masks again
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


# What `output_probe` measures on the output's first OUTPUT_ROWS rows (along its last dimension).
PROBE_STATS: tuple[str, ...] = ("min", "max", "row_sum_error", "logsumexp", "p_max", "p_min")


def output_probe(out: torch.Tensor, *, keep: bool) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
    """(shape, statistics, kept) of the model's output at one training forward (under no_grad).

    The statistics (PROBE_STATS, one small vector, read with the step's other values)
    say what kind of numbers the model returns: probabilities have min >= 0, max <= 1
    and rows summing to 1 (`row_sum_error`); `logsumexp`, `p_max` and `p_min` are
    row means, what a cross-entropy applied to those rows would make of them. ~8 ops
    on at most OUTPUT_ROWS rows, in the first OUTPUT_STEPS steps and every
    OUTPUT_EVERY steps. `kept`: the output itself (a reference, no copy) when
    `keep` and it is small, for `target_check` to compare the logged loss with.
    """
    shape = list(out.shape)
    kept = out.detach() if keep and out.numel() <= KEEP_NUMEL else None
    if out.dim() < 2 or out.shape[-1] < 2:
        return shape, None, kept  # no class dimension: a regression output, a scalar loss
    rows = out[_probe_rows(out)].reshape(-1, out.shape[-1]).float()  # a small copy: <= 64 rows
    row_max, row_min = rows.amax(-1), rows.amin(-1)
    stats = torch.stack(
        [
            row_min.min(),
            row_max.max(),
            (rows.sum(-1) - 1).abs().max(),
            rows.logsumexp(-1).mean(),
            row_max.mean(),
            row_min.mean(),
        ]
    )
    return shape, stats, kept


def _probe_rows(out: torch.Tensor) -> tuple[slice, ...]:
    """The index of the output's first rows the probes read (at most OUTPUT_ROWS of its last dimension)."""
    return (slice(0, OUTPUT_ROWS),) if out.dim() == 2 else tuple(slice(0, 8) for _ in range(out.dim() - 1))


# What `output_grad_probe` measures of the gradient the loss sends back to the output's probed rows g,
# with s = softmax(rows): the largest |row sum of g| relative to the rows' mean |g| sum, and of
# t = s - n*g (n the output's row count: a mean-reduced loss) and of t = s - g (a summed one), the
# smallest element, the rows' mean largest element and the largest second-largest element.
GRAD_PROBE_STATS: tuple[str, ...] = (
    "grad_row_sum",
    "mean_min",
    "mean_peak",
    "mean_second",
    "sum_min",
    "sum_peak",
    "sum_second",
)


def output_grad_probe(out: torch.Tensor, slot: list[torch.Tensor]) -> None:
    """Register a hook on the output that puts GRAD_PROBE_STATS of its gradient in `slot` when the backward
    reaches it: what the loss did with these rows, read from its gradient alone (no targets, no loss tensor).

    A loss that applies a softmax to its input (cross_entropy, which takes logits) is blind to a constant
    added to a row, so the rows of its gradient sum to 0; and cross_entropy's gradient is
    (softmax(rows) - targets) / n, so s - n*g gives back the targets: one-hot (or label-smoothed) rows.
    For rows that are already probabilities that is the double softmax, told apart from the right losses
    (NLL of their log, BCE, MSE), whose gradients do neither. ~10 ops on <= OUTPUT_ROWS rows, on probed
    steps only; the tensors are read with the step's other values.
    """
    if not out.requires_grad or out.dim() < 2 or out.shape[-1] < 3:
        return  # two classes: s - n*g of an MSE on one-hot targets is one-hot too, near uniform outputs
    lead, classes = _probe_rows(out), out.shape[-1]
    rows_total = out.numel() // classes
    with torch.no_grad():
        soft = out.detach()[lead].reshape(-1, classes).float().softmax(-1)

    def at_grad(grad: torch.Tensor) -> None:
        try:
            with torch.no_grad():
                g = grad[lead].reshape(-1, classes).float()
                scale = g.abs().sum(-1).mean().clamp_min(torch.finfo(torch.float32).tiny)
                parts = [g.sum(-1).abs().max() / scale]
                for t in (soft - g * rows_total, soft - g):
                    top = t.topk(2, dim=-1).values
                    parts += [t.amin(), top[:, 0].mean(), top[:, 1].max()]
                slot[:] = [torch.stack(parts)]
        except Exception:  # never into the user's backward: the reading is simply missing
            slot.clear()

    out.register_hook(at_grad)


def _implied_targets(values: list[float]) -> dict[str, Any]:
    """output_info's reading of the output's gradient (GRAD_PROBE_STATS): "grad_row_sum" and, of the two
    reductions, the one whose implied targets are nearer one-hot rows: "targets_min", "targets_peak"
    and "targets_second" of s - n*g or s - g, and "reduction" ("mean" or "sum")."""
    stats = dict(zip(GRAD_PROBE_STATS, values))
    off = {  # how far each reading is from one-hot rows (0 for a one-hot row)
        r: abs(stats[f"{r}_peak"] - 1) + max(0.0, -stats[f"{r}_min"]) + max(0.0, stats[f"{r}_second"])
        for r in ("mean", "sum")
    }
    reduction = "sum" if off["sum"] < off["mean"] else "mean"  # NaN: "mean", the usual one
    return {
        "grad_row_sum": stats["grad_row_sum"],
        "targets_min": stats[f"{reduction}_min"],
        "targets_peak": stats[f"{reduction}_peak"],
        "targets_second": stats[f"{reduction}_second"],
        "reduction": reduction,
    }


def target_check(step: int, targets: Any, loss: Any, last_output: Any) -> _TargetCheck | None:
    """What `log(targets=..., loss=...)` can tell about how the output meets the targets, as a signals item.

    Always the targets' shape and kind (class labels or floats), for shape_mismatch
    against the step's output shape. When the step's output was kept and its rows are
    probabilities, also which losses of those probabilities equal the logged loss:
    "cross_entropy" (the rows taken as logits: a double softmax) and "nll_of_log"
    (-log p of the target: right). A few ops on at most KEEP_NUMEL elements, in the
    first KEEP_STEPS steps only.
    """
    if not isinstance(targets, torch.Tensor) or last_output is None or last_output[0] != step:
        return None
    try:
        return _TargetCheck(step, _target_info(targets, loss, last_output[2]))
    except Exception:  # never into the user's log(): the check is simply missing
        return None


# Elementwise regression losses the client tries, broadcast and aligned, against the logged loss.
REGRESSION_LOSSES = {
    "mse": torch.nn.functional.mse_loss,
    "l1": torch.nn.functional.l1_loss,
    "smooth_l1": torch.nn.functional.smooth_l1_loss,
}


def _matches(value: float, logged: float) -> bool:
    return abs(value - logged) <= 1e-3 * max(1.0, abs(logged))


def _regression_matches(kept: torch.Tensor, targets: torch.Tensor, logged: float) -> dict[str, list[str]]:
    """Which elementwise losses equal the logged loss with the output broadcast against the targets (the
    bug) and with it reshaped to the targets' shape (what a squeeze in the loop does)."""
    out, y = kept.float(), targets.to(kept.device).float()
    broadcast, aligned = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch warns of the broadcast: the user's own loss already did
        for name, fn in REGRESSION_LOSSES.items():
            if _matches(float(fn(out, y)), logged):
                broadcast.append(name)
            if out.numel() == y.numel() and _matches(float(fn(out.reshape(y.shape), y)), logged):
                aligned.append(name)
    return {"broadcast_matches": broadcast, "aligned_matches": aligned}


def _target_info(targets: torch.Tensor, loss: Any, kept: torch.Tensor | None) -> dict[str, Any]:
    info: dict[str, Any] = {"shape": list(targets.shape), "float": targets.is_floating_point()}
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        logged: float | None = float(loss.detach())
    elif isinstance(loss, (int, float)) and not isinstance(loss, bool):
        logged = float(loss)
    else:
        logged = None
    if kept is None or logged is None:
        return info
    if targets.is_floating_point():
        if tuple(kept.shape) != tuple(targets.shape) and targets.numel() <= KEEP_NUMEL:
            with torch.no_grad():
                info.update(_regression_matches(kept, targets, logged))
        return info
    if (
        kept.dim() >= 2
        and tuple(targets.shape) == tuple(kept.shape[:1]) + tuple(kept.shape[2:])  # class dim 1, as the losses take
    ):
        with torch.no_grad():
            probs = kept.float()
            if bool((probs >= 0).all()) and bool(((probs.sum(1) - 1).abs() <= PROB_ATOL).all()):
                y = targets.to(probs.device).long()
                candidates = {
                    "cross_entropy": float(torch.nn.functional.cross_entropy(probs, y)),
                    "nll_of_log": float(torch.nn.functional.nll_loss(probs.clamp_min(1e-30).log(), y)),
                }
                info["loss_matches"] = [name for name, value in candidates.items() if _matches(value, logged)]
    return info


class _TargetCheck:
    """A step's `target_info` signal, already a plain dict."""

    def __init__(self, step: int, info: dict[str, Any]) -> None:
        self.step, self.info = step, info

    def frames(self) -> list[tuple[str, int, dict[str, Any]]]:
        return [("signals", self.step, {"target_info": self.info})]


def target_counts(step: int, targets: Any) -> _TargetCounts | None:
    """The class counts of `mon.log(targets=...)` as a signals item; None if they are not class labels."""
    if not isinstance(targets, torch.Tensor) or targets.numel() == 0:
        return None
    if targets.is_floating_point() or targets.is_complex():
        return None  # regression targets (or one-hot/soft labels): no classes to count
    flat = targets.detach().reshape(-1)
    flat = flat[:: max(1, flat.numel() // TARGET_ELEMENTS)]
    return _TargetCounts(step, flat)


class _TargetCounts:
    """Targets copied to the host without waiting; counted in the sender thread."""

    def __init__(self, step: int, flat: torch.Tensor) -> None:
        self.step = step
        # A CPU tensor is cloned (at most TARGET_ELEMENTS): the caller may reuse its buffer.
        self._copy = HostCopy(flat if flat.device.type == "cuda" else flat.clone())

    def frames(self) -> list[tuple[str, int, dict[str, Any]]]:
        values, counts = torch.unique(self._copy.get(), return_counts=True)
        counts_by_class = {str(int(v)): int(c) for v, c in zip(values.tolist(), counts.tolist())}
        return [("signals", self.step, {"target_counts": counts_by_class})]
