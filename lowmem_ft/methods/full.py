"""Full fine-tuning: every parameter trains, every step, with AdamW.

The baseline the other methods are measured against. Standard mixed precision: fp32 weights and
fp32 AdamW moments (4 + 4 + 8 = 16 bytes per parameter, plus 4 for the gradient), compute in the
run's dtype under autocast. This is exactly the memory a 7B model cannot get on one GPU, which is
why the other methods exist.
"""

from __future__ import annotations

import torch

from lowmem_ft.methods.base import Method


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: no weight decay on norms and biases (1-D tensors), as is usual."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


class FullFineTuning(Method):
    name = "full"
    summary = "all parameters, every step, AdamW with fp32 master weights (the baseline)"

    def weight_dtype(self, config) -> torch.dtype:
        return torch.float32  # fp32 master weights; compute precision comes from autocast

    def setup(self, model, config) -> None:
        model.requires_grad_(True)
        self._params = [p for p in model.parameters() if p.requires_grad]
        # fused=True: one kernel per step and no temporaries; the default foreach kernels allocate
        # full-size scratch copies of the moments during step(), which the planner does not budget.
        self.optimizer = torch.optim.AdamW(
            decay_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.95), eps=1e-8, fused=True
        )

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self._params
