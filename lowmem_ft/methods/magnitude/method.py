"""Magnitude masks (MagPruning): the k entries of each base weight with the largest |θ0|, trained
exactly like SIFT (same engine, state and export); a baseline Fu et al. compare against."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lowmem_ft.methods.sparse.method import Layers, SparseIncrement

if TYPE_CHECKING:
    from lowmem_ft.config import RunConfig


class MagnitudeEntries:
    def window_batches(self) -> int:
        return 0

    def choose(self, layers: Layers, k_for, window, backward, sum_over_ranks):
        chosen = {}
        for name, layer in layers.items():
            weight, _ = layer.base.dense(torch.float32)
            chosen[name] = torch.topk(weight.reshape(-1).abs(), k_for(layer), sorted=False).indices
        return chosen, "by |θ0|"


def magnitude_mask(config: RunConfig) -> SparseIncrement:
    return SparseIncrement("magnitude", config, MagnitudeEntries())
