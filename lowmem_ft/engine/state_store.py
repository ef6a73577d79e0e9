"""Optimizer state of the groups that are not training, kept in host memory.

HiFT trains one group of units per step and keeps every group's optimizer state across visits.
Only the active group's state has to be on the GPU; the others wait here:

    keep        fp32 state in pinned host memory, byte for byte
    keep-8bit   float state compressed blockwise to 8 bits (bitsandbytes), ~4× smaller on the host
    drop        nothing kept: a group starts with fresh state on every visit (BAdam)

The next group is always known in advance, so its state is copied in on a side CUDA stream while
the current step computes (`prefetch`), and a finished group's state is copied out the same way
(`save`). Pinned buffers are allocated once per group, at its first save, and reused after that.
On a CPU-only machine the same code runs with host-to-host copies, so the tests exercise it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

POLICIES = ("keep", "keep-8bit", "drop")
# Blockwise 8-bit as bitsandbytes' own 8-bit optimizers do it: blocks of 256 values, and an
# unsigned code for tensors that are never negative (Adam's second moment). With bitsandbytes'
# default 4096-value blocks the Adam update m/sqrt(v) of a real state was off by ~56%; with these
# settings by ~2% (tests/test_hift.py checks the round trip and a HiFT run against AdamW).
BLOCKSIZE = 256
# Tensors smaller than one block are kept exactly (step counters and the like).
MIN_QUANTIZED_NUMEL = BLOCKSIZE


@dataclass
class _Stored:
    """One state tensor on the host: exact (``data``) or 8-bit (``data`` + bitsandbytes quant state)."""

    data: torch.Tensor
    quant_state: object = None
    dtype: torch.dtype | None = None  # original dtype of a quantised tensor


class OptimizerStateStore:
    def __init__(self, policy: str, device: torch.device):
        if policy not in POLICIES:
            raise ValueError(f"unknown state policy {policy!r}")
        self.policy = policy
        self.device = device
        self.on_cuda = device.type == "cuda"
        self._host: dict[int, list[dict[str, _Stored]]] = {}  # group -> per-parameter state
        self._prefetched: dict[int, tuple[list[dict[str, torch.Tensor]], object]] = {}
        self._stream = torch.cuda.Stream(device) if self.on_cuda else None
        self._saved_events: dict[int, object] = {}

    # -- out: device -> host ----------------------------------------------------------------------
    def save(self, group: int, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
        """Move the optimizer's state for ``params`` to the host and free it on the device."""
        if self.policy == "drop":
            optimizer.state.clear()
            return
        states = [optimizer.state.get(p, {}) for p in params]
        buffers = self._host.get(group)
        stream = self._stream
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))  # the step's writes come first
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            stored = [
                {
                    key: self._store(value, (buffers[i].get(key) if buffers else None))
                    for key, value in state.items()
                }
                for i, state in enumerate(states)
            ]
        if stream is not None:
            event = torch.cuda.Event()
            event.record(stream)
            self._saved_events[group] = event
            for state in states:  # the device tensors must live until the copy has read them
                for value in state.values():
                    if isinstance(value, torch.Tensor) and value.is_cuda:
                        value.record_stream(stream)
        self._host[group] = stored
        optimizer.state.clear()

    def _store(self, value, buffer: _Stored | None) -> _Stored:
        if not isinstance(value, torch.Tensor):
            return _Stored(value)
        if self.policy == "keep-8bit" and value.is_floating_point() and value.numel() >= MIN_QUANTIZED_NUMEL:
            import bitsandbytes.functional as bnbf

            # Quantise where the tensor is (on the GPU: 4× less to copy), then move the bytes.
            unsigned = bool(value.min() >= 0)  # one reduction per tensor and visit
            code = bnbf.create_dynamic_map(signed=not unsigned).to(value.device)
            codes, quant_state = bnbf.quantize_blockwise(value.float(), code=code, blocksize=BLOCKSIZE)
            host = _pinned_like(codes, buffer.data if buffer else None, self.on_cuda)
            host.copy_(codes, non_blocking=self.on_cuda)
            quant_state.absmax = quant_state.absmax.to("cpu")
            quant_state.code = quant_state.code.to("cpu")
            return _Stored(host, quant_state, value.dtype)
        host = _pinned_like(value, buffer.data if buffer else None, self.on_cuda)
        host.copy_(value, non_blocking=self.on_cuda)
        return _Stored(host)

    # -- in: host -> device -----------------------------------------------------------------------
    def prefetch(self, group: int) -> None:
        """Start copying ``group``'s state to the device (asynchronous on CUDA)."""
        if self.policy == "drop" or group not in self._host or group in self._prefetched:
            return
        stream = self._stream
        if stream is not None and group in self._saved_events:
            stream.wait_event(self._saved_events.pop(group))  # its last write-back must be complete
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            loaded = [{key: self._load(item) for key, item in state.items()} for state in self._host[group]]
        event = None
        if stream is not None:
            event = torch.cuda.Event()
            event.record(stream)
        self._prefetched[group] = (loaded, event)

    def _load(self, item: _Stored):
        if not isinstance(item.data, torch.Tensor):
            return item.data
        data = item.data.to(self.device, non_blocking=self.on_cuda)
        if item.quant_state is not None:
            import bitsandbytes.functional as bnbf

            qs = item.quant_state
            qs.absmax, qs.code = qs.absmax.to(self.device), qs.code.to(self.device)
            data = bnbf.dequantize_blockwise(data, qs).to(item.dtype)
            qs.absmax, qs.code = qs.absmax.to("cpu"), qs.code.to("cpu")
        elif data is item.data:  # CPU: the optimizer must not write into the stored copy
            data = data.clone()
        return data

    def load(self, group: int, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
        """Give ``optimizer`` the stored state of ``group`` (fresh state if there is none)."""
        optimizer.state.clear()
        if self.policy == "drop" or group not in self._host:
            return
        self.prefetch(group)  # no-op if already in flight
        loaded, event = self._prefetched.pop(group)
        if event is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(event)
            # Allocated on the side stream, used on the main one from now on: tell the caching
            # allocator, or it could hand the memory out again while the main stream still reads it.
            for state in loaded:
                for value in state.values():
                    if isinstance(value, torch.Tensor) and value.is_cuda:
                        value.record_stream(main)
        for param, state in zip(params, loaded, strict=True):
            if state:
                optimizer.state[param] = state

    # -- checkpoints ------------------------------------------------------------------------------
    def export(self, group: int) -> list[dict]:
        """``group``'s state as stored, for a checkpoint: exact tensors, and for 8-bit state the codes
        and block scales themselves (dequantising and quantising again would not give them back)."""

        def item(stored: _Stored):
            if stored.quant_state is None:
                return stored.data
            qs = stored.quant_state
            return {"codes": stored.data, "absmax": qs.absmax, "code": qs.code, "dtype": str(stored.dtype)}

        return [{key: item(stored) for key, stored in state.items()} for state in self._host.get(group, [])]

    def put(self, group: int, states: list[dict]) -> None:
        """Store ``group``'s state from ``export`` (a checkpoint being restored)."""
        if self.policy == "drop" or not states:
            return
        import bitsandbytes.functional as bnbf

        def stored(value) -> _Stored:
            if isinstance(value, dict):  # 8-bit, exactly as it was
                qs = bnbf.QuantState(absmax=value["absmax"], code=value["code"], blocksize=BLOCKSIZE,
                                     shape=value["codes"].shape, dtype=torch.float32)  # fmt: skip
                data = _pinned_like(value["codes"], None, self.on_cuda).copy_(value["codes"])
                return _Stored(data, qs, getattr(torch, value["dtype"].removeprefix("torch.")))
            if isinstance(value, torch.Tensor):  # adopted as it is, unless it must be pinned
                return _Stored(_pinned_like(value, None, True).copy_(value) if self.on_cuda else value)
            return _Stored(value)

        self._host[group] = [{key: stored(value) for key, value in state.items()} for state in states]

    def host_bytes(self) -> int:
        return sum(
            item.data.numel() * item.data.element_size()
            for states in self._host.values()
            for state in states
            for item in state.values()
            if isinstance(item.data, torch.Tensor)
        )

    def group_state(self, group: int) -> list[dict[str, torch.Tensor]]:
        """The stored state of ``group`` as plain tensors (dequantised), for checkpoints and tests."""
        if group not in self._host:
            return []
        on_cpu = OptimizerStateStore(self.policy, torch.device("cpu"))
        return [{key: on_cpu._load(item) for key, item in state.items()} for state in self._host[group]]


def _pinned_like(value: torch.Tensor, buffer: torch.Tensor | None, pin: bool) -> torch.Tensor:
    """The host buffer for ``value``: the one allocated at the first save, or a new (pinned) one."""
    if buffer is not None and buffer.shape == value.shape and buffer.dtype == value.dtype:
        return buffer
    return torch.empty(value.shape, dtype=value.dtype, device="cpu", pin_memory=pin)
