"""Short names for the models lowmem-ft knows well.

Each alias ships the model's Hugging Face ``config.json`` in ``configs/<name>.json`` so that the
planner can size a run (parameters, layers, memory) before, or without, downloading any weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIGS_DIR = PACKAGE_DIR / "configs"
TINY_DIR = PACKAGE_DIR / "tiny"


@dataclass(frozen=True)
class ModelAlias:
    name: str  # "llama-2-7b"
    hub_id: str  # "meta-llama/Llama-2-7b-hf"; "" for the embedded tiny model
    description: str  # one line for tables and --help
    gated: bool  # the hub asks users to accept a licence before downloading


_GATED = " (gated: accept the licence on the hub)"

_ALIASES = [
    ModelAlias("tiny", "", "5.4M-parameter Llama pretrained on Python docs (ships inside)", gated=False),
    ModelAlias("llama-7b", "huggyllama/llama-7b", "LLaMA 1 7B base (community upload)", gated=False),
    ModelAlias("llama-2-7b", "meta-llama/Llama-2-7b-hf", "Llama 2 7B base" + _GATED, gated=True),
    ModelAlias("llama-2-13b", "meta-llama/Llama-2-13b-hf", "Llama 2 13B base" + _GATED, gated=True),
    ModelAlias("llama-2-70b", "meta-llama/Llama-2-70b-hf", "Llama 2 70B base" + _GATED, gated=True),
    ModelAlias("llama-3-8b", "meta-llama/Meta-Llama-3-8B", "Llama 3 8B base" + _GATED, gated=True),
    ModelAlias("mistral-7b", "mistralai/Mistral-7B-v0.1", "Mistral 7B v0.1 base", gated=False),
    ModelAlias("qwen2.5-7b", "Qwen/Qwen2.5-7B", "Qwen2.5 7B base", gated=False),
    ModelAlias("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B", "Qwen2.5 0.5B base, for quick benchmarks", gated=False),
    ModelAlias("qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B", "Qwen2.5 1.5B base, for quick benchmarks", gated=False),
]

ALIASES: dict[str, ModelAlias] = {alias.name: alias for alias in _ALIASES}


def alias_config_path(name: str) -> Path:
    """The shipped ``config.json`` of alias ``name``; ``tiny`` uses the one next to its weights."""
    if name not in ALIASES:
        raise KeyError(name)
    if name == "tiny":
        return TINY_DIR / "config.json"
    return CONFIGS_DIR / f"{name}.json"
