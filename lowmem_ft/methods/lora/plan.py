"""LoRA: what trains (an adapter on each --targets linear layer outside --freeze-layers) and what
it costs (structured/plan.py); its base in NF4 (QLoRA) only when an unquantised one does not fit,
unless --base-quant says which."""

from __future__ import annotations

from lowmem_ft.methods.lora.options import LoraOptions
from lowmem_ft.methods.structured.plan import plan_structured, shape_inputs
from lowmem_ft.planner.shapes import ModelShape
from lowmem_ft.planner.types import PlanRequest
from lowmem_ft.selections import Selection, checked, layer_index, layer_ranges, parse_layer_ranges
from lowmem_ft.targets import match_targets


def select_lora(options: LoraOptions, terms, linears, n_layers: int, model_type: str) -> Selection:
    frozen = parse_layer_ranges(options.freeze_layers, n_layers) if options.freeze_layers else set()
    chosen = [n for n in match_targets(list(linears), options.targets) if layer_index(n) not in frozen]
    where = f" in {layer_ranges(set(range(n_layers)) - frozen)}" if frozen else ""
    summary = f"LoRA on {len(chosen)} linear layers ({options.targets}){where}"
    return checked(Selection((), (), tuple(chosen), summary), "lora")


def plan_lora(shape: ModelShape, request: PlanRequest, fitter):
    options = request.options
    selection = select_lora(options, *shape_inputs(shape))
    quants = [options.base_quant] if options.base_quant else ["none", "nf4"]
    return plan_structured(shape, request, fitter, selection, options.lora_rank, quants)
