"""Small random-initialised Hugging Face models of every architecture the tool is tested on, built
in the test (a few MB each, nothing downloaded), with the embedded model's tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

from lowmem_ft.models.registry import alias_config_path

VOCAB = 4096  # the embedded tokenizer's
COMMON = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
LLAMA_LIKE = {**COMMON, "intermediate_size": 64, "num_key_value_heads": 2, "max_position_embeddings": 256}

# model_type -> config keyword arguments
ARCHITECTURES: dict[str, dict] = {
    "llama": LLAMA_LIKE,
    "qwen2": {**LLAMA_LIKE, "tie_word_embeddings": True},
    "mistral": LLAMA_LIKE,
    "gemma2": {**LLAMA_LIKE, "head_dim": 8},
    "gemma3_text": {**LLAMA_LIKE, "head_dim": 8},
    "phi3": {**LLAMA_LIKE, "pad_token_id": 0},
    "gpt_neox": {**COMMON, "intermediate_size": 64, "max_position_embeddings": 256},
    "opt": {
        "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "ffn_dim": 64, "word_embed_proj_dim": 32, "max_position_embeddings": 256,
    },
    "gpt2": {
        "vocab_size": VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256,
        "bos_token_id": 1, "eos_token_id": 2,  # the embedded tokenizer's, not GPT-2's 50256
    },
}  # fmt: skip


def build_model(model_type: str, directory: Path, seed: int = 0) -> Path:
    """A random-initialised ``model_type`` model saved (safetensors) with the tiny tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **ARCHITECTURES[model_type])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tiny = alias_config_path("tiny").parent
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, directory / name)
    return directory
