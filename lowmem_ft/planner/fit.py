"""Fitting a method's estimates into a budget, and what every method's estimate shares.

A method's planner (its package's plan.py) builds an Estimate for one configuration (micro-batch,
checkpointing and its own choices); ``first_fit`` finds the configuration the planner prefers that
fits, ``Fitter`` turns an estimate into the totals the plan reports.
"""

from __future__ import annotations

import math

from lowmem_ft.distributed.ranks import SHARDED_METHODS
from lowmem_ft.planner.accounting import (
    Precision,
    activation_bytes,
    autocast_copy_bytes,
    loss_transient_bytes,
    recompute_bytes,
)
from lowmem_ft.planner.shapes import ModelShape
from lowmem_ft.planner.types import (
    ALLOCATOR_MARGIN,
    CUDA_CONTEXT_BYTES,
    HOST_RUNTIME_BYTES,
    SMALL_TENSORS_BYTES,
    Component,
    Estimate,
    Execution,
    PlanRequest,
)


def _unpinned(note: str) -> str:
    return note.replace("in pinned host memory", "in host memory").replace("pinned host memory", "")


def can_stream(request: PlanRequest) -> bool:
    """Whether the planner may stream layers when they do not fit resident: one process on a GPU
    (the ranks do not stream; on the CPU the host holds everything anyway), with activation
    checkpointing allowed (a streamed layer is rebuilt in the backward: --no-gradient-checkpointing
    rules streaming out, where the plan once streamed anyway and said checkpointing was off)."""
    return request.ranks == 1 and request.on_gpu and request.gradient_checkpointing is not False


def micro_batch_candidates(request: PlanRequest) -> list[int]:
    if request.micro_batch_size:
        return [request.micro_batch_size]
    batch = request.rank_batch_size
    sizes = {batch} | {2**k for k in range(12) if 2**k < batch}
    return sorted(sizes, reverse=True)


def checkpointing_candidates(request: PlanRequest, forced: bool = False) -> list[bool]:
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
        tensor_peak = est.device_peak() + SMALL_TENSORS_BYTES
        host_fixed = sum(c.host_bytes for c in components)
        runtime = HOST_RUNTIME_BYTES[self.on_gpu]
        ranks = self.request.ranks
        # Sharded over several ranks, the model is read by rank 0 alone, which sends each tensor to
        # the others (distributed/fsdp.load_sharded); otherwise each rank reads it whole.
        loaded_once = ranks > 1 and self.request.method in SHARDED_METHODS
        if self.on_gpu:
            margin = int(ALLOCATOR_MARGIN * tensor_peak)
            at_once = self.loads_at_once(est, load_bytes)
            if loaded_once:
                loading = "model loading (by rank 0, sent to the others a tensor at a time)"
            elif at_once < ranks:
                loading = f"model loading ({at_once} rank{'s' * (at_once > 1)} at a time, the others wait)"
            else:
                loading = "model loading (host copy before moving to the GPU)"
            components += [
                Component("small tensors (step counters, norms, losses)", SMALL_TENSORS_BYTES),
                Component("CUDA context and allocator margin", CUDA_CONTEXT_BYTES + margin),
                Component(loading, 0, load_bytes, note="transient"),
            ]
            gpu_peak = tensor_peak + CUDA_CONTEXT_BYTES + margin
            # Loading holds a host copy of the weights before they move to the GPU; the pinned stores
            # (optimizer states, streamed units) are filled after that copy is gone. Several ranks
            # are processes of their own on this node.
            if loaded_once:
                host_peak = ranks * runtime + max(load_bytes, ranks * host_fixed)
            elif ranks > 1:  # (a rank that has loaded holds what it keeps while the next ones load)
                host_peak = ranks * (runtime + host_fixed) + at_once * load_bytes
            else:
                host_peak = runtime + max(load_bytes, host_fixed)
        else:  # training on the CPU: what would sit on the GPU sits in host memory
            # (nothing is pinned: pinning is for copies to a GPU)
            components = [
                Component(c.name, 0, c.gpu_bytes + c.host_bytes, _unpinned(c.note)) for c in components
            ]
            gpu_peak = 0
            host_peak = ranks * (runtime + host_fixed + tensor_peak)
        components.append(
            Component("Python, torch" + (", CUDA libraries" if self.on_gpu else ""), 0, runtime)
        )
        return gpu_peak, host_peak, components

    def loads_at_once(self, est: Estimate, load_bytes: int) -> int:
        """How many data-parallel ranks of the node load the model at the same time: as many host
        copies as host memory holds beside what every rank keeps, at least one (prepare.py's
        ranks take turns). All of them for the sharded methods, which read the model once, and on
        the CPU, where the loaded model is the one that trains."""
        ranks = self.request.ranks
        if ranks == 1 or not self.on_gpu or self.request.method in SHARDED_METHODS or not load_bytes:
            return ranks
        kept = ranks * (HOST_RUNTIME_BYTES[True] + sum(c.host_bytes for c in est.components))
        return max(1, min(ranks, (self.host_budget - kept) // load_bytes))

    def fits(self, gpu_peak: int, host_peak: int) -> bool:
        return (not self.on_gpu or gpu_peak <= self.gpu_budget) and host_peak <= self.host_budget


def first_fit(
    fitter: Fitter, request: PlanRequest, build, load_bytes: int, forced_checkpointing: bool = False
):
    """Largest micro-batch without checkpointing if it is at least 4 sequences (or the whole batch);
    otherwise checkpointing with the largest micro-batch that fits. A micro-batch the user fixed is
    run without checkpointing whenever it fits so: checkpointing would only buy a larger micro-batch,
    which is not open, at the price of a second forward. Returns (estimate, mb, ckpt) or None."""
    fallback = None
    for checkpointing in checkpointing_candidates(request, forced_checkpointing):
        for micro_batch in micro_batch_candidates(request):
            est = build(micro_batch, checkpointing)
            if fitter.fits(*fitter.totals(est, load_bytes)[:2]):
                good_enough = (
                    checkpointing
                    or request.micro_batch_size is not None
                    or micro_batch >= min(4, request.rank_batch_size)
                )
                if good_enough:
                    return est, micro_batch, checkpointing
                fallback = fallback or (est, micro_batch, checkpointing)
                break
    return fallback


def smallest(request: PlanRequest, build):
    """The cheapest configuration, to report how far from fitting it is."""
    mb = request.micro_batch_size or 1
    ckpt = True if request.gradient_checkpointing is None else request.gradient_checkpointing
    return build(mb, ckpt), mb, ckpt


def execution(
    request: PlanRequest, micro_batch: int, checkpointing: bool, streamed_units: int | None = None
) -> Execution:
    """How a step of the chosen configuration is cut and run (each rank's slice of the batch in
    micro-batches). ``streamed_units``: None for a method that never streams."""
    return Execution(
        micro_batch_size=micro_batch,
        gradient_checkpointing=checkpointing,
        gradient_accumulation=math.ceil(request.rank_batch_size / micro_batch),
        batch_size=request.batch_size,
        ranks=request.ranks,
        streamed_units=streamed_units,
    )


STREAMING_NOTE = (
    "streamed layers are copied in before their forward and again before their backward recompute"
)


def activation_parts(
    shape: ModelShape, request: PlanRequest, p: Precision, micro_batch: int, checkpointing: bool
) -> tuple[list[Component], int, int, int, int]:
    """What every method's step holds beside its weights: activations, the loss's transient logits,
    the logits' gradient and the backward's extras. Returns (components, activations, loss
    transient, logits gradient, backward extra)."""
    tokens = request.seq_len * micro_batch
    acts = activation_bytes(shape, request.seq_len, micro_batch, p, checkpointing)
    loss = loss_transient_bytes(shape, tokens, p)
    # The loss's backward starts with three fp32 vocab-sized tensors alive at once: the log-probabilities
    # it kept (counted in the activations), their gradient and the gradient of the fp32 logits (traced).
    logits_grad = 8 * shape.vocab * tokens
    extra = autocast_copy_bytes(shape, p) if p.autocast and not checkpointing else 0
    if checkpointing:
        extra += recompute_bytes(shape, request.seq_len, micro_batch, p)
        # The top layer is rebuilt once the loss's backward has freed the logits' gradient, beside
        # every layer's checkpointed input: the larger of the two meets the activations (as HiFT's)
        logits_grad = max(logits_grad, extra)
    components = [
        Component(
            "activations" + (" (checkpointed)" if checkpointing else ""),
            acts - autocast_copy_bytes(shape, p, layers=0 if checkpointing else None),
            note=f"micro-batch {micro_batch} × {request.seq_len} tokens",
        ),
        Component("loss logits (transient)", loss, note="logits and their fp32 copy while the loss runs"),
        Component(
            "backward: logits' gradient" + (" or a rebuilt layer" if checkpointing else "") + " (transient)",
            logits_grad,
            note="the larger, beside the activations" if checkpointing else "beside the activations",
        ),
    ]
    if p.autocast:
        components.append(
            Component(
                "16-bit weight copies (autocast)", autocast_copy_bytes(shape, p, 0 if checkpointing else None)
            )
        )
    return components, acts, loss, logits_grad, extra


def accumulates(request: PlanRequest, micro_batch: int) -> bool:
    return math.ceil(request.rank_batch_size / micro_batch) > 1
