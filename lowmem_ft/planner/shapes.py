"""The shape of a model, from its ``config.json`` alone: no weights, no torch, no transformers.

The planner needs to know, per *unit* (the embedding, each decoder layer, the final norm and the
LM head; lowmem_ft/models/units.py splits a real model the same way), how many parameters there are
and which of them are linear weights, under the names the Hugging Face model gives them. That
follows from a handful of config fields, which keeps `lowmem-ft plan` fast enough to answer in well
under two seconds even for a 70B model.

Each architecture the planner knows is one row of ``ARCHITECTURES``: where its modules sit, which
norm it uses, the config defaults that change its shape, and a small function listing one decoder
layer's linear layers and norms. tests/test_shapes_architectures.py checks every row against a
real model built by transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

from lowmem_ft.errors import UserError
from lowmem_ft.files import read_json_object


class UnsupportedModel(UserError):
    """The planner has no shape model for this architecture."""


@dataclass(frozen=True)
class Unit:
    """A piece of the model that HiFT trains as one and the engine streams as one.

    The names in ``linears`` and ``terms`` follow ``prefix``, where the unit's modules sit in the
    Hugging Face model: ``model.layers.3.`` for a Llama decoder layer, ``transformer.h.3.`` for
    GPT-2's. The head unit holds modules from two places (the base model's final norm, the LM head
    at the top level), so its prefix is empty and its names are whole.
    """

    name: str  # "embed", "layer.0", ..., "head"
    params: int
    # Linear weight matrices in this unit, as (name, rows, cols) = (out, in) like nn.Linear's weight
    # (GPT-2's Conv1D stores it transposed): SIFT's targets, LoRA's hosts.
    linears: tuple[tuple[str, int, int], ...] = ()
    # Bias and norm weights, as (name, numel): BitFit's and SPAFIT's terms.
    terms: tuple[tuple[str, int], ...] = ()
    prefix: str = ""

    @cached_property
    def linear_params(self) -> int:
        return sum(rows * cols for _, rows, cols in self.linears)


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
    # The input embedding modules (token, and any learned positions), by module name.
    embeddings: tuple[str, ...] = ("model.embed_tokens",)
    # What the activation estimates (accounting.py) read beside the sizes and the model_type:
    attention_dropout: bool = False  # GPT-2's attn_pdrop: on a CPU, attention keeps its scores
    logit_softcapping: bool = False  # Gemma-2's final_logit_softcapping: one more vocabulary-sized tensor

    # Computed once per shape (the shape is frozen): the planner's searches read them millions of
    # times, and rebuilding them each time made `plan llama-2-70b` take a minute.
    @cached_property
    def params(self) -> int:
        return sum(u.params for u in self.units)

    @cached_property
    def layer_units(self) -> tuple[Unit, ...]:
        return tuple(u for u in self.units if u.name.startswith("layer."))

    @cached_property
    def largest_layer_params(self) -> int:
        return max((u.params for u in self.layer_units), default=0)

    @cached_property
    def largest_layer_linear(self) -> int:
        """Elements of the largest weight matrix inside a decoder layer."""
        return max((rows * cols for u in self.layer_units for _, rows, cols in u.linears), default=0)

    def named_terms(self) -> dict[str, int]:
        """{parameter name: numel} of the bias and norm weights, as the model names them."""
        return {u.prefix + name: numel for u in self.units for name, numel in u.terms}

    def decoder_linears(self) -> dict[str, tuple[int, int]]:
        """{module name: (out, in)} of the linear layers inside decoder layers."""
        return {u.prefix + name: (rows, cols) for u in self.layer_units for name, rows, cols in u.linears}

    def linears(self) -> dict[str, tuple[int, int]]:
        """{module name: (out, in)} of every linear layer with a weight of its own: the decoder
        layers' and an untied LM head (a tied one is the embedding's weight)."""
        return {u.prefix + name: (rows, cols) for u in self.units for name, rows, cols in u.linears}


# -- one decoder layer's linear layers, per kind of architecture ----------------------------------
# Each returns (name, out, in, has a bias) under the layer's prefix, in the model's own order, for a
# config whose sizes have been read (``Sizes``). Out and in are nn.Linear's (rows, cols) of the weight.


@dataclass(frozen=True)
class Sizes:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int


def _llama_linears(config: dict, s: Sizes) -> tuple[tuple[str, int, int, bool], ...]:
    """Llama, Mistral, Qwen2/3, Gemma-2/3: q, k, v and o projections, and a gated MLP (gate, up,
    down). Qwen2 always has q/k/v biases and never an o bias; the others follow attention_bias."""
    qwen2 = config["model_type"] == "qwen2"
    qkv_bias = qwen2 or bool(config.get("attention_bias"))
    o_bias = bool(config.get("attention_bias")) and not qwen2
    mlp_bias = bool(config.get("mlp_bias"))  # Llama's option; the others have no MLP biases
    h, i, q, kv = s.hidden, s.intermediate, s.heads * s.head_dim, s.kv_heads * s.head_dim
    return (
        ("self_attn.q_proj", q, h, qkv_bias),
        ("self_attn.k_proj", kv, h, qkv_bias),
        ("self_attn.v_proj", kv, h, qkv_bias),
        ("self_attn.o_proj", h, q, o_bias),
        ("mlp.gate_proj", i, h, mlp_bias),
        ("mlp.up_proj", i, h, mlp_bias),
        ("mlp.down_proj", h, i, mlp_bias),
    )


def _phi3_linears(config: dict, s: Sizes) -> tuple[tuple[str, int, int, bool], ...]:
    """Phi-3: q, k and v in one projection, gate and up in one; no biases."""
    h, i, q, kv = s.hidden, s.intermediate, s.heads * s.head_dim, s.kv_heads * s.head_dim
    return (
        ("self_attn.o_proj", h, q, False),
        ("self_attn.qkv_proj", q + 2 * kv, h, False),
        ("mlp.gate_up_proj", 2 * i, h, False),
        ("mlp.down_proj", h, i, False),
    )


def _gpt_neox_linears(config: dict, s: Sizes) -> tuple[tuple[str, int, int, bool], ...]:
    """GPT-NeoX (Pythia): q, k and v in one projection; an MLP of two linear layers, with biases."""
    h, i, bias = s.hidden, s.intermediate, bool(config["attention_bias"])
    return (
        ("attention.query_key_value", 3 * h, h, bias),
        ("attention.dense", h, h, bias),
        ("mlp.dense_h_to_4h", i, h, True),
        ("mlp.dense_4h_to_h", h, i, True),
    )


def _opt_linears(config: dict, s: Sizes) -> tuple[tuple[str, int, int, bool], ...]:
    """OPT: k, v, q and out projections, then fc1 and fc2 (no ``mlp`` module), biased unless
    enable_bias is off."""
    h, i, bias = s.hidden, s.intermediate, bool(config["enable_bias"])
    attention = [(f"self_attn.{name}", h, h, bias) for name in ("k_proj", "v_proj", "q_proj", "out_proj")]
    return (*attention, ("fc1", i, h, bias), ("fc2", h, i, bias))


def _gpt2_linears(config: dict, s: Sizes) -> tuple[tuple[str, int, int, bool], ...]:
    """GPT-2: q, k and v in one projection, an MLP of two, all with biases. They are Conv1D layers,
    which store the weight as (in, out); listed as (out, in) like nn.Linear's, as linear_shape
    (models/units.py) reads them, so the planner's arithmetic is the same."""
    h, i = s.hidden, s.intermediate
    return (("attn.c_attn", 3 * h, h, True), ("attn.c_proj", h, h, True), ("mlp.c_fc", i, h, True),
            ("mlp.c_proj", h, i, True))  # fmt: skip


@dataclass(frozen=True)
class Architecture:
    """Where one architecture's modules sit, by their Hugging Face names, and what its layers hold."""

    linears: Callable[[dict, Sizes], tuple[tuple[str, int, int, bool], ...]]
    layers: str  # decoder layer N's prefix, {} for N
    base: str  # the base model's prefix: the embeddings and the final norm sit under it
    embeddings: tuple[str, ...]  # token embedding, then any learned position embedding
    norms: tuple[str, ...]  # a decoder layer's norms of hidden size
    final_norm: str
    layer_norm: bool = False  # LayerNorm (weight and bias) rather than RMSNorm (weight only)
    head_norms: tuple[str, ...] = ()  # per-head norms of q and k (head_dim)
    # Rows of the learned position embedding beyond max_position_embeddings (None: rotary, none).
    position_offset: int | None = None
    # The config class's defaults for the keys that change the shape, for a config.json that leaves
    # them out (transformers fills them in the same way).
    defaults: dict = field(default_factory=dict)
    # The config's own names for the standard keys (GPT-2 predates them).
    renames: dict = field(default_factory=dict)
    head: Callable[[], str] = lambda: "lm_head"  # the LM head's module name, at the model's top level


def _gpt_neox_head() -> str:
    """GPT-NeoX's LM head was ``embed_out`` until transformers 5.14 renamed it ``lm_head``. Read
    from the installed package's metadata: importing transformers would cost `plan` seconds."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = tuple(int(part) for part in version("transformers").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return "lm_head"
    return "lm_head" if release >= (5, 14) else "embed_out"


_LLAMA_NORMS = ("input_layernorm", "post_attention_layernorm")
_LLAMA = Architecture(_llama_linears, "model.layers.{}.", "model.", ("embed_tokens",), _LLAMA_NORMS, "norm")
# Gemma: the MLP has norms before and after it too ("sandwich" norms); ties its head by default.
_GEMMA_NORMS = (*_LLAMA_NORMS, "pre_feedforward_layernorm", "post_feedforward_layernorm")
_GEMMA_DEFAULTS = {"tie_word_embeddings": True, "head_dim": 256, "num_key_value_heads": 4}
_GEMMA2_DEFAULTS = {**_GEMMA_DEFAULTS, "final_logit_softcapping": 30.0}
_QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": replace(_LLAMA, head_norms=_QK_NORMS),
    "gemma2": replace(_LLAMA, norms=_GEMMA_NORMS, defaults=_GEMMA2_DEFAULTS),
    "gemma3_text": replace(_LLAMA, norms=_GEMMA_NORMS, head_norms=_QK_NORMS, defaults=_GEMMA_DEFAULTS),
    "phi3": replace(_LLAMA, linears=_phi3_linears),
    "gpt_neox": Architecture(
        _gpt_neox_linears, "gpt_neox.layers.{}.", "gpt_neox.", ("embed_in",), _LLAMA_NORMS,
        "final_layer_norm", layer_norm=True, defaults={"attention_bias": True},
        head=_gpt_neox_head,
    ),
    "opt": Architecture(
        _opt_linears, "model.decoder.layers.{}.", "model.decoder.", ("embed_tokens", "embed_positions"),
        ("self_attn_layer_norm", "final_layer_norm"), "final_layer_norm", layer_norm=True,
        position_offset=2,  # OPTLearnedPositionalEmbedding: 2 rows more, a fairseq legacy
        defaults={"tie_word_embeddings": True, "enable_bias": True, "layer_norm_elementwise_affine": True,
                  "do_layer_norm_before": True, "max_position_embeddings": 2048},
        renames={"ffn_dim": "intermediate_size"},
    ),
    "gpt2": Architecture(
        _gpt2_linears, "transformer.h.{}.", "transformer.", ("wte", "wpe"), ("ln_1", "ln_2"), "ln_f",
        layer_norm=True, position_offset=0,
        defaults={"tie_word_embeddings": True, "n_inner": None, "n_positions": 1024, "attn_pdrop": 0.1},
        renames={"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
                 "n_inner": "intermediate_size", "n_positions": "max_position_embeddings",
                 "attn_pdrop": "attention_dropout"},
    ),
}  # fmt: skip


def _check_sizes(c: dict, arch: Architecture) -> None:
    """The sizes a shape is made of are positive whole numbers: a damaged config.json (a size
    missing, written as text, null or negative) is one line naming it, not a KeyError or a plan of
    negative gigabytes that "fits"."""
    needed = ["hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"]
    optional = ("intermediate_size", "num_key_value_heads", "head_dim")  # (None: derived)
    needed += [key for key in optional if c.get(key) is not None]
    needed += ["max_position_embeddings"] if arch.position_offset is not None else []
    for key in needed:
        value = c.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            said = "is missing" if key not in c else f"is {value!r}"
            raise UserError(
                f"the model's config.json: {key} {said}; it must be a positive whole number (is the "
                "file damaged? transformers' AutoConfig.from_pretrained reads what it should hold)"
            )


def shape_from_config(config: dict) -> ModelShape:
    """The model's units and sizes from its config (``config.json`` as a dict, or a transformers
    config's ``to_dict()``); UnsupportedModel for an architecture the planner has no row for."""
    model_type = config.get("model_type", "?")
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise UnsupportedModel(
            f"the planner has shapes for {', '.join(sorted(ARCHITECTURES))}; this model is {model_type!r}"
        )
    c = {**arch.defaults, **config}
    for theirs, ours in arch.renames.items():
        if theirs in c:
            c[ours] = c[theirs]
    _check_sizes(c, arch)
    h = c["hidden_size"]
    i = c["intermediate_size"] or 4 * h  # GPT-2's n_inner is None by default: 4 × hidden
    n_layers = c["num_hidden_layers"]
    a = c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or a
    d = c.get("head_dim") or h // a
    vocab = c["vocab_size"]
    # Llama ties nothing by default; small Qwen models tie the head to the embedding; GPT-2, OPT
    # and Gemma tie it unless their config says otherwise (their ``defaults``).
    tied = bool(c.get("tie_word_embeddings", False))
    # Shapes the planner does not model: no plan (run says so) rather than the plan of another model.
    if (c.get("word_embed_proj_dim") or h) != h:
        raise UnsupportedModel(
            f"this OPT model's embeddings are {c['word_embed_proj_dim']} wide, projected in and out of its "
            f"{h}-wide layers (project_in, project_out); the planner has no shapes for that"
        )
    if c.get("add_cross_attention"):
        raise UnsupportedModel("this model's layers have cross-attention; the planner has no shapes for that")

    def norm_terms(names: tuple[str, ...], size: int) -> list[tuple[str, int]]:
        if not c.get("layer_norm_elementwise_affine", True):  # OPT's option: norms without weights
            return []
        kinds = ("weight", "bias") if arch.layer_norm else ("weight",)
        return [(f"{name}.{kind}", size) for name in names for kind in kinds]

    described = arch.linears(c, Sizes(h, i, a, kv, d))
    linears = tuple((name, rows, cols) for name, rows, cols, _ in described)
    terms = norm_terms(arch.norms, h) + norm_terms(arch.head_norms, d)
    terms += [(f"{name}.bias", rows) for name, rows, _, biased in described if biased]
    layer_params = sum(rows * cols for _, rows, cols in linears) + sum(numel for _, numel in terms)

    # Token embedding and any learned position embedding: the embedding unit (models/units.py).
    positions = 0 if arch.position_offset is None else c["max_position_embeddings"] + arch.position_offset
    units = [Unit("embed", (vocab + positions) * h, prefix=arch.base)]
    units += [
        Unit(f"layer.{n}", layer_params, linears, tuple(terms), arch.layers.format(n))
        for n in range(n_layers)
    ]
    # The final norm (none in OPT's post-norm layout, or when its config removed it) and the LM
    # head, unless tied: its weight is then the embedding's.
    final = (
        (arch.final_norm,)
        if c.get("do_layer_norm_before", True) and not c.get("_remove_final_layer_norm")
        else ()
    )
    head_terms = tuple((arch.base + name, numel) for name, numel in norm_terms(final, h))
    head_linear = () if tied else ((arch.head(), vocab, h),)
    head_params = sum(numel for _, numel in head_terms) + (0 if tied else vocab * h)
    units.append(Unit("head", head_params, head_linear, head_terms))
    return ModelShape(
        model_type, h, i, n_layers, a, kv, d, vocab, tied, tuple(units),
        embeddings=tuple(arch.base + name for name in arch.embeddings),
        attention_dropout=bool(c.get("attention_dropout")),
        logit_softcapping=bool(c.get("final_logit_softcapping")),
    )  # fmt: skip


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
