"""Decoder layers whose frozen weights live in host memory and visit the GPU only to compute.

A 7B model's weights alone (13.5 GB in bf16) do not fit a 12 GB card. HiFT trains one group of
layers per step and SIFT trains none of the base weights, so most weights are only *read* in a
step: by the forward, and by the backward's recompute (activation checkpointing rebuilds a layer's
activations from its input, reading its weights a second time). Those layers can be *streamed*:

- each streamed layer's frozen parameters are kept in one flat, pinned host buffer per layer
  (allocated once, exactly sized, in their training dtype: engine/host_memory.py); a parameter's
  ``.data`` is a view into it while the layer is idle, and the layer crosses in one copy;
- a small ring of device buffers (two by default: one computing, one arriving) is allocated once,
  each the size of the largest streamed layer; before a layer computes, its weights are copied
  into a buffer and its parameters point into that buffer;
- the copy of the *next* layer (i+1 in the forward, i-1 in the backward's recompute) is issued on
  a side CUDA stream while layer i computes. A CUDA event orders the copy before the compute that
  reads it, and another orders the compute that last read a buffer before the copy that overwrites
  it: no synchronisation of the host on the hot path.

The trigger is a forward pre-hook on every submodule that owns streamed parameters, so it also
fires inside a checkpointed layer's recompute (transformers checkpoints ``forward``, not the module
call, and its own hooks would run only once). Streaming needs activation checkpointing for layers
on the gradient path: without it, autograd would keep references to weights whose buffer is
reused.

Trainable parameters are never streamed (SIFT's sparse values stay on the device, with their
gradients and optimizer state), and a layer that starts training (HiFT's active group) is
``pin``-ned: given device memory of its own until ``unpin`` writes its updated weights back to its
host copy. On a CPU-only machine the same code runs with host-to-host copies, so the tests cover it.
"""

from __future__ import annotations

import contextlib

import torch

from lowmem_ft.engine.host_memory import flat_views, host_buffer

N_BUFFERS = 2


class LayerStreamer:
    def __init__(
        self,
        layers: list[torch.nn.Module],
        streamed: list[int],
        device: torch.device,
        resident: frozenset[int] = frozenset(),
    ):
        """Stream ``layers[i]`` for i in ``streamed``, except parameters whose id is in ``resident``
        (trained ones). Parameters may be anywhere; they end up in (pinned) host memory."""
        self.layers = layers
        self.device = device
        self.on_cuda = device.type == "cuda"
        self._side = torch.cuda.Stream(device) if self.on_cuda else None
        # layer index -> its streamed parameters with their host copies
        self.host: dict[int, list[tuple[torch.nn.Parameter, torch.Tensor]]] = {}
        # layer index -> {dtype: (its flat host buffer, the parameters laid out in it, in order)}:
        # one buffer per layer (per dtype), so a layer crosses in one copy (engine/host_memory.py)
        self.flat: dict[int, dict[torch.dtype, tuple[torch.Tensor, list[torch.nn.Parameter]]]] = {}
        for i in streamed:
            by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
            for p in layers[i].parameters():
                if id(p) not in resident:  # trained ones stay on the device
                    by_dtype.setdefault(p.dtype, []).append(p)
            self.flat[i], self.host[i] = {}, []
            for dtype, params in by_dtype.items():
                buffer = host_buffer(sum(p.numel() for p in params), dtype, pin=self.on_cuda)
                for p, view in zip(params, flat_views(buffer, [p.shape for p in params]), strict=True):
                    view.copy_(p.detach())
                    p.data = view
                    self.host[i].append((p, view))
                self.flat[i][dtype] = (buffer, params)
        self.pinned: set[int] = set()  # layers with device memory of their own (they train)
        self._own: dict[int, dict[torch.dtype, torch.Tensor]] = {}  # their device buffers
        sizes: dict[torch.dtype, int] = {}
        for flat in self.flat.values():
            for dtype, (buffer, _) in flat.items():
                sizes[dtype] = max(sizes.get(dtype, 0), buffer.numel())
        # The ring: allocated once, reused for every layer and every step.
        self.buffers = [
            {dtype: torch.empty(n, dtype=dtype, device=device) for dtype, n in sizes.items()}
            for _ in range(N_BUFFERS if self.host else 0)
        ]
        self.holder: list[int | None] = [None] * len(self.buffers)  # layer in each buffer
        self._ready: list[object] = [None] * len(self.buffers)  # copy-done events
        self._current: int | None = None  # the layer computing now
        self._on_grad_path: set[int] = set()  # layers whose forward will be recomputed in backward
        self.copies = 0  # host-to-device layer copies, for tests and benchmarks
        self._hooks = []
        for i in self.host:
            for module in layers[i].modules():
                if any(True for _ in module.parameters(recurse=False)):
                    self._hooks.append(module.register_forward_pre_hook(self._pre_hook(i)))

    # -- which layers are streamed --------------------------------------------------------------
    @property
    def streamed(self) -> list[int]:
        return [i for i in self.host if i not in self.pinned]

    def pin(self, i: int) -> None:
        """Give layer ``i`` device memory of its own (it is about to train): one flat buffer per
        dtype, the size of the layer, copied in at once (the planner counts it)."""
        if i not in self.host or i in self.pinned:
            return
        self._release(i)
        self.pinned.add(i)
        self._own[i] = {}
        for dtype, (host, params) in self.flat[i].items():
            own = self._own[i][dtype] = host.to(self.device, copy=True)
            for p, view in zip(params, flat_views(own, [p.shape for p in params]), strict=True):
                p.data = view

    def unpin(self, i: int) -> None:
        """Write layer ``i``'s weights back to its host copy and stream it again."""
        if i not in self.pinned:
            return
        self.pinned.discard(i)
        for dtype, own in self._own.pop(i).items():
            self.flat[i][dtype][0].copy_(own)  # synchronous: the device copy is freed right after
        for p, host in self.host[i]:
            p.data = host

    # -- the ring ---------------------------------------------------------------------------------
    def _pre_hook(self, i: int):
        def hook(module, args):
            if i in self.pinned or (i == self._current and self._slot_of(i) is not None):
                return
            self._compute(i, args)

        return hook

    def _compute(self, i: int, args) -> None:
        forward = self._current is None or i > self._current
        if forward and torch.is_grad_enabled():
            trains = any(p.requires_grad for p in self.layers[i].parameters())
            inputs_need_grad = any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
            if trains or inputs_need_grad:
                self._on_grad_path.add(i)
        main = torch.cuda.current_stream(self.device) if self.on_cuda else None
        slot = self._slot_of(i)
        if slot is None:
            slot = self._load(i, main)
        if main is not None and self._ready[slot] is not None:
            main.wait_event(self._ready[slot])  # its copy has landed
        self._point(i, slot)
        self._current = i
        nxt = self._next(i, forward)
        if nxt is not None and self._slot_of(nxt) is None:
            self._load(nxt, main)

    def _next(self, i: int, forward: bool) -> int | None:
        """The streamed layer that computes after ``i``: above it in the forward; in the backward,
        the next one below whose activations are rebuilt (frozen layers below the lowest trained
        one are not)."""
        streamed = self.streamed
        if forward:
            above = [j for j in streamed if j > i]
            if above:
                return min(above)
            # the last layer of the forward: the backward starts at the top layer it rebuilds
            return max((j for j in self._on_grad_path if j in streamed), default=None)
        below = [j for j in streamed if j < i and j in self._on_grad_path]
        return max(below) if below else None

    def _slot_of(self, i: int) -> int | None:
        return self.holder.index(i) if i in self.holder else None

    def _load(self, i: int, main) -> int:
        """Start copying layer ``i`` into a buffer not used by the layer computing now."""
        current = self._slot_of(self._current) if self._current is not None else None
        slot = next((s for s in range(len(self.buffers)) if s != current and self.holder[s] is None), None)
        if slot is None:
            slot = next(s for s in range(len(self.buffers)) if s != current)
        if self.holder[slot] is not None:
            self._release(self.holder[slot])
        side = self._side
        if side is not None:
            # Everything queued so far on the main stream (the compute that last read this buffer
            # included) comes before the copy that overwrites it.
            side.wait_stream(main)
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            for dtype, (host, _) in self.flat[i].items():  # the whole layer in one copy
                self.buffers[slot][dtype][: host.numel()].copy_(host, non_blocking=self.on_cuda)
        if side is not None:
            event = torch.cuda.Event()
            event.record(side)
            self._ready[slot] = event
        self.holder[slot] = i
        self.copies += 1
        return slot

    def _point(self, i: int, slot: int) -> None:
        for dtype, (_, params) in self.flat[i].items():
            views = flat_views(self.buffers[slot][dtype], [p.shape for p in params])
            for p, view in zip(params, views, strict=True):
                p.data = view

    def _release(self, i: int) -> None:
        """Point layer ``i`` back at its host copy and free its buffer (its weights are unchanged)."""
        slot = self._slot_of(i)
        if slot is not None:
            self.holder[slot] = None
            self._ready[slot] = None
        if i == self._current:
            self._current = None
        for p, host in self.host[i]:
            p.data = host

    def end_pass(self) -> None:
        """A forward (and backward) is over: the next layer call starts a new forward."""
        self._current = None
        self._on_grad_path.clear()

    def device_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for b in self.buffers for t in b.values())

    def host_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for flat in self.flat.values() for b, _ in flat.values())


def place_model(
    model: torch.nn.Module, device: torch.device, n_streamed: int, resident: frozenset[int] = frozenset()
) -> LayerStreamer | None:
    """Put ``model`` on ``device``, except the frozen weights of its first ``n_streamed`` decoder
    layers, which go to (pinned) host memory and are streamed. Nothing is ever moved to the device
    in full, so a model whose weights do not fit can be placed."""
    if not n_streamed:
        if any(t.device != device for t in (*model.parameters(), *model.buffers())):
            model.to(device)  # (Module.to also runs the quantised parameters' own conversions)
        return None
    from lowmem_ft.models.units import decoder_layers

    layers = decoder_layers(model)
    streamer = LayerStreamer(layers, list(range(min(n_streamed, len(layers)))), device, resident)
    streamed = {id(p) for pairs in streamer.host.values() for p, _ in pairs}
    for param in model.parameters():
        if id(param) not in streamed:
            param.data = param.data.to(device)
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
    # Every forward (training micro-batch or evaluation) starts at the embedding: a new pass.
    model.get_input_embeddings().register_forward_pre_hook(lambda module, args: streamer.end_pass())
    return streamer
