"""The options every sparse method takes (torch-free): how much of which weights trains, on what
base. SIFT adds its selection window (sift/options.py)."""

from __future__ import annotations

from dataclasses import dataclass

from lowmem_ft.errors import UserError
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

    def check(self) -> None:
        # The streaming engine moves 16-bit weights; a quantised base is small enough to stay on the
        # GPU, so with both only the norms would be streamed (what the plan calls no streaming).
        if self.stream and self.base_quant not in (None, "none"):
            raise UserError(
                f"--stream streams a 16-bit base from host memory, and a {self.base_quant} base stays on the "
                f"GPU (it is {self.base_quant}'s way to fit); give one of --stream and --base-quant "
                f"{self.base_quant}"
            )
