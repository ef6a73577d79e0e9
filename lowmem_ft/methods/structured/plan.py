"""The structured methods' planner (BitFit, LoRA, SPAFIT): a frozen base and a few whole tensors."""

from __future__ import annotations

from functools import partial

from lowmem_ft.planner.accounting import (
    QUANT_BYTES,
    Precision,
    sift_activation_bytes,
)
from lowmem_ft.planner.fit import (
    accumulates,
    activation_parts,
    execution,
    first_fit,
    smallest,
)
from lowmem_ft.planner.shapes import ModelShape
from lowmem_ft.planner.types import DTYPE_NAMES, Component, Estimate, MethodPlan, PlanRequest
from lowmem_ft.selections import Selection


def shape_inputs(shape: ModelShape) -> tuple[dict, dict, int, str]:
    """What a structured method's ``select_*`` reads, from the shape the model would have: its bias
    and norm terms, its decoder layers' linear layers, its depth and its type."""
    return shape.named_terms(), shape.decoder_linears(), shape.layers, shape.model_type


def estimate_structured(
    shape: ModelShape,
    request: PlanRequest,
    micro_batch: int,
    checkpointing: bool,
    base_quant: str,
    selection: Selection,
    rank: int,
) -> Estimate:
    """BitFit, LoRA, SPAFIT: a frozen base in the compute precision (QLoRA: NF4 where the adapters
    are) and a few whole tensors in fp32 with gradients and AdamW state, 16 bytes per value."""
    w = request.compute_bytes
    p = Precision(weight_bytes=w, compute_bytes=request.compute_bytes, on_gpu=request.on_gpu)
    linears = shape.decoder_linears()
    trainable = selection.count(shape.named_terms(), linears, rank)
    adapted = sum(rows * cols for rows, cols in (linears[n] for n in selection.lora_targets))
    base = w * shape.params
    if base_quant != "none":
        base -= int((w - QUANT_BYTES[base_quant]) * adapted)
    parts, _, loss, logits_grad, extra = activation_parts(shape, request, p, micro_batch, checkpointing)
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
        accumulating=accumulates(request, micro_batch),
    )  # fmt: skip


def plan_structured(
    shape: ModelShape,
    request: PlanRequest,
    fitter,
    selection: Selection,
    rank: int = 0,
    quants: list[str] | None = None,
) -> MethodPlan:
    """The micro-batch as for full fine-tuning, for what ``selection`` trains (LoRA adapters of
    ``rank``). ``quants``: the base precisions to try in order (LoRA: none, then NF4); the one chosen
    is among the settings. Without them, the base stays in the compute precision."""
    load = request.compute_bytes * shape.params  # loaded in the compute precision, quantised layer by layer
    for quant in quants or ["none"]:
        build = partial(estimate_structured, shape, request, base_quant=quant, selection=selection, rank=rank)
        found = first_fit(fitter, request, build, load)
        if found:
            break
    est, mb, ckpt = found or smallest(request, build)
    chosen = {"base_quant": quant} if quants else {}
    return MethodPlan(est, chosen, execution(request, mb, ckpt), load)
