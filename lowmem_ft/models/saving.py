"""Writing a model in the format other tools load: a Hugging Face directory of safetensors."""

from __future__ import annotations

from pathlib import Path

import torch

from lowmem_ft.files import readable_as_umask_allows
from lowmem_ft.models.loading import ResolvedModel, quiet_transformers


def save_hf_model(
    model: torch.nn.Module, tokenizer, out_dir: Path, save_dtype: torch.dtype, state: dict | None = None
) -> Path:
    """Save ``model`` and ``tokenizer`` so ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads them.

    Tensors are cast one at a time into the state dict that is written, so the peak extra memory
    is one copy of the model in ``save_dtype``, not a second model object. ``state``: the weights
    to write instead of the model's own (a sharded model's, gathered on rank 0).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if state is None else state
    state = {name: t.detach().to("cpu", save_dtype) for name, t in state.items()}
    model.config.dtype = save_dtype
    with quiet_transformers():  # no per-shard progress bar in the middle of our output
        model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    readable_as_umask_allows(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def model_dtype_on_disk(resolved: ResolvedModel) -> torch.dtype:
    """The dtype the base model was distributed in; exports default to it (bf16 for most 7B models)."""
    dtype = getattr(resolved.config, "dtype", None) or getattr(resolved.config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32
