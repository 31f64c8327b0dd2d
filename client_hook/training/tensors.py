"""Small tensor helpers shared by the hooks and the sender thread.

`first_float_tensor` finds the tensor in a module's inputs or outputs;
`HostCopy` is the one way a tensor reaches the host: on CUDA a non-blocking
copy into pinned memory plus an event, so the training thread never waits and
the sender thread synchronises on the event when it reads; elsewhere `.cpu()`
(no copy on the CPU, one blocking copy on other devices).
"""

from __future__ import annotations

from typing import Any

import torch


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
