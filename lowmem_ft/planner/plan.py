"""Fit a fine-tuning method into a machine: choose settings, account every byte, say what is short.

``make_plan(shape, request, budget)`` is the whole planner. It is pure arithmetic over the model's
shape (no weights, no torch), so `lowmem-ft plan` answers in well under a second and `run` uses
exactly the same numbers to set itself up.

Peak memory is not the sum of all components: gradients appear while activations are freed. The
planner evaluates three moments of a step and takes the largest:

    end of forward      persistent + activations + the loss's transient logits
    start of backward   persistent + activations + gradient of the logits + first gradients
    end of backward     persistent + gradients (+ autocast copies, + one rebuilt layer)

where *persistent* is weights + optimizer state (+ method buffers). On a GPU, a CUDA context and
an allocator margin come on top.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from functools import partial

from lowmem_ft.choices import BASE_QUANTS, SPARSE_METHODS, STATE_POLICIES, STRUCTURED_METHODS
from lowmem_ft.engine import ROUNDING_CHUNK
from lowmem_ft.planner.accounting import (
    DEVICE_STATE_BYTES,
    HOST_STATE_BYTES,
    QUANT_BYTES,
    SIFT_BYTES_PER_ENTRY,
    GiB,
    Precision,
    activation_bytes,
    autocast_copy_bytes,
    hift_group_activation_bytes,
    loss_transient_bytes,
    recompute_bytes,
    sift_activation_bytes,
    sparse_entries,
)
from lowmem_ft.planner.shapes import ModelShape

DTYPE_NAMES = {2: "bf16", 4: "fp32"}
SPARSITY_GRID = (0.10, 0.08, 0.05, 0.04, 0.03, 0.02, 0.01, 0.005, 0.002, 0.001)
# CUDA context, cuBLAS(Lt) workspaces, SDPA and bitsandbytes kernels: outside the allocator, seen by
# NVML; 0.6-1.0 GiB on H100-class cards. Not measured here: `run` measures the real one before step 1.
CUDA_CONTEXT_BYTES = GiB
# Less than this to spare is a bet on the context and the allocator's fragmentation: the plan says so.
THIN_SPARE_BYTES = GiB // 2
ALLOCATOR_MARGIN = 0.05  # fragmentation of the caching allocator, as a fraction of the tensor peak
HOST_RUNTIME_BYTES = {True: 3 * GiB, False: 1 * GiB}  # Python + torch (+ CUDA libraries when on a GPU)
ASSUMED_LINK_BYTES_PER_S = 25e9  # PCIe Gen4 x16 in practice, when NVML cannot tell
# Sustained bf16 training throughput assumed to compare streaming with compute: well below the
# peak of a current data-centre GPU, above a consumer card's. An assumption, and said to be one.
ASSUMED_FLOPS = 100e12
# FLOPs per parameter and token of a step's compute, averaged over a HiFT cycle: forward 2, the
# recompute and input gradients of the layers above the active group (half the model on average)
# 2 + 2 halved. SIFT rebuilds, back-propagates and forms a dense weight gradient in every layer.
FLOPS_PER_PARAM_TOKEN = {"hift": 4, "sparse": 8}


@dataclass
class PlanRequest:
    """What the user asked for; ``None`` means "the planner chooses"."""

    method: str = "full"
    seq_len: int = 512
    batch_size: int = 16
    compute_bytes: int = 2
    micro_batch_size: int | None = None
    gradient_checkpointing: bool | None = None
    units_per_group: int | None = None  # hift
    state_policy: str | None = None  # hift: keep | keep-8bit | drop
    sparsity: float | None = None  # sparse methods
    base_quant: str | None = None  # sparse methods: none | int8 | nf4
    targets: str = "all-linear"  # sparse methods (lowmem_ft/targets.py)
    selection_batches: int = 1  # sift: micro-batches whose gradients choose the entries
    stream: bool = False  # hift / sparse methods: stream every decoder layer (--stream)
    lora_rank: int = 8  # lora, spafit (lowmem_ft/selections.py)
    cutoffs: str | None = None  # spafit
    variant: str = "I"  # spafit
    add_biases: bool = False  # bitfit, spafit
    freeze_layers: str | None = None  # bitfit, lora
    order: str = "bottom-up"  # hift: which group's state is prefetched next
    switch_every: int = 1  # hift: steps each group trains before the next one


@dataclass
class Component:
    name: str
    gpu_bytes: int = 0
    host_bytes: int = 0
    note: str = ""


@dataclass
class Plan:
    fits: bool
    method: str
    device: str  # "cuda" or "cpu"
    settings: dict
    components: list[Component]
    gpu_budget_bytes: int
    gpu_peak_bytes: int
    host_budget_bytes: int
    host_peak_bytes: int
    trainable_params: int
    total_params: int
    traffic_bytes_per_step: int
    link_bytes_per_s: float
    stream_seconds_per_micro_batch: float | None = None  # copying the streamed layers in
    compute_seconds_per_micro_batch: float | None = None  # at ASSUMED_FLOPS
    shortfall: str | None = None
    notes: list[str] = field(default_factory=list)
    peak_phase: str = ""  # where in the step the GPU peak is, e.g. "end of forward, HiFT group embed"

    def to_json(self) -> dict:
        data = asdict(self)
        data["gpu"] = {"budget_bytes": self.gpu_budget_bytes, "peak_bytes": self.gpu_peak_bytes}
        data["host"] = {"budget_bytes": self.host_budget_bytes, "peak_bytes": self.host_peak_bytes}
        for key in ("gpu_budget_bytes", "gpu_peak_bytes", "host_budget_bytes", "host_peak_bytes"):
            del data[key]
        return data


# -- accounting per method ------------------------------------------------------------------------
@dataclass
class Estimate:
    components: list[Component]
    persistent: int  # on the compute device for the whole step
    activations: int
    loss_transient: int
    logits_grad: int
    grads: int
    backward_extra: int  # autocast copies and a rebuilt layer at the end of backward
    traffic: int = 0
    trainable: int = 0
    streamed_per_micro_batch: int = 0  # bytes of streamed weights copied in per micro-batch
    end_step_extra: int = 0  # temporaries of the end of the step (gradients are freed by then)
    made_by_update: int = 0  # made by the optimizer step and alive to the end of it (HiFT drop)
    selection: int = 0  # SIFT: device bytes while the selection window is scored (0: no selection)
    label: str = ""  # which configuration this is (HiFT: the group), for the peak's description
    # Several micro-batches per step: from the second on, the gradients summed so far are alive
    # through its forward and backward.
    accumulating: bool = False
    # HiFT, a group that trains the LM head: bytes beside the activations (and any summed gradients)
    # when the head's weight gradient is made, at the very start of backward (0: no such moment).
    head_gradient: int = 0

    def moments(self) -> dict[str, int]:
        """Device bytes at the moments of a step that can be its peak."""
        summed = self.grads if self.accumulating else 0
        return (
            {
                "end of forward": self.persistent + summed + self.activations + self.loss_transient,
                "start of backward": self.persistent + summed + self.activations + self.logits_grad,
                "end of backward": self.persistent + self.grads + self.backward_extra,
                # (fused AdamW, methods/optimizers.py: no scratch copies of the moments)
                "optimizer step": self.persistent + self.grads + self.made_by_update,
                "end of step": self.persistent + self.end_step_extra + self.made_by_update,
            }
            | ({"selection": self.selection} if self.selection else {})
            | (
                {"head's gradient": self.persistent + summed + self.activations + self.head_gradient}
                if self.head_gradient
                else {}
            )
        )

    def device_peak(self) -> int:
        return max(self.moments().values())

    def peak_phase(self) -> str:
        moments = self.moments()
        moment = max(moments, key=moments.get)
        return f"{moment}, {self.label}" if self.label else moment


def _activation_parts(shape, request, p, micro_batch, checkpointing):
    tokens = request.seq_len * micro_batch
    acts = activation_bytes(shape, request.seq_len, micro_batch, p, checkpointing)
    loss = loss_transient_bytes(shape, tokens, p)
    # The loss's backward starts with three fp32 vocab-sized tensors alive at once: the log-probabilities
    # it kept (counted in the activations), their gradient and the gradient of the fp32 logits (traced).
    logits_grad = 8 * shape.vocab * tokens
    extra = autocast_copy_bytes(shape, p) if p.autocast and not checkpointing else 0
    if checkpointing:
        extra += recompute_bytes(shape, request.seq_len, micro_batch, p)
    components = [
        Component(
            "activations" + (" (checkpointed)" if checkpointing else ""),
            acts - autocast_copy_bytes(shape, p, layers=0 if checkpointing else None),
            note=f"micro-batch {micro_batch} × {request.seq_len} tokens",
        ),
        Component("loss logits (transient)", loss, note="logits and their fp32 copy while the loss runs"),
    ]
    if p.autocast:
        components.append(
            Component(
                "16-bit weight copies (autocast)", autocast_copy_bytes(shape, p, 0 if checkpointing else None)
            )
        )
    return components, acts, loss, logits_grad, extra


def estimate_full(shape: ModelShape, request: PlanRequest, micro_batch: int, checkpointing: bool) -> Estimate:
    p = Precision(weight_bytes=4, compute_bytes=request.compute_bytes)
    n = shape.params
    parts, acts, loss, logits_grad, extra = _activation_parts(shape, request, p, micro_batch, checkpointing)
    components = [
        Component("weights (fp32 master)", 4 * n),
        Component("gradients (fp32)", 4 * n),
        Component("optimizer states (AdamW fp32 m, v)", 8 * n),
        *parts,
    ]
    return Estimate(
        components, 12 * n, acts, loss, logits_grad, 4 * n, extra, trainable=n,
        accumulating=_accumulates(request, micro_batch),
    )  # fmt: skip


def _accumulates(request: PlanRequest, micro_batch: int) -> bool:
    return math.ceil(request.batch_size / micro_batch) > 1


def _groups(shape: ModelShape, units_per_group: int) -> list[int]:
    """Parameter count of each HiFT group: consecutive units, ``units_per_group`` at a time."""
    sizes = [u.params for u in shape.units]
    return [sum(sizes[k : k + units_per_group]) for k in range(0, len(sizes), units_per_group)]


def estimate_hift(
    shape: ModelShape,
    request: PlanRequest,
    micro_batch: int,
    checkpointing: bool,
    units_per_group: int,
    state_policy: str,
    streamed_units: int,
) -> Estimate:
    """Every group's step, evaluated on its own (its size, its streamed layers, its activations, the
    state of the group that comes next), and the worst of them: the largest group is not the one
    with the most activations (the embedding's keeps the whole stack above it)."""
    # 16-bit weights with fp32 masters for the active group, or fp32 weights when computing in fp32.
    w = request.compute_bytes
    p = Precision(weight_bytes=w, compute_bytes=request.compute_bytes)
    unit_bytes = [w * u.params for u in shape.units]
    # The engine streams decoder layers (the first ``streamed_units`` of them), never the embedding
    # or the head: they run once per pass, outside the layers' ring.
    layer_bytes = [w * u.params for u in shape.layer_units]
    streamed = layer_bytes[:streamed_units]
    resident = sum(unit_bytes) - sum(streamed)
    buffers = STREAM_BUFFERS * max(layer_bytes) if streamed_units else 0
    starts = range(0, len(shape.units), units_per_group)
    sizes = _groups(shape, units_per_group)
    # A streamed layer whose group trains gets device memory of its own while it does (its ring
    # slot stays allocated).
    own = [
        sum(
            layer_bytes[u - 1]
            for u in range(k, min(k + units_per_group, len(shape.units)))
            if 1 <= u <= streamed_units
        )
        for k in starts
    ]
    last = [min(k + units_per_group, len(shape.units)) - 1 for k in starts]
    names = [
        shape.units[k].name + (f"..{shape.units[j].name}" if j > k else "")
        for k, j in zip(starts, last, strict=True)
    ]
    group_acts = hift_group_activation_bytes(
        shape, request.seq_len, micro_batch, p, checkpointing, units_per_group
    )
    parts, _, loss, logits_grad, extra = _activation_parts(shape, request, p, micro_batch, checkpointing)
    masters = 4 if w == 2 else 0  # fp32 masters of a 16-bit group
    # Stochastic rounding at the end of the step works through a chunk of the largest tensor at a time.
    rounding = 4 * min(ROUNDING_CHUNK, shape.vocab * shape.hidden) if w == 2 else 0

    # A 16-bit gradient lives until the post-accumulate hook has added it to its fp32 master's
    # gradient: the group's largest tensor once, beside the fp32 gradients (engine/master_weights.py).
    layer_tensor = max((rows * cols for u in shape.layer_units for _, rows, cols in u.linears), default=0)

    def units_of(g: int) -> set[int]:
        first = list(starts)[g]
        return set(range(first, min(first + units_per_group, len(shape.units))))

    def largest_tensor(g: int) -> int:
        """The largest weight whose gradient is made late in backward (the head's comes first)."""
        units = units_of(g)
        if 0 in units:
            return shape.vocab * shape.hidden
        return layer_tensor if units - {len(shape.units) - 1} else 0

    tokens = request.seq_len * micro_batch
    head_unit = 0 if shape.tied_embeddings else len(shape.units) - 1

    def head_gradient(g: int) -> int:
        """The head's weight gradient is made first in backward, while every activation is alive: the
        logits' 16-bit gradient, the head's 16-bit gradient and, on the first micro-batch, the fp32
        master gradient the hook adds it into (on later ones it is among the summed gradients)."""
        if w != 2 or head_unit not in units_of(g):
            return 0
        head = shape.vocab * shape.hidden
        first_micro_batch = 0 if _accumulates(request, micro_batch) else 4 * head
        return p.compute_bytes * shape.vocab * tokens + 2 * head + first_micro_batch

    def prefetch_of(g: int) -> int:
        # The next group's state arrives during this step: the one above in a bottom-up order (the
        # embedding's after the head's: the cycle wraps), below in a top-down one, any in a random
        # one. fp32 on the device whatever the policy.
        n = len(sizes)
        following = {
            "bottom-up": [sizes[(g + 1) % n]],
            "top-down": [sizes[(g - 1) % n]],
        }.get(request.order, [sizes[j] for j in range(n) if j != g])
        return 0 if state_policy == "drop" or n == 1 else DEVICE_STATE_BYTES * max(following)

    def step_of(g: int) -> Estimate:
        prefetch = prefetch_of(g)
        size = sizes[g]
        # Kept state arrives before the step. Dropped state is made by the group's update and freed
        # when the group hands over: it is alive through forward and backward only when the group
        # trains for several steps in a row.
        state = DEVICE_STATE_BYTES * size
        made_by_update = state if state_policy == "drop" and request.switch_every == 1 else 0
        persistent = resident + buffers + own[g] + masters * size + state - made_by_update + prefetch
        kept, rebuilt = group_acts[g]
        return Estimate(
            [], persistent, kept, loss, max(logits_grad, rebuilt), 4 * size,
            extra + (2 * largest_tensor(g) if w == 2 else 0), end_step_extra=rounding,
            trainable=shape.params, label=f"HiFT group {names[g]}",
            accumulating=_accumulates(request, micro_batch), head_gradient=head_gradient(g),
            made_by_update=made_by_update,
        )  # fmt: skip

    worst_group = max(range(len(sizes)), key=lambda g: step_of(g).device_peak())
    worst = step_of(worst_group)
    size = sizes[worst_group]
    prefetch = prefetch_of(worst_group)
    parts[0] = Component(
        parts[0].name, worst.activations, note=f"{parts[0].note}; group {names[worst_group]}"
    )
    host_states = int(HOST_STATE_BYTES[state_policy] * shape.params)
    worst.components = [
        Component(f"weights ({DTYPE_NAMES[w]}, resident)", resident),
        Component(
            f"weights ({DTYPE_NAMES[w]}, streamed)",
            0,
            sum(streamed),
            note=f"{streamed_units} layers in pinned host memory",
        ),  # fmt: skip
        Component("stream buffers", buffers),
        Component("active group: its streamed layers' own device copy", own[worst_group]),
        Component("active group: fp32 master copy", masters * size),
        # fp32 either way: each micro-batch's 16-bit gradient is added to the fp32 master's at once.
        Component("active group: gradients (fp32)", 4 * size),
        Component("active group: optimizer states (AdamW fp32 m, v)", DEVICE_STATE_BYTES * size),
        Component("next group: optimizer states (prefetch)", prefetch),
        Component(
            f"optimizer states of all groups ({state_policy})", 0, host_states, note="pinned host memory"
        ),
        *parts,
        Component(
            "one layer rebuilt in the backward (transient)",
            group_acts[worst_group][1],
            note="checkpointing; after the loss's backward",
        ),
        Component("end of step: stochastic rounding (transient)", rounding, note="one chunk at a time"),
    ]
    state_traffic = 2 * int(HOST_STATE_BYTES[state_policy] * max(sizes))  # in and out, as stored
    passes = 2 if checkpointing else 1  # a streamed unit crosses for the forward and for the recompute
    n_micro = math.ceil(request.batch_size / micro_batch)
    worst.traffic = state_traffic + n_micro * passes * sum(streamed)
    worst.streamed_per_micro_batch = passes * sum(streamed)
    return worst


def sift_targets(shape: ModelShape, targets: str = "all-linear") -> list[int]:
    """Sizes of the target weights ``--targets`` selects, by the module names the model would have."""
    from lowmem_ft.targets import match_targets

    sizes = {
        f"model.layers.{n}.{name}": rows * cols
        for n, unit in enumerate(shape.layer_units)
        for name, rows, cols in unit.linears
    }
    sizes |= {
        name: rows * cols for unit in shape.units if unit.name == "head" for name, rows, cols in unit.linears
    }
    tied = ["lm_head"] if shape.tied_embeddings else []
    return [sizes[name] for name in match_targets(list(sizes), targets, ["model.embed_tokens"], tied)]


def estimate_sift(
    shape: ModelShape,
    request: PlanRequest,
    micro_batch: int,
    checkpointing: bool,
    sparsity: float,
    base_quant: str,
    streamed_units: int = 0,
) -> Estimate:
    # The frozen base is stored in the compute precision (fp32 on a CPU) or quantised.
    w = request.compute_bytes
    p = Precision(weight_bytes=w, compute_bytes=request.compute_bytes)
    targets = sift_targets(shape, request.targets)
    target_params = sum(targets)
    other = shape.params - target_params
    entries = sum(sparse_entries(n, sparsity) for n in targets)
    target_bytes = int(QUANT_BYTES[base_quant] * target_params) if base_quant != "none" else w * target_params
    base = target_bytes + w * other
    # W + Δ in the forward, then in the backward W + Δ again and the dense weight gradient, one
    # after the other: one dense weight-sized tensor at a time (engine/sparse_delta.py).
    dense = p.compute_bytes * max(targets)
    increment = SIFT_BYTES_PER_ENTRY * entries
    parts, _, loss, logits_grad, extra = _activation_parts(shape, request, p, micro_batch, checkpointing)
    acts = sift_activation_bytes(shape, request.seq_len, micro_batch, p, checkpointing)
    parts[0] = Component(parts[0].name, acts, note=parts[0].note)
    base_name = DTYPE_NAMES[w] if base_quant == "none" else base_quant
    # Streaming (an unquantised base only): the first layers' frozen weights wait in host memory.
    layer_bytes = [w * u.params for u in shape.layer_units]
    streamed = sum(layer_bytes[:streamed_units]) if base_quant == "none" else 0
    buffers = STREAM_BUFFERS * max(layer_bytes) if streamed else 0
    base -= streamed
    components = [
        Component(f"base weights ({base_name}, frozen)", base),
        *(
            [
                Component(
                    f"base weights ({base_name}, streamed)",
                    0,
                    streamed,
                    note=f"{streamed_units} layers in pinned host memory",
                ),
                Component("stream buffers", buffers),
            ]
            if streamed
            else []
        ),
        Component(
            "sparse increment: values, indices, gradients, Adam m, v",
            increment,
            note=f"{entries:,} entries ({sparsity:.2%} of {target_params:,})",
        ),
        Component("W + Δ or its dense gradient (transient)", dense, note="one weight at a time"),
        *parts,
    ]
    passes = 2  # forward, and the recompute: streaming runs with activation checkpointing
    n_micro = math.ceil(request.batch_size / micro_batch)
    # The increment's fp32 gradient exists from the backward to the end of the step (and, while
    # micro-batches accumulate, through the next ones): its values, indices and moments all along.
    grads = 4 * entries
    persistent = base + buffers + increment - grads
    return Estimate(
        components, persistent, acts, max(loss, dense), max(logits_grad, dense), grads,
        extra + dense, traffic=n_micro * passes * streamed, trainable=entries,
        streamed_per_micro_batch=passes * streamed, accumulating=_accumulates(request, micro_batch),
        # scoring: no increment yet; a weight's fp32 score and the working copy its top-k needs
        selection=base + buffers + acts + max(logits_grad, dense) + 8 * max(targets),
    )  # fmt: skip


def structured_selection(shape: ModelShape, request: PlanRequest):
    """What a structured method trains in this model: the same function the run uses."""
    from lowmem_ft.selections import select

    return select(
        request.method, shape.named_terms(), shape.decoder_linears(), shape.layers, targets=request.targets,
        freeze_layers=request.freeze_layers, cutoffs=request.cutoffs, variant=request.variant,
        add_biases=request.add_biases, model_type=shape.model_type,
    )  # fmt: skip


def estimate_structured(
    shape: ModelShape, request: PlanRequest, micro_batch: int, checkpointing: bool, base_quant: str
) -> Estimate:
    """BitFit, LoRA, SPAFIT: a frozen base in the compute precision (QLoRA: NF4 where the adapters
    are) and a few whole tensors in fp32 with gradients and AdamW state, 16 bytes per value."""
    w = request.compute_bytes
    p = Precision(weight_bytes=w, compute_bytes=request.compute_bytes)
    selection = structured_selection(shape, request)
    linears, rank = shape.decoder_linears(), request.lora_rank
    trainable = selection.count(shape.named_terms(), linears, rank)
    adapted = sum(rows * cols for rows, cols in (linears[n] for n in selection.lora_targets))
    base = w * shape.params
    if base_quant != "none":
        base -= int((w - QUANT_BYTES[base_quant]) * adapted)
    parts, _, loss, logits_grad, extra = _activation_parts(shape, request, p, micro_batch, checkpointing)
    # Every layer above the lowest trained one is on the gradient path with frozen weights: a sparse
    # run's activations are an upper bound (it also keeps the linear layers' inputs). LoRA adds, per
    # token and adapter, the rank-r output of A and, computing in 16 bits, the adapter's own 16-bit
    # copy of its input (peft computes the adapters from an fp32 cast of it).
    acts = sift_activation_bytes(shape, request.seq_len, micro_batch, p, checkpointing)
    tokens = request.seq_len * micro_batch
    per_adapter = {
        n: p.compute_bytes * (rank + (linears[n][1] if p.compute_bytes == 2 else 0))
        for n in selection.lora_targets
    }
    lora_acts = tokens * sum(per_adapter.values())
    if checkpointing:  # only the layer being rebuilt keeps them
        from lowmem_ft.selections import layer_index

        per_layer: dict[int, int] = {}
        for name, size in per_adapter.items():
            per_layer[layer_index(name)] = per_layer.get(layer_index(name), 0) + size
        extra += tokens * max(per_layer.values(), default=0)
    else:
        acts += lora_acts
    parts[0] = Component(parts[0].name, acts, note=parts[0].note)
    base_name = DTYPE_NAMES[w] + (f", {base_quant} where adapted" if base_quant != "none" else "")
    components = [
        Component(f"base weights ({base_name}, frozen)", base),
        Component(
            "trained tensors: fp32 values, gradients, AdamW m, v",
            16 * trainable,
            note=f"{trainable:,} values: {selection.summary}",
        ),
        *parts,
    ]
    return Estimate(
        components, base + 12 * trainable, acts, loss, logits_grad, 4 * trainable, extra, trainable=trainable,
        accumulating=_accumulates(request, micro_batch),
    )  # fmt: skip


def selection_passes(shape: ModelShape, request: PlanRequest, est: Estimate, spare: int) -> int:
    """Passes over the selection window so that its fp32 running scores fit.

    Scores exist only before training, when the increment's memory (values, states, gradients)
    is not allocated yet; they may use that memory plus what the plan leaves spare, less an fp32
    copy of the largest gradient. One micro-batch needs no running scores at all."""
    if request.selection_batches <= 1:
        return 1
    targets = sift_targets(shape, request.targets)
    increment = next(c.gpu_bytes for c in est.components if c.name.startswith("sparse increment"))
    room = max(increment + spare - 4 * max(targets), 4 * max(targets))
    return min(len(targets), math.ceil(4 * sum(targets) / room))


# -- fitting ---------------------------------------------------------------------------------------
def _micro_batch_candidates(request: PlanRequest) -> list[int]:
    if request.micro_batch_size:
        return [request.micro_batch_size]
    sizes = {request.batch_size} | {2**k for k in range(12) if 2**k < request.batch_size}
    return sorted(sizes, reverse=True)


def _checkpointing_candidates(request: PlanRequest, forced: bool = False) -> list[bool]:
    if request.gradient_checkpointing is not None:
        return [request.gradient_checkpointing]
    return [True] if forced else [False, True]


class Fitter:
    """Turns an Estimate into totals against the budget."""

    def __init__(self, shape: ModelShape, request: PlanRequest, gpu_budget: int, host_budget: int):
        self.shape, self.request = shape, request
        self.gpu_budget, self.host_budget = gpu_budget, host_budget
        self.on_gpu = gpu_budget > 0

    def totals(self, est: Estimate, load_bytes: int) -> tuple[int, int, list[Component]]:
        components = list(est.components)
        tensor_peak = est.device_peak()
        host_fixed = sum(c.host_bytes for c in components)
        runtime = HOST_RUNTIME_BYTES[self.on_gpu]
        if self.on_gpu:
            margin = int(ALLOCATOR_MARGIN * tensor_peak)
            components += [
                Component("CUDA context and allocator margin", CUDA_CONTEXT_BYTES + margin),
                Component(
                    "model loading (host copy before moving to the GPU)", 0, load_bytes, note="transient"
                ),
            ]
            gpu_peak = tensor_peak + CUDA_CONTEXT_BYTES + margin
            # Loading holds a host copy of the weights before they move to the GPU; the pinned stores
            # (optimizer states, streamed units) are filled after that copy is gone.
            host_peak = runtime + max(load_bytes, host_fixed)
        else:  # training on the CPU: what would sit on the GPU sits in host memory
            components = [Component(c.name, 0, c.gpu_bytes + c.host_bytes, c.note) for c in components]
            gpu_peak = 0
            host_peak = runtime + host_fixed + tensor_peak
        components.append(
            Component("Python, torch" + (", CUDA libraries" if self.on_gpu else ""), 0, runtime)
        )
        return gpu_peak, host_peak, components

    def fits(self, gpu_peak: int, host_peak: int) -> bool:
        return (not self.on_gpu or gpu_peak <= self.gpu_budget) and host_peak <= self.host_budget


def make_plan(
    shape: ModelShape, request: PlanRequest, gpu_budget: int, host_budget: int, link: float | None
) -> Plan:
    fitter = Fitter(shape, request, gpu_budget, host_budget)
    search = (
        _search_sift
        if request.method in SPARSE_METHODS
        else _search_structured
        if request.method in STRUCTURED_METHODS
        else {"full": _search_full, "hift": _search_hift}[request.method]
    )
    best, settings, load_bytes, notes = search(shape, request, fitter)
    gpu_peak, host_peak, components = fitter.totals(best, load_bytes)
    fits = fitter.fits(gpu_peak, host_peak)
    plan = Plan(
        fits=fits,
        method=request.method,
        device="cuda" if fitter.on_gpu else "cpu",
        settings=settings,
        components=components,
        gpu_budget_bytes=gpu_budget,
        gpu_peak_bytes=gpu_peak,
        host_budget_bytes=host_budget,
        host_peak_bytes=host_peak,
        trainable_params=best.trainable,
        total_params=shape.params,
        traffic_bytes_per_step=best.traffic,
        link_bytes_per_s=link or ASSUMED_LINK_BYTES_PER_S,
        notes=notes,
        peak_phase=best.peak_phase(),
    )
    if best.streamed_per_micro_batch and fitter.on_gpu:
        _compare_streaming_with_compute(plan, shape, request, best)
    if not fits:
        plan.shortfall = _shortfall(plan, shape, request, gpu_budget, host_budget, link)
    return plan


def _compare_streaming_with_compute(
    plan: Plan, shape: ModelShape, request: PlanRequest, est: Estimate
) -> None:
    """Streaming overlaps with compute; it bounds the step when copying a micro-batch's streamed
    layers in takes longer than computing that micro-batch. The copy is the same for any
    micro-batch, the compute grows with it, so a big enough micro-batch hides the copy."""
    micro = plan.settings["micro_batch_size"]
    kind = "hift" if request.method == "hift" else "sparse"
    flops_per_example = FLOPS_PER_PARAM_TOKEN[kind] * shape.params * request.seq_len
    compute = micro * flops_per_example / ASSUMED_FLOPS
    transfer = est.streamed_per_micro_batch / plan.link_bytes_per_s
    plan.stream_seconds_per_micro_batch, plan.compute_seconds_per_micro_batch = transfer, compute
    if transfer > compute:
        hides = math.ceil(transfer * ASSUMED_FLOPS / flops_per_example)
        plan.notes.append(
            f"streaming bounds throughput at micro-batch {micro}; {hides} × {request.seq_len} tokens per "
            "micro-batch would hide it, if their activations fit (a larger --batch-size, or longer sequences)"
        )
    else:
        plan.notes.append("streaming hides behind compute at this micro-batch")


def _first_fit(
    fitter: Fitter, request: PlanRequest, build, load_bytes: int, forced_checkpointing: bool = False
):
    """Largest micro-batch without checkpointing if it is at least 4 sequences (or the whole batch);
    otherwise checkpointing with the largest micro-batch that fits. Returns (estimate, mb, ckpt) or None."""
    fallback = None
    for checkpointing in _checkpointing_candidates(request, forced_checkpointing):
        for micro_batch in _micro_batch_candidates(request):
            est = build(micro_batch, checkpointing)
            if fitter.fits(*fitter.totals(est, load_bytes)[:2]):
                good_enough = checkpointing or micro_batch >= min(4, request.batch_size)
                if good_enough:
                    return est, micro_batch, checkpointing
                fallback = fallback or (est, micro_batch, checkpointing)
                break
    return fallback


def _smallest(request: PlanRequest, build):
    """The cheapest configuration, to report how far from fitting it is."""
    mb = request.micro_batch_size or 1
    ckpt = True if request.gradient_checkpointing is None else request.gradient_checkpointing
    return build(mb, ckpt), mb, ckpt


def _search_full(shape, request, fitter):
    build = partial(estimate_full, shape, request)
    load = 4 * shape.params
    found = _first_fit(fitter, request, build, load) or _smallest(request, build)
    est, mb, ckpt = found
    return (
        est,
        {"micro_batch_size": mb, "gradient_checkpointing": ckpt, **_accumulation(request, mb)},
        load,
        [],
    )


def _search_structured(shape, request, fitter):
    """The micro-batch as for full fine-tuning; LoRA's base in NF4 (QLoRA) only when an unquantised
    one does not fit, unless --base-quant says which."""
    quants = (
        [request.base_quant]
        if request.base_quant
        else (["none", "nf4"] if request.method == "lora" else ["none"])
    )
    load = request.compute_bytes * shape.params  # loaded in the compute precision, quantised layer by layer
    for quant in quants:
        build = partial(estimate_structured, shape, request, base_quant=quant)
        found = _first_fit(fitter, request, build, load)
        if found:
            break
    est, mb, ckpt = found or _smallest(request, build)
    settings = {"base_quant": quant} if request.method == "lora" else {}
    if request.method == "spafit":
        from lowmem_ft.selections import spafit_cutoffs

        settings["cutoffs"] = ",".join(map(str, spafit_cutoffs(request.cutoffs, shape.layers)))
    settings |= {"micro_batch_size": mb, "gradient_checkpointing": ckpt, **_accumulation(request, mb)}
    return est, settings, load, []


def _accumulation(request: PlanRequest, micro_batch: int) -> dict:
    return {
        "gradient_accumulation": math.ceil(request.batch_size / micro_batch),
        "batch_size": request.batch_size,
    }


def _search_hift(shape, request, fitter):
    n_units = len(shape.units)
    load = request.compute_bytes * shape.params
    policies = [request.state_policy] if request.state_policy else list(STATE_POLICIES)
    max_m = max(1, n_units // 4)  # at least 4 groups: each step still trains a real slice of the model
    group_sizes = [request.units_per_group] if request.units_per_group else list(range(max_m, 0, -1))

    def settings(m, policy, streamed, mb, ckpt):
        return {
            "units_per_group": m,
            "groups": math.ceil(n_units / m),
            "state_policy": policy,
            "resident_units": n_units - streamed,
            "streamed_units": streamed,
            "micro_batch_size": mb,
            "gradient_checkpointing": ckpt,
            **_accumulation(request, mb),
        }

    if request.stream:  # every decoder layer streamed, as asked; policy and group size as usual
        n_layers = len(shape.layer_units)
        for policy in policies:
            for m in group_sizes:
                build = partial(
                    estimate_hift, shape, request, units_per_group=m, state_policy=policy,
                    streamed_units=n_layers,
                )  # fmt: skip
                found = _first_fit(fitter, request, build, load, forced_checkpointing=True)
                if found:
                    est, mb, _ = found
                    return est, settings(m, policy, n_layers, mb, True), load, [STREAMING_NOTE]
    # Prefer, in order: nothing streamed, then the richest state policy the host can hold, then
    # bigger groups. Streaming needs checkpointing (a streamed unit is rebuilt in the backward).
    for policy in policies:
        for m in group_sizes:
            build = partial(
                estimate_hift, shape, request, units_per_group=m, state_policy=policy, streamed_units=0
            )
            found = _first_fit(fitter, request, build, load)
            if found:
                est, mb, ckpt = found
                return est, settings(m, policy, 0, mb, ckpt), load, []
    # Streaming: every micro-batch moves each streamed unit in twice, so a bigger micro-batch can be
    # worth more streamed units. Among the plans that fit, take the least host<->GPU traffic per step.
    m = request.units_per_group or 1
    n_layers = len(shape.layer_units)
    for policy in policies:
        candidates = []
        for streamed in range(1, n_layers + 1):
            build = partial(
                estimate_hift, shape, request, units_per_group=m, state_policy=policy, streamed_units=streamed
            )
            found = _first_fit(fitter, request, build, load, forced_checkpointing=True)
            if found:
                candidates.append((found[0].traffic, streamed, found))
        if candidates:
            _, streamed, (est, mb, _) = min(candidates, key=lambda c: (c[0], c[1]))
            return est, settings(m, policy, streamed, mb, True), load, [STREAMING_NOTE]
    policy = policies[-1]
    build = partial(
        estimate_hift, shape, request, units_per_group=m, state_policy=policy, streamed_units=n_layers
    )
    est, mb, _ = _smallest(request, build)
    return est, settings(m, policy, n_layers, mb, True), load, []


STREAMING_NOTE = (
    "streamed layers are copied in before their forward and again before their backward recompute"
)
STREAM_BUFFERS = 2  # engine/streaming.py: one buffer computing, one arriving


SIFT_DEFAULT_MAX_RATE = 0.05  # the SIFT paper's rate for 7B; more only on an unquantised base


def _search_sift(shape, request, fitter):
    """The rate rises with the budget: the largest rate up to 5% that any base precision allows,
    on the least-quantised base that reaches it; with room to spare, an unquantised base goes on
    up to 10%. The user's --sparsity or --base-quant pins that choice."""
    quants = [request.base_quant] if request.base_quant else list(BASE_QUANTS)
    rates = [request.sparsity] if request.sparsity else list(SPARSITY_GRID)
    # Weights are loaded on the host in the compute precision, then moved (and quantised) one at a time.
    load = request.compute_bytes * shape.params

    n_layers = len(shape.layer_units)
    streamed = n_layers if request.stream else 0

    def best_for(quant: str, allowed: list[float], streamed: int = streamed):
        for rate in allowed:
            build = partial(
                estimate_sift, shape, request, sparsity=rate, base_quant=quant, streamed_units=streamed
            )
            found = _first_fit(fitter, request, build, load, forced_checkpointing=bool(streamed))
            if found:
                return rate, found
        return None

    notes = [STREAMING_NOTE] if streamed else []
    capped = [r for r in rates if r <= SIFT_DEFAULT_MAX_RATE] or rates
    if request.stream:
        quants = ["none"] if request.base_quant in (None, "none") else quants
    results = {quant: best_for(quant, capped) for quant in quants}
    if not any(results.values()) and not streamed and "none" in quants:
        # Not even a quantised base fits: stream an unquantised one, as few layers as will do.
        for n in range(1, n_layers + 1):
            result = best_for("none", capped, n)
            if result:
                results, streamed = {"none": result}, n
                notes.append(STREAMING_NOTE)
                break
    fitting = [(result[0], -quants.index(quant), quant) for quant, result in results.items() if result]
    if not fitting:
        quant, rate = quants[-1], rates[-1]
        est, mb, ckpt = _smallest(
            request,
            partial(estimate_sift, shape, request, sparsity=rate, base_quant=quant, streamed_units=streamed),
        )
    else:
        rate, _, quant = max(fitting)  # highest rate; on a tie, the least quantisation
        rate, (est, mb, ckpt) = results[quant]
        above = [r for r in rates if r > rate]
        if quant == "none" and above:  # room to spare on an unquantised base: go above 5%
            rate, (est, mb, ckpt) = best_for(quant, above, streamed) or (rate, (est, mb, ckpt))
    settings = {"sparsity": rate, "base_quant": quant, "micro_batch_size": mb, "gradient_checkpointing": ckpt}
    if streamed:
        settings["streamed_units"] = streamed if quant == "none" else 0
    if request.method == "sift":
        gpu_peak, host_peak, _ = fitter.totals(est, load)
        spare = fitter.gpu_budget - gpu_peak if fitter.on_gpu else fitter.host_budget - host_peak
        passes = settings["selection_passes"] = selection_passes(shape, request, est, max(0, spare))
        if passes > 1:
            notes.append(
                f"selection scores of {request.selection_batches} micro-batches do not fit at once: "
                f"{passes} passes over them, each scoring a slice of the weights"
            )
    return est, {**settings, **_accumulation(request, mb)}, load, notes


def _shortfall(plan: Plan, shape, request, gpu_budget, host_budget, link) -> str:
    """What is short, by how much, and what would fit instead."""
    from lowmem_ft.hardware import format_bytes

    parts = []
    if plan.device == "cuda" and plan.gpu_peak_bytes > gpu_budget:
        parts.append(f"needs {format_bytes(plan.gpu_peak_bytes - gpu_budget)} more GPU memory")
    if plan.host_peak_bytes > host_budget:
        parts.append(f"needs {format_bytes(plan.host_peak_bytes - host_budget)} more host RAM")
    message = " and ".join(parts) or "does not fit"
    alternatives = []
    if request.method == "hift" and request.state_policy not in (None, "drop"):
        for policy in ("keep-8bit", "drop"):
            if policy != request.state_policy:
                trial = make_plan(shape, replace(request, state_policy=policy), gpu_budget, host_budget, link)
                if trial.fits:
                    alternatives.append(f"--state-policy {policy} would fit")
                    break
    # Options the user pinned: would the planner's own choice fit? One at a time, then all together.
    pinned = {
        option: flag
        for option, flag in (
            ("micro_batch_size", "--micro-batch-size"),
            ("gradient_checkpointing", "--gradient-checkpointing"),
        )
        if getattr(request, option) is not None
    }
    trials = [[option] for option in pinned] + ([list(pinned)] if len(pinned) > 1 else [])
    for options in trials:
        freed = replace(request, **dict.fromkeys(options))
        if make_plan(shape, freed, gpu_budget, host_budget, link).fits:
            alternatives.append(
                f"leaving {' and '.join(pinned[o] for o in options)} to the planner would fit"
            )
            break
    if not alternatives and request.method == "full":
        for method in ("hift", "sift"):
            other = PlanRequest(method, request.seq_len, request.batch_size, request.compute_bytes)
            trial = make_plan(shape, other, gpu_budget, host_budget, link)
            if trial.fits:
                alternatives.append(f"--method {method} would fit")
    return message + ("; " + "; ".join(alternatives) if alternatives else "")
