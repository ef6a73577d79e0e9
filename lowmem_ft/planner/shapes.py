"""The shape of a model, from its ``config.json`` alone: no weights, no transformers import.

The planner needs to know, per *unit* (the embedding, each decoder layer, the final norm and the
LM head), how many parameters there are and which of them are linear weights. For the Llama family
(Llama, Mistral, Qwen2/2.5, Qwen3) that follows from a handful of config fields, which keeps
`lowmem-ft plan` fast enough to answer in well under two seconds even for a 70B model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lowmem_ft.errors import UserError
from lowmem_ft.files import read_json_object

# Llama-style decoders: RMSNorm, rotary attention with optional grouped KV heads, SwiGLU MLP.
LLAMA_FAMILY = {"llama", "mistral", "qwen2", "qwen3"}


class UnsupportedModel(UserError):
    """The planner has no shape model for this architecture."""


@dataclass(frozen=True)
class Unit:
    """A piece of the model that HiFT trains as one and the engine streams as one."""

    name: str  # "embed", "layer.0", ..., "head"
    params: int
    # Linear weight matrices in this unit, as (name, rows, cols): SIFT's targets, LoRA's hosts.
    linears: tuple[tuple[str, int, int], ...] = ()
    # Bias and norm weights, as (name, numel): BitFit's and SPAFIT's terms.
    terms: tuple[tuple[str, int], ...] = ()

    @property
    def linear_params(self) -> int:
        return sum(rows * cols for _, rows, cols in self.linears)

    @property
    def prefix(self) -> str:
        """Where the unit's modules sit in a Hugging Face model: ``model.layers.3.``, or ``model.``."""
        return f"model.layers.{self.name.split('.')[1]}." if self.name.startswith("layer.") else "model."


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    units: tuple[Unit, ...] = field(repr=False)

    @property
    def params(self) -> int:
        return sum(u.params for u in self.units)

    @property
    def layer_units(self) -> tuple[Unit, ...]:
        return tuple(u for u in self.units if u.name.startswith("layer."))

    def named_terms(self) -> dict[str, int]:
        """{parameter name: numel} of the bias and norm weights, as the model names them."""
        return {u.prefix + name: numel for u in self.units for name, numel in u.terms}

    def decoder_linears(self) -> dict[str, tuple[int, int]]:
        """{module name: (out, in)} of the linear layers inside decoder layers."""
        return {u.prefix + name: (rows, cols) for u in self.layer_units for name, rows, cols in u.linears}


def shape_from_config(config: dict) -> ModelShape:
    model_type = config.get("model_type", "?")
    if model_type not in LLAMA_FAMILY:
        raise UnsupportedModel(
            f"the planner knows Llama-style decoders ({', '.join(sorted(LLAMA_FAMILY))}); "
            f"this model is {model_type!r}"
        )
    h = config["hidden_size"]
    i = config["intermediate_size"]
    n_layers = config["num_hidden_layers"]
    a = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or a
    d = config.get("head_dim") or h // a
    vocab = config["vocab_size"]
    # Llama ties nothing by default; small Qwen models tie the head to the embedding.
    tied = bool(config.get("tie_word_embeddings", False))
    # Qwen2 always has q/k/v biases; Llama/Mistral have them only when attention_bias is set.
    qkv_bias = model_type == "qwen2" or bool(config.get("attention_bias", False))
    o_bias = bool(config.get("attention_bias", False)) and model_type != "qwen2"
    mlp_bias = bool(config.get("mlp_bias", False))
    qk_norm = model_type == "qwen3"  # per-head RMSNorm on q and k

    linears = (
        ("self_attn.q_proj", a * d, h),
        ("self_attn.k_proj", kv * d, h),
        ("self_attn.v_proj", kv * d, h),
        ("self_attn.o_proj", h, a * d),
        ("mlp.gate_proj", i, h),
        ("mlp.up_proj", i, h),
        ("mlp.down_proj", h, i),
    )
    terms = [("input_layernorm.weight", h), ("post_attention_layernorm.weight", h)]
    terms += [("self_attn.q_norm.weight", d), ("self_attn.k_norm.weight", d)] * qk_norm
    biased = {"q_proj": qkv_bias, "k_proj": qkv_bias, "v_proj": qkv_bias, "o_proj": o_bias}
    biased |= dict.fromkeys(("gate_proj", "up_proj", "down_proj"), mlp_bias)
    terms += [(f"{name}.bias", rows) for name, rows, _ in linears if biased[name.rsplit(".", 1)[1]]]
    layer_params = sum(r * c for _, r, c in linears) + sum(numel for _, numel in terms)

    units = [Unit("embed", vocab * h)]
    units += [Unit(f"layer.{n}", layer_params, linears, tuple(terms)) for n in range(n_layers)]
    head_linear = () if tied else (("lm_head", vocab, h),)
    # final norm (+ untied LM head)
    units.append(Unit("head", h + (0 if tied else vocab * h), head_linear, (("norm.weight", h),)))
    return ModelShape(model_type, h, i, n_layers, a, kv, d, vocab, tied, tuple(units))


def read_config(spec: str) -> tuple[dict, str]:
    """The raw ``config.json`` of MODEL and a display name, without importing transformers.

    Aliases use their shipped config; a local directory its own; a hub id the cached snapshot.
    """
    from lowmem_ft.models.registry import ALIASES, alias_config_path

    path = Path(spec).expanduser()
    if path.is_dir():
        config_file, name = path / "config.json", path.name
        if not config_file.is_file():
            raise UserError(f"{spec}: not a Hugging Face model directory (no config.json)")
    elif spec in ALIASES:
        config_file, name = alias_config_path(spec), spec
    else:
        from lowmem_ft.models import resolve_model  # slower path: looks in the Hugging Face cache

        resolved = resolve_model(spec, require_weights=False)
        return resolved.config.to_dict(), resolved.name
    raw = read_json_object(config_file, "model config")
    if not raw.get("model_type"):
        raise UserError(
            f"{config_file}: no model_type, so not a Hugging Face model config; a model directory's "
            'config.json names its architecture there (e.g. "model_type": "llama")'
        )
    return raw, name
