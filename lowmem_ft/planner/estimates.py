"""What one configuration of each method costs: its persistent bytes, activations and transients
per moment of a step (planner/types.py's Estimate). Pure arithmetic over the model's shape."""

from __future__ import annotations

import math

from lowmem_ft.engine import ROUNDING_CHUNK
from lowmem_ft.planner.accounting import (
    DEVICE_STATE_BYTES,
    HOST_STATE_BYTES,
    QUANT_BYTES,
    SIFT_BYTES_PER_ENTRY,
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
from lowmem_ft.planner.types import DTYPE_NAMES, STREAM_BUFFERS, Component, Estimate, PlanRequest


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
