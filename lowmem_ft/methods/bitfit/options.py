"""BitFit's options (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from lowmem_ft.methods.options import MethodOptions, add_biases, freeze_layers


@dataclass(frozen=True)
class BitFitOptions(MethodOptions):
    add_biases: bool = add_biases()
    freeze_layers: str | None = freeze_layers()
