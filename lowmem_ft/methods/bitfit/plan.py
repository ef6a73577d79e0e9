"""BitFit: what trains (the bias terms; Llama has none, so its norm weights, and with --add-biases
zero-initialised biases on every linear layer too) and what it costs (structured/plan.py)."""

from __future__ import annotations

from lowmem_ft.methods.bitfit.options import BitFitOptions
from lowmem_ft.methods.structured.plan import plan_structured, shape_inputs
from lowmem_ft.planner.shapes import ModelShape
from lowmem_ft.planner.types import PlanRequest
from lowmem_ft.selections import (
    Selection,
    check_added_biases,
    checked,
    in_layers,
    kinds,
    layer_index,
    layer_ranges,
    parse_layer_ranges,
    without_bias,
)


def select_bitfit(options: BitFitOptions, terms, linears, n_layers: int, model_type: str) -> Selection:
    """``terms``: {name: numel} of the bias and norm weights; ``linears``: {module: (out, in)} of
    the decoder layers' linear layers. --freeze-layers leaves ranges of layers out."""
    if options.add_biases:
        check_added_biases(model_type)
    frozen = parse_layer_ranges(options.freeze_layers, n_layers) if options.freeze_layers else set()
    trained = [n for n in terms if layer_index(n) not in frozen]  # the final norm (layer None) too
    added = in_layers(without_bias(terms, linears), lambda i: i not in frozen) if options.add_biases else []
    where = f" in {layer_ranges(set(range(n_layers)) - frozen)} and the final norm" if frozen else ""
    return checked(Selection(tuple(trained), tuple(added), (), f"{kinds(trained, added)}{where}"), "bitfit")


def plan_bitfit(shape: ModelShape, request: PlanRequest, fitter):
    return plan_structured(shape, request, fitter, select_bitfit(request.options, *shape_inputs(shape)))
