"""The sparse methods' planner: the rate, the base's precision and what is streamed."""

from __future__ import annotations

import math
from functools import lru_cache, partial

from lowmem_ft.choices import BASE_QUANTS
from lowmem_ft.planner.accounting import (
    QUANT_BYTES,
    SIFT_BYTES_PER_ENTRY,
    Precision,
    evaluation_bytes,
    sift_activation_bytes,
    sparse_entries,
)
from lowmem_ft.planner.fit import (
    STREAMING_NOTE,
    accumulates,
    activation_parts,
    can_stream,
    execution,
    first_fit,
    smallest,
)
from lowmem_ft.planner.shapes import ModelShape
from lowmem_ft.planner.types import (
    STREAM_BUFFERS,
    WIDTH_NAMES,
    Component,
    Estimate,
    MethodPlan,
    PlanRequest,
)

SPARSITY_GRID = (0.10, 0.08, 0.05, 0.04, 0.03, 0.02, 0.01, 0.005, 0.002, 0.001)


@lru_cache(maxsize=32)  # the planner's searches ask for the same shape's targets thousands of times
def sift_targets(shape: ModelShape, targets: str = "all-linear") -> tuple[int, ...]:
    """Sizes of the target weights ``--targets`` selects, by the module names the model would have,
    checked as the run checks them (methods/sparse/method.py): a tied LM head is the embedding's
    weight, the embeddings and norms are not linear layers."""
    from lowmem_ft.targets import match_targets

    sizes = {name: rows * cols for name, (rows, cols) in shape.linears().items()}
    tied = ["lm_head"] if shape.tied_embeddings else []
    norms = [m for m in dict.fromkeys(n.rsplit(".", 1)[0] for n in shape.named_terms()) if m not in sizes]
    chosen = match_targets(list(sizes), targets, [*shape.embeddings, *norms], tied)
    return tuple(sizes[name] for name in chosen)


@lru_cache(maxsize=256)
def trainable_entries(targets: tuple[int, ...], sparsity: float) -> int:
    """The entries all the target weights train at ``sparsity``, for each rate the search tries."""
    return sum(sparse_entries(n, sparsity) for n in targets)


def estimate_sparse(
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
    p = Precision(weight_bytes=w, compute_bytes=request.compute_bytes, on_gpu=request.on_gpu)
    targets = sift_targets(shape, request.options.targets)
    target_params = sum(targets)
    other = shape.params - target_params
    entries = trainable_entries(targets, sparsity)
    target_bytes = int(QUANT_BYTES[base_quant] * target_params) if base_quant != "none" else w * target_params
    base = target_bytes + w * other
    # W + Δ in the forward, then in the backward W + Δ again and the dense weight gradient, one
    # after the other: one dense weight-sized tensor at a time (engine/sparse_delta.py).
    dense = p.compute_bytes * max(targets)
    increment = SIFT_BYTES_PER_ENTRY * entries
    parts, _, loss, logits_grad, extra = activation_parts(shape, request, p, micro_batch, checkpointing)
    acts = sift_activation_bytes(shape, request.seq_len, micro_batch, p, checkpointing)
    parts[0] = Component(parts[0].name, acts, note=parts[0].note)
    base_name = WIDTH_NAMES[w] if base_quant == "none" else base_quant
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
    n_micro = math.ceil(request.rank_batch_size / micro_batch)
    # The increment's fp32 gradient exists from the backward to the end of the step (and, while
    # micro-batches accumulate, through the next ones): its values, indices and moments all along.
    grads = 4 * entries
    persistent = base + buffers + increment - grads
    # Checkpointed, each layer's backward rebuilds it, and its weights' dense gradients are made
    # beside that rebuilt layer and the checkpoints below (traced: Mistral-7B, streamed at 12 GiB,
    # was 0.3% below its trace counting the larger of the two, not both).
    rebuilt = extra if checkpointing else 0
    return Estimate(
        components, persistent, acts, max(loss, dense), max(logits_grad, rebuilt + dense), grads,
        extra + dense, traffic=n_micro * passes * streamed, trainable=entries,
        streamed_per_micro_batch=passes * streamed, accumulating=accumulates(request, micro_batch),
        # scoring: no increment yet; a weight's fp32 score and the working copy its top-k needs
        selection=base + buffers + acts + max(logits_grad, dense) + 8 * max(targets),
        # evaluation's forwards make W + Δ too, a weight at a time
        evaluation=max(evaluation_bytes(shape, request.seq_len * micro_batch), dense),
    )  # fmt: skip


SIFT_DEFAULT_MAX_RATE = 0.05  # the SIFT paper's rate for 7B; more only on an unquantised base


def plan_sparse(shape: ModelShape, request: PlanRequest, fitter) -> MethodPlan:
    """The rate rises with the budget: the largest rate up to 5% that any base precision allows,
    on the least-quantised base that reaches it; with room to spare, an unquantised base goes on
    up to 10%. The user's --sparsity or --base-quant pins that choice."""
    quants = [request.options.base_quant] if request.options.base_quant else list(BASE_QUANTS)
    rates = [request.options.sparsity] if request.options.sparsity else list(SPARSITY_GRID)
    # Weights are loaded on the host in the compute precision, then moved (and quantised) one at a time.
    load = request.compute_bytes * shape.params

    n_layers = len(shape.layer_units)
    streamed = n_layers if request.options.stream else 0

    def best_for(quant: str, allowed: list[float], streamed: int = streamed):
        for rate in allowed:
            build = partial(
                estimate_sparse, shape, request, sparsity=rate, base_quant=quant, streamed_units=streamed
            )
            found = first_fit(fitter, request, build, load, forced_checkpointing=bool(streamed))
            if found:
                return rate, found
        return None

    notes = [STREAMING_NOTE] if streamed else []
    capped = [r for r in rates if r <= SIFT_DEFAULT_MAX_RATE] or rates
    if request.options.stream:
        quants = ["none"] if request.options.base_quant in (None, "none") else quants
    results = {quant: best_for(quant, capped) for quant in quants}
    if not any(results.values()) and not streamed and "none" in quants and can_stream(request):
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
        est, mb, ckpt = smallest(
            request,
            partial(
                estimate_sparse, shape, request, sparsity=rate, base_quant=quant, streamed_units=streamed
            ),
        )
    else:
        rate, _, quant = max(fitting)  # highest rate; on a tie, the least quantisation
        rate, (est, mb, ckpt) = results[quant]
        above = [r for r in rates if r > rate]
        if quant == "none" and above:  # room to spare on an unquantised base: go above 5%
            rate, (est, mb, ckpt) = best_for(quant, above, streamed) or (rate, (est, mb, ckpt))
    # (streamed units are said only where streaming was asked for or needed)
    streamed_units = (streamed if quant == "none" else 0) if streamed else None
    steps = execution(request, mb, ckpt, streamed_units)
    return MethodPlan(est, {"sparsity": rate, "base_quant": quant}, steps, load, notes)
