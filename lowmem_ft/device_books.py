"""The books of a traced loop (lowmem_ft/looptrace.py): the live bytes of every storage the loop's
operators create, at every allocation, the peak and the phase it happened in; and the dispatch modes
that feed them, on fake tensors (FakeDevice) or on a GPU's real ones (Recording).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from lowmem_ft.phases import current_phase


def _tensors(values) -> Iterator[torch.Tensor]:
    """The tensors in an operator's arguments or results: tensors, and sequences of them (an ATen
    schema nests no deeper), walked without pytree's generality (a tenth of the books' time)."""
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (tuple, list)):
            yield from _tensors(value)


def _storage(t: torch.Tensor):
    """The storage a tensor's bytes live in: a DTensor's (several ranks) is its local shard's."""
    return (t._local_tensor if isinstance(t, DTensor) else t).untyped_storage()


class DeviceBytes:
    """Live bytes of the storages the loop's operators create (and of those adopted), less the
    engine's host buffers; the peak, and where in the loop it happened. Fed by the dispatch mode
    that runs the operators: FakeDevice (fake tensors), or Recording (above any others)."""

    def __init__(self, where=current_phase, device_type: str | None = None):
        self.device_type = device_type  # count only storages on this device type (None: every one)
        self.where = where
        self.live = self.peak = 0
        self.peak_phase = "setup"
        self.phase_peaks: dict[str, int] = {}
        self.host_bytes = 0
        self._sizes: dict[int, int] = {}  # id(storage) -> bytes, for live device storages
        self._host: set[int] = set()  # id(storage) of the engine's host buffers (they live all run)
        self._last: tuple | None = None  # the latest allocation, and the peaks before it
        self.setup_done = False
        self._aliasing: dict = {}  # operator -> whether an output may alias an input (_may_alias)

    # -- bookkeeping ---------------------------------------------------------------------------------
    def _add(self, storage) -> None:
        key = id(storage)
        if key in self._sizes or key in self._host or not storage.nbytes():
            return
        if self.device_type is not None and storage.device.type != self.device_type:
            return
        self._sizes[key] = storage.nbytes()
        # What this allocation may overwrite, in case it turns out to be a host buffer (below).
        name = self.where()
        self._last = (key, self.peak, self.peak_phase, name, self.phase_peaks.get(name))
        self.live += storage.nbytes()
        weakref.finalize(storage, self._free, key)
        if self.live > self.peak:
            self.peak, self.peak_phase = self.live, name
        self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), self.live)

    def phase_name(self) -> str:
        name = current_phase()
        return "between phases" if name == "setup" and self.setup_done else name

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def adopt(self, tensors) -> None:
        """Count tensors that existed before tracing started."""
        for t in tensors:
            self._add(_storage(t))

    def host_buffer(self, buffer: torch.Tensor) -> None:
        """An engine host buffer (engine/host_memory.observe): host memory, not device memory."""
        storage = buffer.untyped_storage()
        self.host_bytes += storage.nbytes()
        self._host.add(id(storage))
        # Keys are ids, which Python reuses once an object is gone: a freed host buffer's id must not
        # hide the device storage that gets it next (it once made a traced peak 1.3 GiB low).
        weakref.finalize(storage, self._host.discard, id(storage))
        self.live -= self._sizes.pop(id(storage), 0)
        # It was counted as device bytes when torch allocated it, an instant before this call: the
        # peaks it raised then were never on the device.
        if self._last is not None and self._last[0] == id(storage):
            _, self.peak, self.peak_phase, name, phase_peak = self._last
            if phase_peak is None:
                self.phase_peaks.pop(name, None)
            else:
                self.phase_peaks[name] = phase_peak
        self._last = None

    def restart_peak(self) -> None:
        """Setup is over: the loop's peaks are measured from what is on the device now."""
        self.peak, self.peak_phase = self.live, "setup"
        self.phase_peaks = {"setup": self.live}
        self.setup_done = True

    # -- what each operator made ---------------------------------------------------------------------
    def record(self, func, args, kwargs, out) -> None:
        """Count the new storages among the outputs of ``func(*args, **kwargs)``."""
        if isinstance(out, torch.Tensor):
            outputs = [out]
        elif isinstance(out, (tuple, list)):
            outputs = list(_tensors(out))
        else:  # a scalar, a device
            return
        if self._may_alias(func):  # an in-place op or a view: its output may be an input's storage
            inputs = {id(_storage(t)) for t in _tensors((*args, *(kwargs or {}).values()))}
            outputs = [t for t in outputs if id(_storage(t)) not in inputs]
        for t in outputs:
            self._add(_storage(t))

    def _may_alias(self, func) -> bool:
        """Whether an output of ``func`` may share an input's storage, by its schema (its returns'
        alias annotations, as ``Tensor(a!)`` or ``Tensor(a)``). The others return new storages,
        which need no look at the inputs: that look was a tenth of a trace's time."""
        aliases = self._aliasing.get(func)
        if aliases is None:
            returns = getattr(getattr(func, "_schema", None), "returns", None)
            aliases = returns is None or any(r.alias_info is not None for r in returns)
            self._aliasing[func] = aliases
        return aliases

    def resized(self, storage, nbytes: int) -> None:
        """FSDP frees a gathered weight by resizing its storage to 0 bytes and gathers it again
        into the same storage: the storage object lives on, so its bytes are counted here."""
        key = id(storage)
        if key not in self._sizes:
            if nbytes:
                self._add(storage)
            return
        self.live += nbytes - self._sizes[key]
        self._sizes[key] = nbytes
        if self.live > self.peak:
            self.peak, self.peak_phase = self.live, self.where()
        name = self.where()
        self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), self.live)


_LOCAL_SCALAR = torch.ops.aten._local_scalar_dense.default
_DEVICE = torch.ops.prim.device.default


class FakeDevice(FakeTensorMode):
    """Fake tensors whose operators feed the books while ``recording``. One Python dispatch per
    operator: the books as a mode of their own above FakeTensorMode made two, and that second one
    took a fifth of a trace's time."""

    def __init__(self):
        super().__init__()
        self.books: DeviceBytes | None = None
        self._depth = 0

    @contextlib.contextmanager
    def recording(self, books: DeviceBytes):
        self.books = books
        try:
            yield
        finally:
            self.books = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _DEVICE:  # a tensor's .device, asked by C++ (most of a fake backward's operators)
            return super().__torch_dispatch__(func, types, args, kwargs or {})
        if func is _LOCAL_SCALAR:  # .item(), float(), int(), bool() of a fake tensor: no value to read
            (tensor,) = args
            return True if tensor.dtype == torch.bool else 1 if not tensor.is_floating_point() else 1.0
        # FakeTensorMode runs some operators as decompositions, whose operators come through here
        # again: only the outermost one's outputs are the loop's (a GPU runs the operator itself).
        self._depth += 1
        try:
            out = super().__torch_dispatch__(func, types, args, kwargs or {})
            if out is NotImplemented:  # a DTensor's operator (several ranks): DTensor runs it on its
                # local shards, whose operators come through here again, inside this one: the
                # outputs counted are the DTensor operator's, as a mode above FakeTensorMode saw them
                out = func(*args, **(kwargs or {}))
        finally:
            self._depth -= 1
        if self.books is not None and not self._depth:
            self.books.record(func, args, kwargs, out)
        return out


class Recording(TorchDispatchMode):
    """Every operator run under this mode feeds the books, whatever runs it: a GPU's real tensors
    (the books count CUDA storages only), or fake tensors of a FakeTensorMode below it (tests)."""

    def __init__(self, books: DeviceBytes):
        super().__init__()
        self.books = books

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.books.record(func, args, kwargs, out)
        return out
