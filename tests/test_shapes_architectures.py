"""The planner's shapes (lowmem_ft/planner/shapes.py) and activation formulas (planner/accounting.py)
against real models of every architecture the tool trains (tests/architectures.py), built here by
transformers with random weights (fake tensors for the activations): parameter counts per unit,
linear layers and bias/norm terms by the names the model gives them, and the bytes each decoder
layer keeps for the backward. Then `lowmem-ft plan` and `run`'s planning on such models.

    python -m pytest -q tests/test_shapes_architectures.py      # about 15 s on 2 cores
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from architectures import ARCHITECTURES, COMMON, LLAMA_LIKE
from memtrace import saved_activation_bytes
from test_cli import cli
from torch._subclasses.fake_tensor import FakeTensorMode

from lowmem_ft.models.units import decoder_layers, is_linear, linear_shape, model_units
from lowmem_ft.planner import shape_from_config
from lowmem_ft.planner.accounting import Precision, activation_bytes
from lowmem_ft.planner.layer_keeps import layer_keeps
from lowmem_ft.planner.shapes import UnsupportedModel

OPT = ARCHITECTURES["opt"]
GPT2 = ARCHITECTURES["gpt2"]
NEOX = ARCHITECTURES["gpt_neox"]
# The options that change a shape, beside each architecture's defaults: name -> (model_type, config)
CASES = {name: (name, kwargs) for name, kwargs in ARCHITECTURES.items()} | {
    "llama biases": ("llama", {**LLAMA_LIKE, "attention_bias": True, "mlp_bias": True}),
    "qwen3 (q/k norms, head_dim)": ("qwen3", {**LLAMA_LIKE, "head_dim": 16}),
    "gemma2 untied": ("gemma2", {**ARCHITECTURES["gemma2"], "tie_word_embeddings": False}),
    "phi3 as many kv heads": ("phi3", {**ARCHITECTURES["phi3"], "num_key_value_heads": 4}),
    "gpt_neox tied, no attention bias": ("gpt_neox", {**NEOX, "tie_word_embeddings": True,
                                                      "attention_bias": False}),
    "opt no biases": ("opt", {**OPT, "enable_bias": False}),
    "opt norms without weights": ("opt", {**OPT, "layer_norm_elementwise_affine": False}),
    "opt no final norm": ("opt", {**OPT, "_remove_final_layer_norm": True}),
    "gpt2 untied, n_inner": ("gpt2", {**GPT2, "tie_word_embeddings": False, "n_inner": 48}),
}  # fmt: skip


def build(model_type: str, kwargs: dict, dtype: torch.dtype = torch.float32):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**kwargs, "use_cache": False})
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def real_terms(model) -> dict[str, int]:
    """Every bias, and the weight of every norm (LayerNorm, or any *RMSNorm), by parameter name."""
    terms = {}
    for module_name, module in model.named_modules():
        norm = isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")
        for name, param in module.named_parameters(recurse=False):
            if name == "bias" or (norm and name == "weight"):
                terms[f"{module_name}.{name}"] = param.numel()
    return terms


def real_linears(model, within=None) -> dict[str, tuple[int, int]]:
    """{module name: (out, in)} of the linear layers with a weight of their own (not a tied head),
    only those inside the ``within`` modules if given."""
    inside = {id(m) for layer in within for m in layer.modules()} if within is not None else None
    embedding = model.get_input_embeddings().weight
    return {
        name: linear_shape(module)
        for name, module in model.named_modules()
        if is_linear(module) and module.weight is not embedding and (inside is None or id(module) in inside)
    }


@pytest.mark.parametrize("case", list(CASES))
def test_shape_from_config_is_the_real_models_shape(case):
    model_type, kwargs = CASES[case]
    model = build(model_type, kwargs)
    shape = shape_from_config(model.config.to_dict())
    layers = decoder_layers(model)

    assert shape.params == sum(p.numel() for p in model.parameters())  # tied weights once
    units = model_units(model)
    assert [(u.name, u.params) for u in shape.units] == [
        (u.name, sum(p.numel() for p in u.params)) for u in units
    ]
    assert shape.decoder_linears() == real_linears(model, layers)
    assert shape.linears() == real_linears(model)  # and the LM head, unless tied
    assert shape.named_terms() == real_terms(model)
    # Each unit's prefix is where its modules sit; the embeddings are the model's.
    for unit, layer in zip(shape.layer_units, layers, strict=True):
        assert model.get_submodule(unit.prefix.removesuffix(".")) is layer
    assert model.get_submodule(shape.embeddings[0]) is model.get_input_embeddings()
    assert all(isinstance(model.get_submodule(name), torch.nn.Embedding) for name in shape.embeddings)
    assert sum(model.get_submodule(name).weight.numel() for name in shape.embeddings) == shape.units[0].params


@pytest.mark.parametrize("case", list(CASES))
def test_a_config_json_that_leaves_the_defaults_out_gives_the_same_shape(case):
    """A config.json lists what its writer set; shapes.py fills in the config class's defaults for
    the rest as transformers does (GPT-2 and Gemma tie their heads, NeoX has attention biases...)."""
    from transformers import AutoConfig

    model_type, kwargs = CASES[case]
    full = AutoConfig.for_model(model_type, **kwargs).to_dict()
    assert shape_from_config({"model_type": model_type, **kwargs}) == shape_from_config(full)


def test_what_the_planner_does_not_model_is_refused_in_words():
    with pytest.raises(UnsupportedModel, match="projected in and out"):  # OPT-350m
        shape_from_config({"model_type": "opt", **OPT, "hidden_size": 64, "word_embed_proj_dim": 32})
    with pytest.raises(UnsupportedModel, match="cross-attention"):
        shape_from_config({"model_type": "gpt2", **GPT2, "add_cross_attention": True})
    with pytest.raises(UnsupportedModel, match=r"gpt2, gpt_neox, .* this model is 'falcon'"):
        shape_from_config({"model_type": "falcon", **COMMON})


# -- what a decoder layer keeps for the backward ---------------------------------------------------
# Widths chosen so that no two sizes coincide (h, heads × head_dim, intermediate, sequence).
H, INNER, HEADS, SEQ = 96, 224, 4, 40
WIDE = {"hidden_size": H, "intermediate_size": INNER, "num_attention_heads": HEADS, "num_hidden_layers": 2}
LAYERS = {
    "llama": ("llama", {**WIDE, "num_key_value_heads": 2}),
    "qwen2": ("qwen2", {**WIDE, "num_key_value_heads": 2}),
    "phi3": ("phi3", {**WIDE, "pad_token_id": 0}),
    "gemma2": ("gemma2", {**WIDE, "num_key_value_heads": 2, "head_dim": 32}),
    "gemma3_text": ("gemma3_text", {**WIDE, "num_key_value_heads": 2, "head_dim": 32}),
    "gpt_neox": ("gpt_neox", WIDE),
    "opt": ("opt", {**WIDE, "ffn_dim": INNER, "word_embed_proj_dim": H}),
    "gpt2": ("gpt2", {"n_embd": H, "n_inner": INNER, "n_head": HEADS, "n_layer": 2}),
    "gpt2 without attention dropout": ("gpt2", {"n_embd": H, "n_inner": INNER, "n_head": HEADS, "n_layer": 2,
                                                "attn_pdrop": 0.0}),
}  # fmt: skip
MODES = {  # weights, compute
    "fp32": (torch.float32, torch.float32),
    "autocast": (torch.float32, torch.bfloat16),
    "bf16": (torch.bfloat16, torch.bfloat16),
}


def kept_by_layer(model_type: str, kwargs: dict, state: str, mode: str, index: int = 1) -> int:
    """Bytes per token that decoder layer ``index`` saves for the backward, on fake tensors: the
    recipe's loss through the model, its weights trained, frozen (a gradient still flows through
    it: the embedding trains) or sparse (the random-mask method's increments on every linear
    layer). Not counted, as the planner counts them apart: autocast's 16-bit weight copies, the
    rotary tables the whole stack shares, and Gemma's per-layer (1 + weight) vectors."""
    from lowmem_ft.objective import loss_sum

    weights, compute = MODES[mode]
    with FakeTensorMode():
        model = build(model_type, {**kwargs, "vocab_size": 512}, weights).train()
        if state == "frozen":
            model.requires_grad_(False)
            model.get_input_embeddings().weight.requires_grad_(True)
        elif state == "sparse":
            from lowmem_ft.config import RunConfig
            from lowmem_ft.methods import build_method

            run = RunConfig.create(model="t", data=Path("t.jsonl"), method="random", sparsity=0.01, lr=1e-5,
                                   dtype=mode, device="cpu")  # fmt: skip
            build_method(run).setup(model)
        params = {p.untyped_storage()._cdata for p in model.parameters()}
        weight_shapes = {s for p in model.parameters() for s in (tuple(p.shape), tuple(p.shape)[::-1])}
        layer, inside, seen = decoder_layers(model)[index], [False], {}
        layer.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
        layer.register_forward_hook(lambda *_: inside.__setitem__(0, False))

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if inside[0] and storage._cdata not in params:
                seen[storage._cdata] = (tuple(t.shape), storage.nbytes())
            return t

        ids = torch.randint(0, 512, (1, SEQ))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_sum(model, batch, torch.device("cpu"), compute)
    kept = 0
    for shape, nbytes in seen.values():
        copy = mode == "autocast" and len(shape) == 2 and shape in weight_shapes and shape[0] != SEQ
        rotary = len(shape) == 4 and shape[:3] == (1, 1, SEQ) and shape[3] != SEQ
        if not (copy or rotary or len(shape) == 1):
            kept += nbytes
    return kept // SEQ


@pytest.mark.parametrize("case", list(LAYERS))
def test_each_layer_keeps_what_the_planner_counts(case):
    """Exact, byte for byte: trained in each precision, frozen, sparse, and the first sparse layer
    (nothing below it needs a gradient). On the CPU, as traced: GPT-2's attention dropout takes
    torch's math path here, which the planner counts for a CPU and not for a GPU."""
    model_type, kwargs = LAYERS[case]
    shape = shape_from_config({"model_type": model_type, "vocab_size": 512, **kwargs})

    def planned(mode: str) -> object:
        weights, compute = (MODES[mode][0].itemsize, MODES[mode][1].itemsize)
        return layer_keeps(shape, SEQ, Precision(weights, compute, on_gpu=False))

    for mode in MODES:
        assert kept_by_layer(model_type, kwargs, "trained", mode) == planned(mode).trained, mode
    for mode in ("fp32", "bf16"):
        assert kept_by_layer(model_type, kwargs, "frozen", mode) == planned(mode).frozen, mode
    assert kept_by_layer(model_type, kwargs, "sparse", "bf16") == planned("bf16").sparse
    first = kept_by_layer(model_type, kwargs, "sparse", "bf16", index=0)
    assert 0 <= planned("bf16").sparse - planned("bf16").first - first <= 4  # (RMSNorm's rsqrt counted)


def test_gpt2_on_a_gpu_keeps_what_its_fused_attention_keeps():
    """A GPU's fused attention kernels apply dropout themselves: GPT-2 with attention dropout is
    planned as GPT-2 without it is traced here."""
    model_type, kwargs = LAYERS["gpt2"]
    shape = shape_from_config({"model_type": model_type, "vocab_size": 512, **kwargs})
    no_dropout = LAYERS["gpt2 without attention dropout"][1]
    for mode, (weights, compute) in {"fp32": (4, 4), "autocast": (4, 2)}.items():
        on_gpu = layer_keeps(shape, SEQ, Precision(weights, compute, on_gpu=True))
        assert on_gpu.trained == kept_by_layer("gpt2", no_dropout, "trained", mode)


@pytest.mark.parametrize("case", list(LAYERS))
def test_the_whole_forward_keeps_what_the_planner_counts_within_3_percent(case):
    """Every layer and what is outside them (embeddings, the final norm, the loss's log-
    probabilities, Gemma-2's soft-capped logits): full fine-tuning's precisions, fp32 weights."""
    from lowmem_ft.objective import loss_sum

    model_type, kwargs = LAYERS[case]
    kwargs = {**kwargs, "vocab_size": 1024}
    shape = shape_from_config({"model_type": model_type, **kwargs})
    for compute in (torch.float32, torch.bfloat16):
        with FakeTensorMode():
            model = build(model_type, kwargs).train()
            ids = torch.randint(0, 1024, (1, SEQ))
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
            forward = partial(loss_sum, model, batch, torch.device("cpu"), compute)
            traced = saved_activation_bytes(model, forward)
        planned = activation_bytes(shape, SEQ, 1, Precision(4, compute.itemsize, on_gpu=False), False)
        assert planned == pytest.approx(traced, rel=0.03), compute


# -- plans --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def config_dirs(tmp_path_factory):
    """config.json alone (all `lowmem-ft plan` reads) of GPT-2 small and Pythia-410M."""
    from transformers import AutoConfig

    configs = {
        "gpt2": {"vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12},
        "gpt_neox": {"vocab_size": 50304, "hidden_size": 1024, "num_hidden_layers": 24,
                     "num_attention_heads": 16, "intermediate_size": 4096},
    }  # fmt: skip
    root = tmp_path_factory.mktemp("configs")
    for model_type, kwargs in configs.items():
        AutoConfig.for_model(model_type, **kwargs).save_pretrained(root / model_type)
    return root


@pytest.mark.parametrize("method", ["sift", "hift"])
@pytest.mark.parametrize(("model_type", "params"), [("gpt2", 124_439_808), ("gpt_neox", 405_334_016)])
def test_plan_on_a_config_dir_of_another_architecture(model_type, params, method, config_dirs, capsys):
    args = ["plan", config_dirs / model_type, "--method", method, "--gpu-mem", "8GiB", "--cpu-mem", "32GiB"]
    code, out, err = cli(capsys, *args, "--json")
    data = json.loads(out)
    assert code == 0 and data["fits"] and data["total_params"] == params, err
    assert 0 < data["gpu"]["peak_bytes"] <= 8 * 2**30
    code, out, _ = cli(capsys, *args)
    assert code == 0 and "fits       yes" in out


def test_run_plans_a_model_of_another_architecture(tmp_path):
    """`run` plans GPT-NeoX and GPT-2 like Llama: the plan's choices, not "plan none" defaults."""
    from lowmem_ft import prepare
    from lowmem_ft.config import RunConfig
    from lowmem_ft.models import resolve_model

    for model_type in ("gpt_neox", "gpt2"):
        directory = tmp_path / model_type
        model = build(model_type, ARCHITECTURES[model_type])
        model.save_pretrained(directory)
        request = RunConfig.create(model=str(directory), data=Path("x.jsonl"), method="hift", device="cpu")
        config, plan = prepare.plan_run(request, resolve_model(str(directory)))
        assert (
            plan is not None and plan.fits and plan.total_params == sum(p.numel() for p in model.parameters())
        )
        assert config.micro_batch_size == plan.settings["micro_batch_size"]
        assert config.method_options.units_per_group == plan.settings["units_per_group"]
