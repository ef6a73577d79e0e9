"""Sparse masks chosen without data, trained exactly like SIFT (same engine, state and export).

They are the baselines Fu et al. compare gradient-chosen masks against, at the same budget:

    random      k entries per weight, uniformly at random (seeded by --seed)
    magnitude   the k entries per weight with the largest |θ0| (MagPruning)
"""

from __future__ import annotations

import torch

from lowmem_ft.methods.sift import SparseIncrement


class RandomMask(SparseIncrement):
    name = "random"

    def choose(self, name, layer) -> torch.Tensor:
        if not hasattr(self, "_generator"):  # one stream for all weights, in model order
            self._generator = torch.Generator(layer.indices.device).manual_seed(self.config.seed)
        # Uniform scores and their top k: a uniform k-subset, with 4 bytes per weight entry of
        # scratch (a permutation would take 8).
        scores = torch.rand(layer.weight_numel, generator=self._generator, device=layer.indices.device)
        return torch.topk(scores, self.k_for(layer), sorted=False).indices


class MagnitudeMask(SparseIncrement):
    name = "magnitude"

    def choose(self, name, layer) -> torch.Tensor:
        weight, _ = layer.base.dense(torch.float32)
        return torch.topk(weight.reshape(-1).abs(), self.k_for(layer), sorted=False).indices
