"""Full fine-tuning: every parameter trains, every step, with AdamW.

The baseline the other methods are measured against. With several ranks (--nproc) FSDP2 shards
weights, gradients and optimizer state over them (distributed/fsdp.py). Standard mixed precision:
fp32 weights and fp32 AdamW moments (4 + 4 + 8 = 16 bytes per parameter, plus 4 for the
gradient), compute in the run's dtype under autocast. This is exactly the memory a 7B model
cannot get on one GPU, which is why the other methods exist.
"""

from __future__ import annotations

import torch

from lowmem_ft.methods.base import Method
from lowmem_ft.methods.optimizers import make_optimizer


class FullFineTuning(Method):
    name = "full"

    def __init__(self, config):
        super().__init__(config)
        self._params: list[torch.nn.Parameter] = []

    def weight_dtype(self) -> torch.dtype:
        return torch.float32  # fp32 master weights; compute precision comes from autocast

    def setup(self, model) -> None:
        config = self.config
        # With several ranks the model came sharded (distributed/fsdp.load_sharded): each rank keeps
        # 1/N of the weights, and the optimizer made here 1/N of their gradients and AdamW state.
        model.requires_grad_(True)
        self._params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(config.optimizer, self._params, config.lr, config.weight_decay)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self._params
