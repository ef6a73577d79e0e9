"""Frozen linear layers quantised to 4-bit NF4 by bitsandbytes, for LoRA on a quantised base (QLoRA).

``bnb.nn.Linear4bit`` is what peft recognises as a 4-bit base layer. Each weight is moved to the
compute device and quantised there before the next one is touched, so the full-precision model
never has to fit on the device (as engine/sparse_delta.py does for the sparse methods).
"""

from __future__ import annotations

import torch

from lowmem_ft.engine import NF4_BLOCKSIZE
from lowmem_ft.errors import UserError


def quantise_linears_4bit(
    model: torch.nn.Module, names: tuple[str, ...], device: torch.device, compute_dtype: torch.dtype
) -> None:
    import bitsandbytes as bnb  # optional and heavy: only for a quantised base

    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        if not isinstance(linear, torch.nn.Linear):  # GPT-2's Conv1D: peft's 4-bit LoRA expects Linear
            raise UserError(
                f"--base-quant nf4 (QLoRA) needs nn.Linear layers; {name} is a {type(linear).__name__} "
                "(GPT-2 style); use --base-quant none"
            )
        quantised = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            compute_dtype=compute_dtype, quant_type="nf4", device="meta",
        )  # fmt: skip
        # bitsandbytes 0.49+ repacks the weight for its AVX512-BF16 CPU kernel at the first forward
        # in eval mode without grad (an evaluation) and keeps it so: later training forwards then
        # go through gemv_4bit, which has no autograd (input gradients are lost). Never repack.
        quantised.support_avx512bf16_for_cpu = False
        quantised.weight = bnb.nn.Params4bit(
            linear.weight.data, requires_grad=False, quant_type="nf4", blocksize=NF4_BLOCKSIZE
        )
        if linear.bias is not None:
            quantised.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
        setattr(parent, child, quantised.to(device))  # quantised on its way to the device
        del linear
