"""The model's *units*: what HiFT trains as one and what the engine moves as one.

Units are the embedding (with the LM head when the two are tied, and any position embedding), each
decoder layer, and the rest (the final norm with the LM head). They are found through the model's
own API rather than by names, so any Hugging Face causal LM splits the same way: its input and
output embeddings (``get_input_embeddings``, ``get_output_embeddings``) and its decoder layers (the
``ModuleList`` of ``config.num_hidden_layers`` blocks: ``model.layers`` in Llama, ``transformer.h``
in GPT-2, ``gpt_neox.layers``, ``model.decoder.layers`` in OPT). The planner's shapes
(``planner/shapes.py``) use the same split, so a plan's unit counts and a run's agree.

It also says which modules are linear layers: ``nn.Linear`` and GPT-2's ``Conv1D``, the same map
stored transposed (its weight is (in, out)).
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
    """Split a Hugging Face causal LM into units, bottom to top."""
    layers = decoder_layers(model)
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if embed is None or head is None:
        raise UserError(f"{type(model).__name__}: lowmem-ft finds no input embedding or LM head")
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    # Position embeddings (GPT-2's wpe, OPT's embed_positions) run once at the bottom, with the
    # token embedding; everything else outside the layers (final norms, projections) at the top.
    bottom = [embed] + [
        m for m in model.modules() if isinstance(m, torch.nn.Embedding) and m is not embed and m is not head
    ]
    embed_params = _unique(p for module in bottom for p in module.parameters() if id(p) not in in_layers)
    units = [ModelUnit("embed", embed_params)]
    units += [ModelUnit(f"layer.{i}", list(layer.parameters())) for i, layer in enumerate(layers)]
    seen = {id(p) for unit in units for p in unit.params}
    # The LM head unless it is the embedding itself (tied weights), after the final norm(s).
    rest = [p for p in model.parameters() if id(p) not in seen and all(p is not q for q in head.parameters())]
    units.append(ModelUnit("head", _unique([*rest, *(p for p in head.parameters() if id(p) not in seen)])))
    return units


def _unique(params) -> list[torch.nn.Parameter]:
    """In order, each parameter once (a module may be reached twice)."""
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers, bottom to top (unit ``layer.i`` is ``decoder_layers(model)[i]``): the
    ``ModuleList`` of ``config.num_hidden_layers`` modules holding the most parameters."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.ModuleList) and n_layers is not None and len(m) == n_layers
    ]
    if not lists:
        raise UserError(
            f"{type(model).__name__}: lowmem-ft finds no list of {n_layers} decoder layers in this model"
        )
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))


def is_linear(module: torch.nn.Module) -> bool:
    """A linear map with a weight matrix: ``nn.Linear``, or GPT-2's ``Conv1D`` (transposed)."""
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def linear_shape(module: torch.nn.Module) -> tuple[int, int]:
    """(out, in) of a linear layer, whichever way it stores its weight."""
    rows, cols = module.weight.shape
    return (cols, rows) if type(module).__name__ == "Conv1D" else (rows, cols)
