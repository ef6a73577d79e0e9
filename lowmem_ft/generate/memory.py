"""Whether a generation fits the GPU: the weights, a KV cache for the prompt and the new tokens,
the CUDA context."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowmem_ft.errors import UserError
from lowmem_ft.sizes import format_bytes


# -- memory on a GPU ------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationMemory:
    """What generation holds on the device: the weights and the KV cache; the activations of one
    forward of a single sequence are small beside them and are left out."""

    weights: int
    kv_cache: int
    context: int  # the CUDA context, as the planner counts it

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.context


def generation_memory(config, params: int, dtype: torch.dtype, tokens: int) -> GenerationMemory:
    """Bytes for ``params`` weights in ``dtype`` and a KV cache of ``tokens`` positions (one
    sequence): keys and values, each layers × KV heads × head size per position."""
    from lowmem_ft.planner.plan import CUDA_CONTEXT_BYTES

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", 1)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", 1)
    itemsize = dtype.itemsize
    return GenerationMemory(
        weights=params * itemsize,
        kv_cache=2 * layers * kv_heads * head_dim * tokens * itemsize,
        context=CUDA_CONTEXT_BYTES,
    )


def check_fits(memory: GenerationMemory, free_bytes: int, device: torch.device, tokens: int) -> None:
    """A one-line UserError when the weights and KV cache cannot fit in the device's free memory."""
    if memory.total <= free_bytes:
        return
    raise UserError(
        f"generating needs about {format_bytes(memory.total)} on {device} (weights "
        f"{format_bytes(memory.weights)}, KV cache for {tokens:,} tokens {format_bytes(memory.kv_cache)}, "
        f"CUDA context {format_bytes(memory.context)}) and {format_bytes(free_bytes)} is free; "
        "free the GPU, lower --max-new-tokens, use --dtype bf16, or --device cpu"
    )
