"""FSDP2 for full fine-tuning: each rank holds 1/N of every weight, gradient and optimizer state.

One ``fully_shard`` per decoder layer, then the root (the embedding, the final norm and the head,
tied or not): a layer's weights are gathered just before its forward and backward and freed after,
so a rank holds one layer in full at a time, plus its shards of everything.
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import FSDPModule, fully_shard

from lowmem_ft.distributed.group import Group
from lowmem_ft.models.units import decoder_layers


def shard_model(model: torch.nn.Module, group: Group) -> None:
    mesh = group.device_mesh()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # The recipe's loss is a sum over the tokens of the rank's slice divided by the target tokens of
    # the whole global batch: the gradients of the ranks must be summed, not averaged (FSDP's
    # default). Gloo has no pre-multiplied sum, hence "force sum". Neither setter is recursive.
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def reshard(model: torch.nn.Module) -> None:
    """Free every gathered weight of a sharded model (no-op for one that is not): the next forward
    gathers them again, with each parameter's requires_grad as it is then. The root stays gathered
    after a forward, and a gathered parameter keeps the requires_grad it was gathered with."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_value(norm: torch.Tensor) -> float:
    """A norm FSDP computed over sharded gradients (a replicated DTensor) as a number."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
