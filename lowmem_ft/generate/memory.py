"""Whether a generation fits the GPU (the weights, a KV cache for the prompt and the new tokens,
the CUDA context), and how many decoder layers to stream from host memory where it does not."""

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


def layers_to_stream(memory: GenerationMemory, layer_bytes: list[int], free_bytes: int) -> int | None:
    """How many decoder layers, from the bottom, to leave in host memory and stream through the
    GPU at each forward (engine/streaming.py, as training streams them) so that the other weights,
    the streaming ring (``N_BUFFERS`` of the largest streamed layer), the KV cache and the context
    fit in ``free_bytes``. ``layer_bytes``: each layer's weights. 0 when everything fits on the
    device; None when not even streaming every layer does.

    Streamed, every new token reads those layers' weights across the host link once: far slower
    than resident weights, but the model answers where its training fitted."""
    return next((n for n in range(len(layer_bytes) + 1) if held(memory, layer_bytes, n) <= free_bytes), None)


def held(memory: GenerationMemory, layer_bytes: list[int], streamed: int) -> int:
    """Bytes on the device with the first ``streamed`` decoder layers in host memory: everything
    else, and the ring of ``N_BUFFERS`` buffers of the largest streamed layer they cross into."""
    from lowmem_ft.engine.streaming import N_BUFFERS

    ring = N_BUFFERS * max(layer_bytes[:streamed], default=0)
    return memory.total - sum(layer_bytes[:streamed]) + ring


def refuse(
    memory: GenerationMemory, free_bytes: int, device: torch.device, tokens: int, layer_bytes: list[int]
) -> None:
    """The one-line UserError for a generation that does not fit ``device`` even with every decoder
    layer streamed."""
    least = held(memory, layer_bytes, len(layer_bytes))
    raise UserError(
        f"generating needs about {format_bytes(least)} on {device} even with every decoder layer left in "
        f"host memory (all the weights: {format_bytes(memory.weights)}; KV cache for {tokens:,} tokens "
        f"{format_bytes(memory.kv_cache)}, CUDA context {format_bytes(memory.context)}) and "
        f"{format_bytes(free_bytes)} is free; free the GPU, lower --max-new-tokens, use --dtype bf16, "
        "or --device cpu"
    )
