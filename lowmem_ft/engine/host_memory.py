"""Host buffers the engine pins: one flat buffer per streamed layer and per optimizer-state group.

Why flat: one host<->device copy per layer (or group) instead of one per parameter, and one
allocation to account for.

Why not ``torch.empty(..., pin_memory=True)``: torch's pinned-memory allocator
(CachingHostAllocator) rounds every allocation up to the next power of two so that freed blocks
can be reused. A 386 MiB Llama-2-7B layer takes 512 MiB, whether as one buffer or as one tensor
per parameter (its 32 MiB attention weights round to themselves, its 86 MiB MLP weights to 128).
Pinned memory cannot be swapped out, so a host sized to the plan would
meet the OOM killer. Instead the buffer is an ordinary host tensor of exactly the bytes needed,
page-locked in place with ``cudaHostRegister`` (what torch's own distributed-checkpoint stager
does); the driver then copies from it asynchronously, as from any pinned memory.

On a CPU-only machine nothing is pinned and the same code runs. ``observe`` lets the memory
trace (lowmem_ft/looptrace.py) see every host buffer, so it can tell host bytes from device bytes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Buffers registered with the driver: kept alive here until released (memory that is freed while
# registered would stay locked; unregistering first is the only safe order).
_registered: dict[int, torch.Tensor] = {}
_observers: list[Callable[[torch.Tensor], None]] = []


def host_buffer(numel: int, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """A flat host tensor of exactly ``numel`` elements, page-locked when ``pin``."""
    buffer = torch.empty(numel, dtype=dtype, device="cpu")
    if pin and numel:
        nbytes = numel * buffer.element_size()
        error = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 0))
        if error != 0:
            raise RuntimeError(f"could not pin {nbytes:,} bytes of host memory (cudaError {error})")
        _registered[buffer.data_ptr()] = buffer
    for observe in _observers:
        observe(buffer)
    return buffer


def release(buffer: torch.Tensor | None) -> None:
    """Unpin ``buffer`` (if it was pinned); the memory is freed when its last view goes."""
    if buffer is None or _registered.pop(buffer.data_ptr(), None) is None:
        return
    torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())


def pinned_bytes() -> int:
    """Host bytes page-locked by the engine now."""
    return sum(t.numel() * t.element_size() for t in _registered.values())


class observe:
    """``with observe(callback):`` calls ``callback(buffer)`` for every host buffer allocated."""

    def __init__(self, callback: Callable[[torch.Tensor], None]):
        self.callback = callback

    def __enter__(self):
        _observers.append(self.callback)
        return self

    def __exit__(self, *exc) -> None:
        _observers.remove(self.callback)


def flat_views(buffer: torch.Tensor, shapes: list[torch.Size]) -> list[torch.Tensor]:
    """Consecutive views of ``buffer`` with ``shapes`` (the layout the buffer was sized for)."""
    views, start = [], 0
    for shape in shapes:
        n = shape.numel()
        views.append(buffer[start : start + n].view(shape))
        start += n
    return views
