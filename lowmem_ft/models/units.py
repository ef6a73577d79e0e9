"""The model's *units*: what HiFT trains as one and what the engine moves as one.

Units are the embedding (with the LM head when the two are tied), each decoder layer, and the
final norm with the LM head. The same split is used by the planner (``planner/shapes.py``), so a
plan's unit counts and a run's agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowmem_ft.errors import UserError


@dataclass
class ModelUnit:
    name: str  # "embed", "layer.0", ..., "head"
    params: list[torch.nn.Parameter]


def model_units(model: torch.nn.Module) -> list[ModelUnit]:
    """Split a Hugging Face decoder-only model (Llama family) into units, bottom to top."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    embed = getattr(base, "embed_tokens", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if layers is None or embed is None or head is None:
        raise UserError(
            f"{type(model).__name__}: lowmem-ft finds no embedding/layers/head to split into units"
        )
    units = [ModelUnit("embed", list(embed.parameters()))]
    units += [ModelUnit(f"layer.{i}", list(layer.parameters())) for i, layer in enumerate(layers)]
    seen = {id(p) for unit in units for p in unit.params}
    # The final norm plus the LM head unless it is the embedding itself (tied weights).
    tail = [
        p for module in (getattr(base, "norm", None), head) if module is not None for p in module.parameters()
    ]
    units.append(ModelUnit("head", [p for p in tail if id(p) not in seen]))
    covered = {id(p) for unit in units for p in unit.params}
    missing = [name for name, p in model.named_parameters() if id(p) not in covered]
    if missing:
        raise UserError(f"{type(model).__name__}: parameters outside every unit: {', '.join(missing[:3])}")
    return units


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers, bottom to top (unit ``layer.i`` is ``decoder_layers(model)[i]``)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise UserError(f"{type(model).__name__}: lowmem-ft finds no decoder layers to stream")
    return list(layers)
