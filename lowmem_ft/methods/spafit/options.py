"""SPAFIT's options (torch-free): the depth cut-offs, the variant, and LoRA's adapters on top."""

from __future__ import annotations

from dataclasses import dataclass

from lowmem_ft.choices import SPAFIT_VARIANTS
from lowmem_ft.methods.options import (
    MethodOptions,
    add_biases,
    lora_alpha,
    lora_dropout,
    lora_rank,
    option,
)


def _variant(value: str) -> str | None:
    return None if value in SPAFIT_VARIANTS else f"must be I or II, got {value!r}"


@dataclass(frozen=True)
class SpafitOptions(MethodOptions):
    cutoffs: str | None = option(
        None,
        "N1,N2: layers below N1 frozen, N1 to N2-1 bias/norm only, N2 up LoRA on attention. "
        "[default: the paper's 4,9 of 24 layers, scaled to the model]",
        planned=True,
    )
    variant: str = option(
        "I", "I = LoRA only in the top layers; II = LoRA and bias/norm terms there.", check=_variant
    )
    lora_rank: int = lora_rank()
    lora_alpha: float | None = lora_alpha()
    lora_dropout: float = lora_dropout()
    add_biases: bool = add_biases()
