"""Fit a fine-tuning method into a machine: choose settings, account every byte, say what is short.

``make_plan(shape, request, budget)`` is the whole planner. It is pure arithmetic over the model's
shape (no weights, no torch), so `lowmem-ft plan` answers in a second or two and `run` uses
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
from dataclasses import replace

from lowmem_ft.planner.advice import shortfall
from lowmem_ft.planner.fit import Fitter
from lowmem_ft.planner.shapes import ModelShape
from lowmem_ft.planner.types import (  # the data model: also imported from here
    ALLOCATOR_MARGIN,
    ASSUMED_FLOPS,
    ASSUMED_LINK_BYTES_PER_S,
    CUDA_CONTEXT_BYTES,
    FLOPS_PER_PARAM_TOKEN,
    THIN_SPARE_BYTES,
    Component,
    Estimate,
    Execution,
    MethodPlan,
    Plan,
    PlanRequest,
)
from lowmem_ft.registry import METHOD_SPECS, planned_options

__all__ = [
    "ALLOCATOR_MARGIN", "ASSUMED_FLOPS", "CUDA_CONTEXT_BYTES", "THIN_SPARE_BYTES", "Component", "Estimate",
    "Execution", "Plan", "PlanRequest", "make_plan",
]  # fmt: skip


def make_plan(
    shape: ModelShape,
    request: PlanRequest,
    gpu_budget: int,
    host_budget: int,
    link: float | None,
    advise: bool = True,
) -> Plan:
    """The plan of ``request`` on this machine; one that does not fit says what would
    (``shortfall``), unless ``advise`` is False: the advice's own trial plans need only whether they
    fit (their advice in turn, and its trials', made ``plan llama-2-70b`` take a minute)."""
    request = replace(request, on_gpu=gpu_budget > 0)  # what runs where, for the accounting
    fitter = Fitter(shape, request, gpu_budget, host_budget)
    # The method's own planner (its package's plan.py) chooses; this totals what it chose.
    chosen: MethodPlan = METHOD_SPECS[request.method].planner()(shape, request, fitter)
    planned = planned_options(request.method)
    if not set(chosen.chosen) <= set(planned):
        raise ValueError(
            f"{request.method}'s planner chose {sorted(set(chosen.chosen) - set(planned))}, "
            f"which are not among its planned options {planned}"
        )
    best, execution, load_bytes = chosen.estimate, chosen.execution, chosen.load_bytes
    gpu_peak, host_peak, components = fitter.totals(best, load_bytes)
    fits = fitter.fits(gpu_peak, host_peak)
    plan = Plan(
        fits=fits,
        method=request.method,
        device="cuda" if fitter.on_gpu else "cpu",
        settings={**chosen.chosen, **chosen.derived, **execution.settings()},
        execution=execution,
        # the user's options, with the planner's values where they were left open
        method_options=replace(
            request.options, **{k: v for k, v in chosen.chosen.items() if getattr(request.options, k) is None}
        ),
        components=components,
        gpu_budget_bytes=gpu_budget,
        gpu_peak_bytes=gpu_peak,
        host_budget_bytes=host_budget,
        host_peak_bytes=host_peak,
        trainable_params=best.trainable,
        total_params=shape.params,
        traffic_bytes_per_step=best.traffic,
        link_bytes_per_s=link or ASSUMED_LINK_BYTES_PER_S,
        notes=list(chosen.notes),
        peak_phase=best.peak_phase(),
        ranks=request.ranks,
        loads_at_once=fitter.loads_at_once(best, load_bytes),
    )
    if plan.loads_at_once < plan.ranks:
        plan.notes.append(
            f"the {plan.ranks} ranks load the model {plan.loads_at_once} at a time: host memory holds "
            f"{plan.loads_at_once} whole cop{'ies' if plan.loads_at_once > 1 else 'y'} while they load"
        )
    if best.streamed_per_micro_batch and fitter.on_gpu:
        _compare_streaming_with_compute(plan, shape, request, best)
    if not fits and advise:
        plan.shortfall = shortfall(
            plan, request, lambda other: make_plan(shape, other, gpu_budget, host_budget, link, advise=False)
        )
    return plan


def _compare_streaming_with_compute(
    plan: Plan, shape: ModelShape, request: PlanRequest, est: Estimate
) -> None:
    """Streaming overlaps with compute; it bounds the step when copying a micro-batch's streamed
    layers in takes longer than computing that micro-batch. The copy is the same for any
    micro-batch, the compute grows with it, so a big enough micro-batch hides the copy."""
    micro = plan.execution.micro_batch_size
    kind = "hift" if request.method == "hift" else "sparse"
    flops_per_example = FLOPS_PER_PARAM_TOKEN[kind] * shape.params * request.seq_len
    compute = micro * flops_per_example / ASSUMED_FLOPS
    transfer = est.streamed_per_micro_batch / plan.link_bytes_per_s
    plan.stream_seconds_per_micro_batch, plan.compute_seconds_per_micro_batch = transfer, compute
    if transfer > compute:
        hides = math.ceil(transfer * ASSUMED_FLOPS / flops_per_example)
        said = (
            f"streaming bounds throughput at micro-batch {micro}; {hides} × {request.seq_len} tokens per "
            "micro-batch would hide it"
        )
        if request.micro_batch_size is not None:
            said += ", if their activations fit (--micro-batch-size)"
        elif micro >= request.rank_batch_size:  # the whole batch already: it is what caps the micro-batch
            said += ", if their activations fit (a larger --batch-size)"
        elif request.method != "hift":  # it streamed as few layers as will do: more make room
            said += ", where streaming more layers makes room for it (--micro-batch-size)"
        else:  # the planner took the largest micro-batch that fits
            said += ", but no larger micro-batch fits this budget"
            if getattr(plan.method_options, "state_policy", None) in ("keep", "keep-8bit"):
                said += (
                    " (--state-policy drop leaves room: no state of the next group comes in; each visit"
                    " then starts its state afresh)"
                )
        plan.notes.append(said)
    else:
        plan.notes.append("streaming hides behind compute at this micro-batch")
