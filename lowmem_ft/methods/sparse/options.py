"""The options every sparse method takes (torch-free): how much of which weights trains, on what
base. SIFT adds its selection window (sift/options.py)."""

from __future__ import annotations

from dataclasses import dataclass

from lowmem_ft.methods.options import MethodOptions, base_quant, option, stream, targets


def _fraction(value: float) -> str | None:
    if 0 < value <= 1:
        return None
    return f"is the fraction of each weight that trains, in (0, 1], e.g. 0.01; got {value}"


@dataclass(frozen=True)
class SparseOptions(MethodOptions):
    sparsity: float | None = option(
        None,
        "fraction of each target weight that trains, e.g. 0.01. [default: the planner's]",
        check=_fraction,
        planned=True,
    )
    targets: str = targets()
    base_quant: str | None = base_quant()
    stream: bool = stream()
