"""Small tensor helpers shared by the hooks and the sender thread.

`first_float_tensor` finds the tensor in a module's outputs; `batch_tensor` the
input batch among a forward's arguments;
`HostCopy` is the one way a tensor reaches the host: on CUDA a non-blocking
copy into pinned memory plus an event, so the training thread never waits and
the sender thread synchronises on the event when it reads; elsewhere `.cpu()`
(no copy on the CPU, one blocking copy on other devices).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

# Keyword arguments that name the batch itself, most specific first: transformers' token ids,
# embeddings, images and audio, then the names plain modules use. `attention_mask`, `labels` or
# `token_type_ids` are batched tensors too, but never the batch when one of these is given.
BATCH_KEYS: tuple[str, ...] = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features",
                               "x", "input", "inputs", "src")  # fmt: skip


def first_float_tensor(value: Any) -> torch.Tensor | None:
    """The first floating-point tensor in a value (tensor, tuple, list or dict, searched in order)."""
    if isinstance(value, torch.Tensor):
        return value if value.is_floating_point() else None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    for item in items:
        found = first_float_tensor(item)
        if found is not None:
            return found
    return None


def _batched(value: Any) -> bool:
    """A tensor with a batch dimension: at least 1-d and more than one element, real numbers (not bool)."""
    return (
        isinstance(value, torch.Tensor)
        and value.dim() >= 1
        and value.numel() > 1
        and value.dtype != torch.bool
        and not value.is_complex()
    )


def _first_batched(value: Any) -> torch.Tensor | None:
    if _batched(value):
        return value
    if isinstance(value, Mapping):
        return _in_mapping(value)
    if isinstance(value, (tuple, list)):
        for item in value:
            found = _first_batched(item)
            if found is not None:
                return found
    return None


def _in_mapping(kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    for key in BATCH_KEYS:
        if _batched(kwargs.get(key)):
            return kwargs[key]
    for value in kwargs.values():
        found = _first_batched(value)
        if found is not None:
            return found
    return None


def batch_tensor(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    """The input batch among a forward's arguments: a float or integer (token id) tensor with a batch dimension.

    A keyword of BATCH_KEYS first (`model(input_ids=..., attention_mask=..., labels=...)`), then the
    first batched tensor of the positional arguments (searched into tuples, lists and mappings, such
    as a `BatchEncoding`), then of the other keywords. Scalars and 0-d tensors are never the batch
    (the HF Trainer passes `num_items_in_batch` as one). A few dict lookups: it runs every forward.
    """
    if kwargs:
        for key in BATCH_KEYS:
            value = kwargs.get(key)
            if value is not None and _batched(value):
                return value
    for value in args:
        found = _first_batched(value)
        if found is not None:
            return found
    return _in_mapping(kwargs) if kwargs else None


class HostCopy:
    """A tensor on its way to the host: started now, waited for only by `get()`."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._event: Any = None
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)  # queued on the stream, not waited for
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tensor.cpu()

    def get(self) -> torch.Tensor:
        """The host tensor; on CUDA this waits for the copy (call it from the sender thread)."""
        if self._event is not None:
            self._event.synchronize()
        return self._host
