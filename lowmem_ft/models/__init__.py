"""Model names, configs and loading: aliases, local directories and the Hugging Face cache."""

from lowmem_ft.models.loading import count_parameters, empty_model, load_model, load_tokenizer, weights_hash
from lowmem_ft.models.registry import ALIASES, ModelAlias, alias_config_path
from lowmem_ft.models.resolve import ResolvedModel, resolve_model

__all__ = [
    "ALIASES",
    "ModelAlias",
    "ResolvedModel",
    "count_parameters",
    "alias_config_path",
    "empty_model",
    "load_model",
    "load_tokenizer",
    "resolve_model",
    "weights_hash",
]
