"""SIFT: train only the entries of each weight whose gradients matter most (Song et al., ICML 2024).

The training is the sparse methods' one engine (sparse/method.py); what is SIFT's own is how the
entries are chosen: per weight, the top k of |Σg| (``--selection-score grad``, as SIFT and Fu et
al.'s SAM rank) or Σg² (``grad2``, SAM's Fisher option) over a window of ``--selection-batches``
micro-batches (SAM's burn-in), which are only looked at, never trained on. The window's running
scores are fp32 and dense, so with a window of more than one micro-batch the targets are scored in
``--selection-passes`` slices (planner's choice), each a full pass over the window; with one
micro-batch, each gradient is reduced to its top k as soon as it exists and no scores are kept.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch

from lowmem_ft.methods.sparse.method import Backward, Layers, SparseIncrement

if TYPE_CHECKING:
    from lowmem_ft.config import RunConfig
    from lowmem_ft.methods.sift.options import SiftOptions


class GradientEntries:
    """The top k entries of each weight by their gradients over a selection window."""

    def __init__(self, batches: int, score: str, passes: int | None):
        self.batches, self.score, self.passes = batches, score, passes

    def window_batches(self) -> int:
        return self.batches

    def choose(self, layers: Layers, k_for, window: list[dict | None], backward: Backward, sum_over_ranks):
        if not window:
            raise ValueError("SIFT selection needs at least one micro-batch")
        passes = 1 if self.batches == 1 else max(1, min(self.passes or 1, len(layers)))
        names = list(layers)
        chosen: dict[str, torch.Tensor] = {}
        for chunk in _balanced_slices(names, [layers[n].weight_numel for n in names], passes):
            scores: dict[str, torch.Tensor] = {}
            for i, batch in enumerate(window):
                last = i == len(window) - 1
                for name in chunk:
                    k = k_for(layers[name])
                    layers[name].on_dense_gradient = partial(
                        self._score, name, k, scores, chosen, last, sum_over_ranks
                    )
                backward(batch)
            for name in chunk:
                layers[name].on_dense_gradient = None
        score = "|Σg|" if self.score == "grad" else "Σg²"
        how = (  # the whole window's size (with several ranks, each looked at its share)
            f"by {score} over {self.batches} micro-batch"
            + ("es" if self.batches > 1 else "")
            + (f" in {passes} passes" if passes > 1 else "")
        )
        return chosen, how

    def _score(
        self, name, k: int, scores, chosen, last: bool, sum_over_ranks, dense_grad: torch.Tensor
    ) -> None:
        """Fold one micro-batch's dense gradient into the running score; on the window's last
        micro-batch, sum the score over the ranks (each scored its share of the window: Σg and Σg²
        add up), keep only the top-k positions and drop the dense score."""
        g = dense_grad.float()  # may be dense_grad itself: the backward discards it afterwards
        if self.score == "grad2":
            g = g.square_()
        running = scores.pop(name, None)
        total = g if running is None else running.add_(g)
        if not last:
            scores[name] = total
            return
        sum_over_ranks(total)  # (every rank reaches this layer's last micro-batch at once: same order)
        score = total.abs_() if self.score == "grad" else total
        chosen[name] = torch.topk(score.reshape(-1), k, sorted=False).indices


def sift(config: RunConfig) -> SparseIncrement:
    options: SiftOptions = config.method_options
    chooser = GradientEntries(options.selection_batches, options.selection_score, options.selection_passes)
    return SparseIncrement("sift", config, chooser)


def _balanced_slices(names: list[str], sizes: list[int], parts: int) -> list[list[str]]:
    """Split ``names`` in order into ``parts`` consecutive slices of similar total size."""
    total, slices, current, acc = sum(sizes), [], [], 0
    for name, size in zip(names, sizes, strict=True):
        current.append(name)
        acc += size
        if acc >= total * (len(slices) + 1) / parts and len(slices) < parts - 1:
            slices.append(current)
            current = []
    if current:
        slices.append(current)
    return slices
