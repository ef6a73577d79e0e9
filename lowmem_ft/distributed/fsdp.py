"""FSDP2 for full fine-tuning: each rank holds 1/N of every weight, gradient and optimizer state.

One ``fully_shard`` per decoder layer, then the root (the embedding, the final norm and the head,
tied or not): a layer's weights are gathered just before its forward and backward and freed after,
so a rank holds one layer in full at a time, plus its shards of everything.

The weights are read once: rank 0 loads the model into host memory, every rank (rank 0 too) builds
it empty on the meta device and shards that, and rank 0 sends each tensor in turn, of which each
rank keeps its shard (``load_sharded``). Host memory then holds one whole model on the node, not
one per rank (8 copies of 25 GiB for a 7B model in fp32 on 8 GPUs), and a GPU one whole tensor at
a time beside its shards.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard

from lowmem_ft.distributed.group import Group
from lowmem_ft.errors import UserError
from lowmem_ft.models import ResolvedModel, empty_model, load_model
from lowmem_ft.models.units import decoder_layers


def load_sharded(
    resolved: ResolvedModel, dtype: torch.dtype, group: Group, trust_remote_code: bool = False
) -> torch.nn.Module:
    """The model, sharded over ``group`` and on its device: read by rank 0 alone (module doc)."""
    # Built empty first, on every rank: a model whose code cannot be built on the meta device (remote
    # code that computes with its weights as it builds them) is said before rank 0 spends minutes
    # reading the weights, not after.
    model = _empty(resolved, dtype, trust_remote_code, group.ranks.size)
    whole = load_model(resolved, dtype, trust_remote_code=trust_remote_code) if group.main else None
    group.wait_long()  # the others wait for it, which may take longer than a collective's timeout
    if whole is not None:
        # Rank 0's is the exported model: built from the loaded config (same modules), it saves the
        # loaded model's config and generation settings with the result.
        model = empty_model(whole.config, dtype, trust_remote_code)
        model.generation_config = whole.generation_config
    shard_model(model, group)
    model.to_empty(device=group.device)  # each rank's shards, not yet filled
    _receive_weights(model, whole)
    return model  # ``whole`` goes with this frame: rank 0 keeps its shards only


def _empty(resolved: ResolvedModel, dtype: torch.dtype, trust_remote_code: bool, ranks: int):
    try:
        return empty_model(resolved.config, dtype, trust_remote_code)
    except Exception as exc:
        raise UserError(
            f"--nproc {ranks} shards the model from an empty copy built on torch's meta device, and "
            f"{resolved.name}'s code cannot build one ({type(exc).__name__}: {exc}); run it in one "
            "process (without --nproc), or with a data-parallel method (--method lora)"
        ) from exc


def _receive_weights(model: torch.nn.Module, whole: torch.nn.Module | None) -> None:
    """Fill an emptied sharded ``model`` with rank 0's ``whole`` model (None on the other ranks).
    Weights and persistent buffers through torch's own broadcast of a full state dict, one tensor at
    a time; the buffers a state dict leaves out (rotary frequencies, computed when the model is
    built) one by one after it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(
        model,
        whole.state_dict() if whole is not None else {},
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
    )
    loaded = dict(whole.named_buffers()) if whole is not None else {}
    for name, buffer in model.named_buffers():  # FSDP2 leaves buffers whole on every rank
        if whole is not None:
            buffer.copy_(loaded[name])
        dist.broadcast(buffer, src=0)


def shard_model(model: torch.nn.Module, group: Group) -> None:
    """``fully_shard`` as the module doc says; a model with weights on the host is moved to the
    group's device as it is sharded, one layer at a time, and an empty one (on the meta device)
    stays there."""
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
