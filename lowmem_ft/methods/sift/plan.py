"""SIFT's planner: the sparse methods' (sparse/plan.py), and how many passes over the selection
window let its running scores fit."""

from __future__ import annotations

import math
from dataclasses import replace

from lowmem_ft.methods.sparse.plan import plan_sparse, sift_targets
from lowmem_ft.planner.shapes import ModelShape
from lowmem_ft.planner.types import Estimate, MethodPlan, PlanRequest


def plan_sift(shape: ModelShape, request: PlanRequest, fitter) -> MethodPlan:
    planned = plan_sparse(shape, request, fitter)
    gpu_peak, host_peak, _ = fitter.totals(planned.estimate, planned.load_bytes)
    spare = fitter.gpu_budget - gpu_peak if fitter.on_gpu else fitter.host_budget - host_peak
    needed = selection_passes(shape, request, planned.estimate, max(0, spare))
    passes = request.options.selection_passes or needed  # the user's, when given: the run uses it
    notes = list(planned.notes)
    if passes < needed:
        notes.append(
            f"--selection-passes {passes}: the selection scores need {needed} passes to fit beside the rest; "
            "with fewer the selection may run out of memory before training starts"
        )
    elif passes > 1:
        notes.append(
            f"selection scores of {request.options.selection_batches} micro-batches do not fit at once: "
            f"{passes} passes over them, each scoring a slice of the weights"
        )
    return replace(planned, chosen={**planned.chosen, "selection_passes": passes}, notes=notes)


def selection_passes(shape: ModelShape, request: PlanRequest, est: Estimate, spare: int) -> int:
    """Passes over the selection window so that its fp32 running scores fit.

    Scores exist only before training, when the increment's memory (values, states, gradients)
    is not allocated yet; they may use that memory plus what the plan leaves spare, less an fp32
    copy of the largest gradient. One micro-batch needs no running scores at all."""
    if request.options.selection_batches <= 1:
        return 1
    targets = sift_targets(shape, request.options.targets)
    increment = next(c.gpu_bytes for c in est.components if c.name.startswith("sparse increment"))
    room = max(increment + spare - 4 * max(targets), 4 * max(targets))
    return min(len(targets), math.ceil(4 * sum(targets) / room))
