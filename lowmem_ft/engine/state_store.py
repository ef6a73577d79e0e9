"""Optimizer state of the groups that are not training, kept in host memory.

HiFT trains one group of units per step and keeps every group's optimizer state across visits.
Only the active group's state has to be on the GPU; the others wait here:

    keep        fp32 state in pinned host memory, byte for byte
    keep-8bit   float state compressed blockwise to 8 bits (bitsandbytes), ~4× smaller on the host
    drop        nothing kept: a group starts with fresh state on every visit (BAdam)

The next group is always known in advance, so its state is copied in on a side CUDA stream while
the current step computes (`prefetch`), and a finished group's state is copied out the same way
(`save`). Each group's state lives in one flat host buffer per dtype, exactly sized and pinned
(engine/host_memory.py), allocated at its first save and reused after that: a group crosses to
the device in one copy. Device memory for arriving state is allocated on the main stream before
the side stream fills it, so it comes from the same pool of the caching allocator as everything
else. On the device the state is always full precision (fp32, as the optimizer keeps it):
``keep-8bit`` changes only what waits on the host.
On a CPU-only machine the same code runs with host-to-host copies, so the tests exercise it.

With several ranks (FSDP2) a parameter is a DTensor and so is its state: each rank stores its own
shard (``to_local``), 1/N of the group's state, and gets it back wrapped as the parameter is.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from lowmem_ft.choices import STATE_POLICIES as POLICIES
from lowmem_ft.engine.host_memory import host_buffer, release
from lowmem_ft.engine.shards import local_part, shaped_like

# Blockwise 8-bit as bitsandbytes' own 8-bit optimizers do it: blocks of 256 values, and an
# unsigned code for tensors that are never negative (Adam's second moment). With bitsandbytes'
# default 4096-value blocks the Adam update m/sqrt(v) of a real state was off by ~56%; with these
# settings by ~2% (tests/test_hift.py checks the round trip and a HiFT run against AdamW).
BLOCKSIZE = 256
# Tensors smaller than one block are kept exactly (step counters and the like).
MIN_QUANTIZED_NUMEL = BLOCKSIZE


@dataclass
class _Stored:
    """One state tensor on the host: exact (``data``) or 8-bit (``data``: codes; ``absmax``: a scale
    per 256), views into the group's flat buffers (the scales in the fp32 one: pinned, they cross in
    the group's copy, not from pageable memory); a small tensor (a step count) has its own."""

    data: torch.Tensor
    absmax: torch.Tensor | None = None  # 8-bit only
    signed: bool = False  # 8-bit: bitsandbytes' signed map (a first moment) or unsigned (a second)
    dtype: torch.dtype | None = None  # 8-bit: the tensor's own dtype

    @property
    def quantised(self) -> bool:
        return self.absmax is not None


def _blocks(numel: int) -> int:
    """Block scales of an 8-bit tensor of ``numel`` values."""
    return -(-numel // BLOCKSIZE)


def _in_flat_buffer(value) -> bool:
    """Scalars (AdamW's step counts, on the CPU already) are not worth a slot in the flat buffer."""
    return isinstance(value, torch.Tensor) and value.ndim > 0


class OptimizerStateStore:
    def __init__(self, policy: str, device: torch.device):
        if policy not in POLICIES:
            raise ValueError(f"unknown state policy {policy!r}")
        self.policy = policy
        self.device = device
        self.on_cuda = device.type == "cuda"
        self._host: dict[int, list[dict[str, _Stored]]] = {}  # group -> per-parameter state
        self._flat: dict[int, dict[torch.dtype, torch.Tensor]] = {}  # group -> its flat host buffers
        self._prefetched: dict[int, tuple[list[dict[str, torch.Tensor]], object]] = {}
        self._stream = torch.cuda.Stream(device) if self.on_cuda else None
        self._saved_events: dict[int, object] = {}
        # Imported now, not at the first save: a broken bitsandbytes fails before training, and its
        # import (which logs the kernels it cannot load, with their exceptions) never runs under a
        # save whose frame holds a group's masters and state (a logging handler that keeps records
        # would keep them alive, and their memory with them).
        self._bnbf = None
        self._code_maps: dict[tuple[bool, torch.device | None], torch.Tensor] = {}
        if policy == "keep-8bit":
            import bitsandbytes.functional

            self._bnbf = bitsandbytes.functional

    def _quantised(self, value) -> bool:
        return (
            self.policy == "keep-8bit"
            and isinstance(value, torch.Tensor)
            and value.is_floating_point()
            and value.numel() >= MIN_QUANTIZED_NUMEL
        )

    # -- out: device -> host ----------------------------------------------------------------------
    def save(self, group: int, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
        """Move the optimizer's state for ``params`` to the host and free it on the device."""
        if self.policy == "drop":
            optimizer.state.clear()
            return
        states = [{k: local_part(v) for k, v in optimizer.state.get(p, {}).items()} for p in params]
        views = self._host_views(group, states)
        stream, main = self._stream, torch.cuda.current_stream(self.device) if self.on_cuda else None
        stored: list[dict[str, _Stored]] = []
        for state, state_views in zip(states, views, strict=True):
            stored.append({})
            for key, value in state.items():
                view, absmax_view = state_views.get(key, (None, None))
                if view is None:  # a scalar or a non-tensor: kept as it is, on the host
                    kept = value.to("cpu", copy=True) if isinstance(value, torch.Tensor) else value
                    stored[-1][key] = _Stored(kept)
                    continue
                if self._quantised(value):
                    # Quantised where the tensor is (on the GPU: 4x less to copy), on the main
                    # stream, so the codes come from the main pool; the copy out is on the side.
                    codes, absmax, signed = self._quantise(value)
                    copies = [(view, codes), (absmax_view, absmax)]
                    stored[-1][key] = _Stored(view, absmax_view, signed, value.dtype)
                else:
                    copies = [(view, value)]
                    stored[-1][key] = _Stored(view)
                if stream is not None:
                    stream.wait_stream(main)  # the step's writes (and the quantisation) come first
                    with torch.cuda.stream(stream):
                        for destination, payload in copies:
                            destination.copy_(payload, non_blocking=True)
                    for _, payload in copies:
                        payload.record_stream(stream)  # lives until the copy has read it
                else:
                    for destination, payload in copies:
                        destination.copy_(payload)
        if stream is not None:
            event = torch.cuda.Event()
            event.record(stream)
            self._saved_events[group] = event
        self._host[group] = stored
        optimizer.state.clear()

    def _quantise(self, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """``value`` as 8-bit codes and fp32 block scales, where it is, and which map they use."""
        signed = not bool(value.min() >= 0)  # one reduction per tensor and visit
        codes, quant_state = self._bnbf.quantize_blockwise(
            value.float(), code=self._code_map(signed, value.device), blocksize=BLOCKSIZE
        )
        return codes, quant_state.absmax, signed

    def _code_map(self, signed: bool, device: torch.device | None) -> torch.Tensor:
        """bitsandbytes' dynamic 8-bit map (signed: the first moment; unsigned: the second), made
        once per device and kept. Made afresh, it is some 600 small CPU operations and a copy to
        the device for every state tensor of every group switch. ``None``: the engine's host copy."""
        key = (signed, device)
        if key not in self._code_maps:
            made = self._bnbf.create_dynamic_map(signed=signed)
            if device is None:  # in a host buffer of the engine's own, which the memory trace counts
                # as host memory (a fake CPU tensor's .to("cpu") would stay "device")
                made = host_buffer(made.numel(), made.dtype, pin=False).copy_(made)
            self._code_maps[key] = made if device is None else made.to(device)
        return self._code_maps[key]

    def _host_views(self, group: int, states: list[dict]) -> list[dict[str, tuple]]:
        """Views into ``group``'s flat host buffers, (tensor or codes, block scales or None) per
        state tensor: the buffers of its last save when the layout is the same (it always is,
        after the first), new ones otherwise."""
        layout: list[tuple[int, str, torch.dtype, torch.Size]] = []  # codes before their scales
        for i, state in enumerate(states):
            for key, value in state.items():
                if not _in_flat_buffer(value):
                    continue
                if self._quantised(value):
                    layout.append((i, key, torch.uint8, value.shape))
                    layout.append((i, key, torch.float32, torch.Size([_blocks(value.numel())])))
                else:
                    layout.append((i, key, value.dtype, value.shape))
        sizes: dict[torch.dtype, int] = {}
        for _, _, dtype, shape in layout:
            sizes[dtype] = sizes.get(dtype, 0) + shape.numel()
        buffers = self._flat.get(group, {})
        if {d: b.numel() for d, b in buffers.items()} != sizes:
            self._release(buffers)
            buffers = {d: host_buffer(n, d, pin=self.on_cuda) for d, n in sizes.items()}
        self._flat[group] = buffers
        views: list[dict[str, tuple]] = [{} for _ in states]
        offsets = dict.fromkeys(sizes, 0)
        for i, key, dtype, shape in layout:
            start = offsets[dtype]
            view = buffers[dtype][start : start + shape.numel()].view(shape)
            views[i][key] = (views[i][key][0], view) if key in views[i] else (view, None)
            offsets[dtype] = start + shape.numel()
        return views

    def _release(self, buffers: dict[torch.dtype, torch.Tensor]) -> None:
        """Unpin and drop a group's host buffers: once no copy on the side stream reads or writes
        them (a save's copy out, a prefetch's copy in), or it would go on into freed memory."""
        if self._stream is not None and buffers:
            self._stream.synchronize()
        for buffer in buffers.values():
            release(buffer)

    # -- in: host -> device -----------------------------------------------------------------------
    def prefetch(self, group: int) -> None:
        """Start copying ``group``'s state to the device (asynchronous on CUDA)."""
        if self.policy == "drop" or group not in self._host or group in self._prefetched:
            return
        stream = self._stream
        main = torch.cuda.current_stream(self.device) if stream is not None else None
        # Destinations are allocated now, on the main stream (one pool for the whole step); the side
        # stream fills them. A quantised group arrives as codes and is expanded to fp32 on arrival.
        arrived = {d: torch.empty_like(b, device=self.device) for d, b in self._flat[group].items()}
        outs = [
            {
                key: torch.empty(item.data.shape, dtype=item.dtype, device=self.device)
                for key, item in state.items()
                if item.quantised
            }
            for state in self._host[group]
        ]
        if stream is not None:
            if group in self._saved_events:  # its last write-back must be complete. (The event
                # stays: a checkpoint taken after this switch reads the host copy, and waits on it.)
                stream.wait_event(self._saved_events[group])
            stream.wait_stream(main)  # the destinations exist before the side stream writes them
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for dtype, buffer in self._flat[group].items():  # the whole group in one copy per dtype
                arrived[dtype].copy_(buffer, non_blocking=stream is not None)
            loaded = self._unpack(group, arrived, outs)
        event = None
        if stream is not None:
            event = torch.cuda.Event()
            event.record(stream)
            for tensor in [*arrived.values(), *(t for out in outs for t in out.values())]:
                tensor.record_stream(stream)
        self._prefetched[group] = (loaded, event)

    def _unpack(self, group: int, arrived: dict, outs: list[dict]) -> list[dict]:
        """Per-parameter state from the group's flat device copy: views, or fp32 tensors dequantised
        from the 8-bit codes (the codes' copy is freed once every tensor has been expanded)."""
        offsets = dict.fromkeys(arrived, 0)

        def take(like: torch.Tensor) -> torch.Tensor:  # the next slot of its dtype, as laid out
            dtype, n = like.dtype, like.numel()
            offsets[dtype] += n
            return arrived[dtype][offsets[dtype] - n : offsets[dtype]].view(like.shape)

        loaded = []
        for state, out in zip(self._host[group], outs, strict=True):
            loaded.append({})
            for key, item in state.items():
                if not _in_flat_buffer(item.data):
                    value = item.data
                    loaded[-1][key] = value.clone() if isinstance(value, torch.Tensor) else value
                    continue
                view = take(item.data)
                if item.quantised:
                    view = self._dequantise(view, take(item.absmax), item.signed, out[key])
                loaded[-1][key] = view
        return loaded

    def _dequantise(
        self, codes: torch.Tensor, absmax: torch.Tensor, signed: bool, out: torch.Tensor
    ) -> torch.Tensor:
        """8-bit ``codes`` and their block scales (where the codes are) expanded into ``out``."""
        code = self._code_map(signed, codes.device)
        if out.is_cuda and out.dtype == torch.float32:  # straight into the main-pool tensor
            self._bnbf.dequantize_blockwise(codes, absmax=absmax, code=code, out=out, blocksize=BLOCKSIZE)
        else:
            out.copy_(self._bnbf.dequantize_blockwise(codes, absmax=absmax, code=code, blocksize=BLOCKSIZE))
        return out

    def load(self, group: int, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
        """Give ``optimizer`` the stored state of ``group`` (fresh state if there is none)."""
        optimizer.state.clear()
        if self.policy == "drop" or group not in self._host:
            return
        self.prefetch(group)  # no-op if already in flight
        loaded, event = self._prefetched.pop(group)
        # Only the group that comes next is ever prefetched; one that did not come (the order was
        # left, e.g. by a restore) would hold its device copy for nothing: bounded memory first.
        self._prefetched.clear()
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)  # the copies have landed
        for param, state in zip(params, loaded, strict=True):
            if state:
                optimizer.state[param] = {
                    k: shaped_like(param, _on_device_of(param, v)) for k, v in state.items()
                }

    # -- checkpoints ------------------------------------------------------------------------------
    def _copied_out(self, group: int) -> None:
        """Wait until ``group``'s last save has landed in host memory: on a GPU its copy runs on the
        side stream, and a reader on the host (a checkpoint taken right after the save) would see
        what the buffer held before. The event stays (prefetch only waits on it): a later
        checkpoint of the same state waits on it again, at no cost once it has passed."""
        event = self._saved_events.get(group)
        if event is not None:
            event.synchronize()

    def export(self, group: int) -> list[dict]:
        """``group``'s state as stored, for a checkpoint: exact tensors, and for 8-bit state the codes
        and block scales themselves (dequantising and quantising again would not give them back)."""
        self._copied_out(group)

        def item(stored: _Stored):
            if not stored.quantised:
                return stored.data
            code = self._code_map(stored.signed, None)
            return {"codes": stored.data, "absmax": stored.absmax, "code": code, "dtype": str(stored.dtype)}

        return [{key: item(stored) for key, stored in state.items()} for state in self._host.get(group, [])]

    def put(self, group: int, states: list[dict]) -> None:
        """Store ``group``'s state from ``export`` (a checkpoint being restored)."""
        if self.policy == "drop" or not states:
            return
        # Lay the group out as `save` does: 8-bit codes as uint8 with their scales after them in the
        # fp32 buffer, exact tensors in their dtype.
        parts = [
            {
                key: [value["codes"], value["absmax"]] if isinstance(value, dict) else [value]
                for key, value in state.items()
            }
            for state in states
        ]
        sizes: dict[torch.dtype, int] = {}
        for state in parts:
            for tensors in state.values():
                for tensor in filter(_in_flat_buffer, tensors):
                    sizes[tensor.dtype] = sizes.get(tensor.dtype, 0) + tensor.numel()
        self._release(self._flat.get(group, {}))
        self._prefetched.pop(group, None)  # a device copy of the state this replaces
        buffers = self._flat[group] = {d: host_buffer(n, d, pin=self.on_cuda) for d, n in sizes.items()}
        offsets = dict.fromkeys(sizes, 0)

        def place(tensor: torch.Tensor) -> torch.Tensor:  # the next slot of its dtype, filled
            dtype, n = tensor.dtype, tensor.numel()
            offsets[dtype] += n
            return buffers[dtype][offsets[dtype] - n : offsets[dtype]].view(tensor.shape).copy_(tensor)

        stored = []
        for state, state_parts in zip(states, parts, strict=True):
            stored.append({})
            for key, value in state.items():
                tensor = state_parts[key][0]
                if not _in_flat_buffer(tensor):
                    stored[-1][key] = _Stored(tensor)
                elif isinstance(value, dict):  # 8-bit, exactly as it was
                    signed = bool(value["code"].min() < 0)  # (the unsigned map has no negative code)
                    dtype = getattr(torch, value["dtype"].removeprefix("torch."))
                    stored[-1][key] = _Stored(place(tensor), place(value["absmax"]), signed, dtype)
                else:
                    stored[-1][key] = _Stored(place(tensor))
        self._host[group] = stored

    def host_bytes(self) -> int:
        """Host bytes of the stored state: the flat buffers and the few small tensors beside them."""
        flat = sum(b.numel() * b.element_size() for buffers in self._flat.values() for b in buffers.values())
        small = sum(
            item.data.numel() * item.data.element_size()
            for states in self._host.values()
            for state in states
            for item in state.values()
            if isinstance(item.data, torch.Tensor) and not _in_flat_buffer(item.data)
        )
        return flat + small

    def group_state(self, group: int) -> list[dict[str, torch.Tensor]]:
        """The stored state of ``group`` as plain tensors (dequantised), for checkpoints and tests."""
        if group not in self._host:
            return []
        self._copied_out(group)
        result = []
        for state in self._host[group]:
            result.append({})
            for key, item in state.items():
                value = item.data
                if item.quantised:
                    out = torch.empty(value.shape, dtype=item.dtype)
                    value = self._dequantise(value, item.absmax, item.signed, out)
                elif isinstance(value, torch.Tensor):
                    value = value.clone()
                result[-1][key] = value
        return result


def _on_device_of(param: torch.Tensor, value):
    """A step count back where the optimizer keeps it: fused AdamW (methods/optimizers.py) holds it
    on the parameter's device and steps only with it there (torch's own load_state_dict moves it so);
    the store kept it on the host."""
    if isinstance(value, torch.Tensor) and value.ndim == 0 and param.device.type != "cpu":
        return value.to(param.device)
    return value
