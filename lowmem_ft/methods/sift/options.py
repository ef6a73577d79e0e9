"""SIFT's options (torch-free): the sparse methods' (sparse/options.py) and the selection window."""

from __future__ import annotations

from dataclasses import dataclass

from lowmem_ft.choices import SELECTION_SCORES
from lowmem_ft.errors import UserError
from lowmem_ft.methods.options import at_least, option
from lowmem_ft.methods.sparse.options import SparseOptions


def _score(value: str) -> str | None:
    if value in SELECTION_SCORES:
        return None
    return f"must be grad (|sum of gradients|) or grad2 (sum of squares), got {value!r}"


@dataclass(frozen=True)
class SiftOptions(SparseOptions):
    selection_batches: int = option(
        1, "micro-batches whose gradients choose the entries (not trained on).", check=at_least(1)
    )
    selection_score: str = option(
        "grad", "grad = |sum of gradients|, grad2 = sum of squared gradients.", check=_score
    )
    selection_passes: int | None = option(
        None,
        "passes over the selection window (scores kept for a slice of the weights per pass). "
        "[default: the planner's]",
        check=at_least(1),
        planned=True,
    )

    def check(self) -> None:
        super().check()
        if (self.selection_passes or 1) > 1 and self.selection_batches == 1:
            # One micro-batch's gradient chooses the entries as it is: no running scores to slice.
            raise UserError(
                f"--selection-passes {self.selection_passes} slices the running scores of several selection "
                "micro-batches, and --selection-batches is 1 (it needs none); give --selection-batches "
                "above 1, or leave --selection-passes out"
            )
