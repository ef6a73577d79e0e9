"""The optimizers a method can use (`--optimizer`). HiFT is optimizer-independent."""

from __future__ import annotations

import torch

# The state each optimizer keeps per trainable value, in bytes: AdamW's m and v, SGD's momentum and
# Adagrad's sum, all fp32 (every method trains fp32 values: HiFT's are its fp32 masters); 8-bit
# AdamW's two one-byte moments (its per-block scales, 1/64 more, left out).
STATE_BYTES_PER_VALUE = {"adamw": 8, "sgd": 4, "adagrad": 4, "adamw8bit": 2}


def decay_groups(params: list[torch.nn.Parameter], weight_decay: float, decay_1d: bool = False) -> list[dict]:
    """Parameter groups: no weight decay on norms and biases (1-D tensors), as is usual.

    ``decay_1d`` decays every tensor: a sparse increment is stored as 1-D values but belongs to
    weight matrices, and its decay must pull it back towards the base."""
    if decay_1d:
        return [{"params": list(params), "weight_decay": weight_decay}]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def make_optimizer(
    name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float, decay_1d: bool = False
):
    groups = [g for g in decay_groups(params, weight_decay, decay_1d) if g["params"]]
    if name == "adamw":
        # fused=True: one kernel per step and no temporaries; the default foreach kernels allocate
        # full-size scratch copies of the moments during step(), which the planner does not budget.
        fused = all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    if name == "adagrad":
        return torch.optim.Adagrad(groups, lr=lr)
    if name == "adamw8bit":
        import bitsandbytes as bnb  # imported only here: an optional, heavy dependency

        return bnb.optim.AdamW8bit(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)
    raise ValueError(f"unknown optimizer {name!r}")
