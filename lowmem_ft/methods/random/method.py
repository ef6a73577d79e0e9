"""Random masks: k entries per weight, uniformly at random (seeded by --seed), trained exactly like
SIFT (same engine, state and export): the baseline Fu et al. compare gradient-chosen masks against,
at the same budget."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lowmem_ft.methods.sparse.method import Layers, SparseIncrement

if TYPE_CHECKING:
    from lowmem_ft.config import RunConfig


class RandomEntries:
    def __init__(self, seed: int):
        self.seed = seed

    def window_batches(self) -> int:
        return 0

    def choose(self, layers: Layers, k_for, window, backward, sum_over_ranks):
        chosen, generator = {}, None
        for name, layer in layers.items():
            if generator is None:  # one stream for all weights, in model order
                generator = torch.Generator(layer.indices.device).manual_seed(self.seed)
            # Uniform scores and their top k: a uniform k-subset, with 4 bytes per weight entry of
            # scratch (a permutation would take 8).
            scores = torch.rand(layer.weight_numel, generator=generator, device=layer.indices.device)
            chosen[name] = torch.topk(scores, k_for(layer), sorted=False).indices
        return chosen, "at random"


def random_mask(config: RunConfig) -> SparseIncrement:
    return SparseIncrement("random", config, RandomEntries(config.seed))
