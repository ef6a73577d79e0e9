"""The structured methods' planner (BitFit, LoRA, SPAFIT): a frozen base and a few whole tensors."""

from __future__ import annotations

from functools import partial

from lowmem_ft.planner.accounting import (
    LayerTrains,
    Precision,
    evaluation_bytes,
    qlora_nf4_bytes,
    structured_activation_bytes,
)
from lowmem_ft.planner.fit import (
    accumulates,
    activation_parts,
    execution,
    first_fit,
    smallest,
)
from lowmem_ft.planner.shapes import ModelShape
from lowmem_ft.planner.types import WIDTH_NAMES, Component, Estimate, MethodPlan, PlanRequest
from lowmem_ft.selections import Selection, layer_index


def shape_inputs(shape: ModelShape) -> tuple[dict, dict, int, str]:
    """What a structured method's ``select_*`` reads, from the shape the model would have: its bias
    and norm terms, its decoder layers' linear layers, its depth and its type."""
    return shape.named_terms(), shape.decoder_linears(), shape.layers, shape.model_type


def trained_per_layer(
    selection: Selection, terms: dict[str, int], linears: dict[str, tuple[int, int]], shape: ModelShape
) -> dict[int, LayerTrains]:
    """{decoder layer: what trains in it}: the widths its trained norm weights normalise (q and k
    norms: every head's values) and its LoRA adapters' input widths. A bias trains from its
    output's gradient alone, but puts its layer on the gradient path."""
    per_head = {"q_norm": shape.heads * shape.head_dim, "k_norm": shape.kv_heads * shape.head_dim}
    norms: dict[int, list[int]] = {}  # every layer where a norm weight or a bias trains
    inputs: dict[int, list[int]] = {}
    for name in (*selection.terms, *selection.added_biases):  # (added biases are not among ``terms``)
        if layer_index(name) is not None:
            widths = norms.setdefault(layer_index(name), [])
            if name in terms and not name.endswith(".bias"):
                module = name.rsplit(".", 2)[-2]  # "...self_attn.q_norm.weight" -> "q_norm"
                widths.append(per_head.get(module, terms[name]))
    for name in selection.lora_targets:
        inputs.setdefault(layer_index(name), []).append(linears[name][1])
    return {
        i: LayerTrains(tuple(norms.get(i, ())), tuple(inputs.get(i, ())), terms=i in norms)
        for i in sorted(set(norms) | set(inputs))
    }


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
    adapted = [rows * cols for rows, cols in (linears[n] for n in selection.lora_targets)]
    base = w * shape.params
    if base_quant == "nf4":  # QLoRA: the adapted layers' weights
        base += sum(qlora_nf4_bytes(n) - w * n for n in adapted)
    parts, _, loss, logits_grad, extra = activation_parts(shape, request, p, micro_batch, checkpointing)
    trains = trained_per_layer(selection, shape.named_terms(), linears, shape)
    final_norm_trains = any(layer_index(n) is None and not n.endswith(".bias") for n in selection.terms)
    acts = structured_activation_bytes(
        shape, request.seq_len, micro_batch, p, checkpointing, trains, rank, final_norm_trains
    )
    if p.compute_bytes == 2 and not checkpointing:
        # autocast makes a 16-bit copy of each fp32 adapter weight (A and B), kept from the forward
        # for the backward (objective.autocast: no weight cache, so a checkpointed layer's are made
        # again when it is rebuilt)
        acts += 2 * rank * sum(sum(linears[n]) for n in selection.lora_targets)
    # --lora-dropout: each adapter's dropout keeps its mask, a byte per input value (a GPU's fused
    # dropout; the CPU's keeps it in the fp32 the adapter computes in)
    mask_bytes = (1 if p.on_gpu else 4) * (getattr(request.options, "lora_dropout", 0) > 0)
    tokens = request.seq_len * micro_batch
    if not checkpointing:
        acts += tokens * mask_bytes * sum(sum(t.adapter_inputs) for t in trains.values())
    else:  # the layer being rebuilt keeps its adapters' inputs, outputs and masks too
        per_layer = [
            (p.compute_bytes + mask_bytes) * sum(t.adapter_inputs)
            + p.compute_bytes * rank * len(t.adapter_inputs)
            for t in trains.values()
        ]
        extra += tokens * max(per_layer, default=0)
        # beside every checkpoint once the logits' gradient is gone (activation_parts). A trained
        # layer's keep-set (recompute_bytes) is an upper bound for the frozen one rebuilt here, and
        # covers its backward's own gradients (a frozen layer's count did not, on small models)
        logits_grad = max(logits_grad, extra)
    if base_quant == "nf4":
        # bitsandbytes' 4-bit matmul dequantises the whole weight for each input gradient (and, on
        # the GPU, for a forward of many tokens): one 16-bit weight at a time. Counted at the end of
        # backward; while activations are alive, the logits' gradient (far larger) covers it.
        extra += w * max(adapted, default=0)
    parts[0] = Component(parts[0].name, acts, note=parts[0].note)
    base_name = WIDTH_NAMES[w] + (f", {base_quant} where adapted" if base_quant != "none" else "")
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
        evaluation=evaluation_bytes(shape, request.seq_len * micro_batch),
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
