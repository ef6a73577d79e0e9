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
from functools import partial

from lowmem_ft.choices import BASE_QUANTS, SPARSE_METHODS, STATE_POLICIES, STRUCTURED_METHODS
from lowmem_ft.planner.advice import shortfall
from lowmem_ft.planner.estimates import (
    estimate_full,
    estimate_hift,
    estimate_sift,
    estimate_structured,
    sift_targets,
)
from lowmem_ft.planner.shapes import ModelShape
from lowmem_ft.planner.types import (  # the data model: also imported from here
    ALLOCATOR_MARGIN,
    ASSUMED_FLOPS,
    ASSUMED_LINK_BYTES_PER_S,
    CUDA_CONTEXT_BYTES,
    FLOPS_PER_PARAM_TOKEN,
    HOST_RUNTIME_BYTES,
    SMALL_TENSORS_BYTES,
    THIN_SPARE_BYTES,
    Component,
    Estimate,
    Plan,
    PlanRequest,
)

__all__ = [
    "ALLOCATOR_MARGIN", "ASSUMED_FLOPS", "CUDA_CONTEXT_BYTES", "THIN_SPARE_BYTES", "Component", "Estimate",
    "Plan", "PlanRequest", "estimate_full", "estimate_hift", "estimate_sift", "estimate_structured",
    "make_plan", "sift_targets",
]  # fmt: skip

SPARSITY_GRID = (0.10, 0.08, 0.05, 0.04, 0.03, 0.02, 0.01, 0.005, 0.002, 0.001)


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
        tensor_peak = est.device_peak() + SMALL_TENSORS_BYTES
        host_fixed = sum(c.host_bytes for c in components)
        runtime = HOST_RUNTIME_BYTES[self.on_gpu]
        if self.on_gpu:
            margin = int(ALLOCATOR_MARGIN * tensor_peak)
            components += [
                Component("small tensors (step counters, norms, losses)", SMALL_TENSORS_BYTES),
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
        plan.shortfall = shortfall(
            plan, request, lambda other: make_plan(shape, other, gpu_budget, host_budget, link)
        )
    return plan


def _replan(shape, gpu_budget: int, host_budget: int, link, request: PlanRequest) -> Plan:
    return make_plan(shape, request, gpu_budget, host_budget, link)


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
