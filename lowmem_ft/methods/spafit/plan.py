"""SPAFIT: what trains, by depth, with cut-offs N1 <= N2 — layers [0, N1) frozen, [N1, N2) their
bias and norm terms only, [N2, L) LoRA on the attention projections (variant II: and their bias and
norm terms) — and what it costs (structured/plan.py)."""

from __future__ import annotations

import re
from dataclasses import replace

from lowmem_ft.errors import UserError
from lowmem_ft.methods.spafit.options import SpafitOptions
from lowmem_ft.methods.structured.plan import plan_structured, shape_inputs
from lowmem_ft.planner.shapes import ModelShape
from lowmem_ft.planner.types import MethodPlan, PlanRequest
from lowmem_ft.selections import (
    Selection,
    check_added_biases,
    checked,
    in_layers,
    kinds,
    layer_ranges,
    without_bias,
)
from lowmem_ft.targets import match_targets

# SPAFIT's cut-offs on BERT-large (24 layers) were 4 and 9; other depths keep the proportions.
PAPER_CUTOFFS, PAPER_LAYERS = (4, 9), 24


def spafit_cutoffs(spec: str | None, n_layers: int) -> tuple[int, int]:
    """N1, N2 from ``--cutoffs N1,N2``, or the paper's 4 and 9 of 24 layers scaled to this depth
    (rounded half to even, as docs/methods.md says: 28 layers give 5,10)."""
    if spec is None:
        return tuple(round(c * n_layers / PAPER_LAYERS) for c in PAPER_CUTOFFS)
    match = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", spec)
    if not match or not int(match.group(1)) <= int(match.group(2)) < n_layers:
        raise UserError(
            f"--cutoffs {spec!r}: expected N1,N2 with 0 <= N1 <= N2 < {n_layers} (the model's layers): "
            f"layers below N1 frozen, N1 to N2-1 bias/norm only, N2 and above LoRA"
        )
    return int(match.group(1)), int(match.group(2))


def select_spafit(options: SpafitOptions, terms, linears, n_layers: int, model_type: str) -> Selection:
    if options.add_biases:
        check_added_biases(model_type)
    n1, n2 = spafit_cutoffs(options.cutoffs, n_layers)
    terms_from = n1 if options.variant == "II" else None  # variant I: terms only in [N1, N2)
    keep_terms = lambda i: n1 <= i < n2 or (terms_from is not None and i >= n2)  # noqa: E731
    trained = in_layers(terms, keep_terms)
    added = in_layers(without_bias(terms, linears), keep_terms) if options.add_biases else []
    chosen = in_layers(match_targets(list(linears), "attention"), lambda i: i >= n2)
    summary = (
        (f"{layer_ranges(set(range(n1)))} frozen, " if n1 else "")
        + (f"{layer_ranges(set(range(n1, n2)))}: {kinds(trained, added, n1, n2)}, " if n2 > n1 else "")
        + f"{layer_ranges(set(range(n2, n_layers)))}: LoRA on attention"
        + (f" + {kinds(trained, added, n2, n_layers)}" if options.variant == "II" else "")
        + f" (SPAFIT-{n1}-{n2}-{options.variant})"
    )
    return checked(Selection(tuple(trained), tuple(added), tuple(chosen), summary), "spafit")


def plan_spafit(shape: ModelShape, request: PlanRequest, fitter) -> MethodPlan:
    options = request.options
    selection = select_spafit(options, *shape_inputs(shape))
    planned = plan_structured(shape, request, fitter, selection, options.lora_rank)
    cutoffs = ",".join(map(str, spafit_cutoffs(options.cutoffs, shape.layers)))
    return replace(planned, chosen={"cutoffs": cutoffs, **planned.chosen})
