"""Full fine-tuning's planner: every parameter with fp32 weights, gradients and AdamW state."""

from __future__ import annotations

from functools import partial

from lowmem_ft.planner.accounting import (
    Precision,
)
from lowmem_ft.planner.fit import (
    accumulates,
    accumulation,
    activation_parts,
    first_fit,
    smallest,
)
from lowmem_ft.planner.shapes import ModelShape
from lowmem_ft.planner.types import Component, Estimate, PlanRequest


def estimate_full(shape: ModelShape, request: PlanRequest, micro_batch: int, checkpointing: bool) -> Estimate:
    p = Precision(weight_bytes=4, compute_bytes=request.compute_bytes, on_gpu=request.on_gpu)
    n = shape.params
    parts, acts, loss, logits_grad, extra = activation_parts(shape, request, p, micro_batch, checkpointing)
    components = [
        Component("weights (fp32 master)", 4 * n),
        Component("gradients (fp32)", 4 * n),
        Component("optimizer states (AdamW fp32 m, v)", 8 * n),
        *parts,
    ]
    return Estimate(
        components, 12 * n, acts, loss, logits_grad, 4 * n, extra, trainable=n,
        accumulating=accumulates(request, micro_batch),
    )  # fmt: skip


def plan_full(shape: ModelShape, request: PlanRequest, fitter):
    build = partial(estimate_full, shape, request)
    load = 4 * shape.params
    found = first_fit(fitter, request, build, load) or smallest(request, build)
    est, mb, ckpt = found
    return (
        est,
        {"micro_batch_size": mb, "gradient_checkpointing": ckpt, **accumulation(request, mb)},
        load,
        [],
    )
