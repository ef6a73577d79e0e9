"""LoRA's options (torch-free): the adapters' shape, where they go, and the frozen base."""

from __future__ import annotations

from dataclasses import dataclass

from lowmem_ft.methods.options import (
    MethodOptions,
    base_quant,
    freeze_layers,
    lora_alpha,
    lora_dropout,
    lora_rank,
    targets,
)


def _qlora_or_none(value: str) -> str | None:
    return None if value in ("none", "nf4") else f"for --method lora is none or nf4 (QLoRA), got {value!r}"


@dataclass(frozen=True)
class LoraOptions(MethodOptions):
    lora_rank: int = lora_rank()
    lora_alpha: float | None = lora_alpha()
    lora_dropout: float = lora_dropout()
    targets: str = targets()
    base_quant: str | None = base_quant(check=_qlora_or_none)
    freeze_layers: str | None = freeze_layers()
