"""A step's integer inputs, moved to the device in one host-to-device copy.

Every list goes into one int64 host buffer, pinned on CUDA so the copy is asynchronous (the
host goes on preparing while it runs); the device tensor is split into views, and the int32
fields are cast there. On the CPU nothing is copied: the views are of the host buffer.
NOTE: the views share one buffer; each covers its own range, so writing one (the runner
fills placeholder inputs in place) leaves the others as they were.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import torch


def upload_ints(parts: Sequence[Sequence[int]], device: torch.device) -> list[torch.Tensor]:
    """int64 tensors of `parts` on `device`, after one copy (none on the CPU)."""
    host = torch.tensor(list(chain.from_iterable(parts)), dtype=torch.long)
    if device.type == "cuda":
        pinned = torch.empty(host.shape, dtype=torch.long, pin_memory=True)
        pinned.copy_(host)
        # NOTE: the caching host allocator keeps `pinned` until the copy has run.
        host = pinned.to(device, non_blocking=True)
    elif host.device != device:
        host = host.to(device)
    return list(host.split([len(p) for p in parts]))


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` as a tensor on `device` without making the host wait: on CUDA through pinned
    memory and a non-blocking copy (an unpinned one waits for the stream to drain, which
    would undo the launch/collect overlap); elsewhere a plain tensor."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """`t` in host memory: from CUDA a queued copy into pinned memory (non_blocking), to be
    read only after the device has passed it; a CPU tensor as it is."""
    return t if t.device.type == "cpu" else t.to("cpu", non_blocking=True)
