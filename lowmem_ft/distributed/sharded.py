"""What the recipe asks of a model that may be sharded with FSDP2 (distributed/fsdp.py), without
importing FSDP: a process that never shards one (one rank, the data-parallel methods' ranks, the
launcher) does not pay the second that importing it takes. A model is sharded only once FSDP has
been imported."""

from __future__ import annotations

import sys

import torch


def is_sharded(model: torch.nn.Module) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def reshard(model: torch.nn.Module) -> None:
    """Free every gathered weight of a sharded model (no-op for one that is not): the next forward
    gathers them again, with each parameter's requires_grad as it is then. The root stays gathered
    after a forward, and a gathered parameter keeps the requires_grad it was gathered with."""
    if not is_sharded(model):
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_value(norm: torch.Tensor) -> float:
    """A norm FSDP computed over sharded gradients (a replicated DTensor) as a number."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
