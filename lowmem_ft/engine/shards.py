"""A rank's shard of a sharded (FSDP2, DTensor) optimizer-state tensor, and back: the state store
keeps each rank's part on the host, and gives it back to the optimizer shaped as its parameter."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._dtensor_spec import TensorMeta


def local_part(value):
    """A rank's shard of a sharded (DTensor) state tensor; anything else as it is."""
    return value.to_local() if isinstance(value, DTensor) else value


def shaped_like(param: torch.Tensor, value):
    """``value`` (a rank's shard of a state tensor of ``param``) as the optimizer holds it: a DTensor
    sharded as ``param`` is, when ``param`` is one; scalars (step counts) and the rest as they are."""
    if not isinstance(param, DTensor) or not isinstance(value, torch.Tensor) or value.ndim == 0:
        return value
    # Not DTensor.from_local: it would copy a host shard to the mesh's device (every waiting group's
    # state on the GPU at once, in a checkpoint). A DTensor may wrap a host shard, as FSDP2's own CPU
    # offload does; DCP reads and writes it where it is.
    meta = TensorMeta(param.shape, param.stride(), value.dtype)
    return DTensor(value, replace(param._spec, tensor_meta=meta), requires_grad=False)
