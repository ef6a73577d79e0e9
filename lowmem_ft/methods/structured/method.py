"""Structured selections: whole tensors train, the rest of the model is a frozen base.

    bitfit    bias and norm terms (+ optional added zero-initialised biases)
    lora      LoRA adapters on the target linear layers, through the peft library; on a 4-bit
              NF4 base with ``--base-quant nf4`` (QLoRA)
    spafit    stratified by depth: frozen, then bias/norm terms, then LoRA on attention

What trains is decided by each method's ``select_*`` (its package's plan.py), which the planner
shares. Memory: the frozen
base is stored in the compute precision (bf16 on a GPU, fp32 on a CPU), or in NF4 for QLoRA's
targets; everything that trains is fp32 with fp32 AdamW state (16 bytes per value with its
gradient), because 16-bit values would round small updates away. Norm and bias weights in fp32
beside a 16-bit base are fine under autocast: the linear layers cast their inputs themselves.

Results: ``lora`` writes a peft adapter (JOB/adapter, loads with ``PeftModel.from_pretrained``) and
merges on request (`lowmem-ft export JOB --merge`); ``bitfit`` and ``spafit`` write a full model
(JOB/model), SPAFIT's adapters merged into it.
"""

from __future__ import annotations

import warnings
from abc import abstractmethod

import torch

from lowmem_ft.methods.base import Method
from lowmem_ft.methods.optimizers import make_optimizer
from lowmem_ft.models.units import is_linear, linear_shape
from lowmem_ft.selections import Selection, layer_index


def model_terms(model: torch.nn.Module) -> dict[str, int]:
    """{name: numel} of the model's bias and norm weights (BitFit's "bias terms")."""
    terms = {}
    for module_name, module in model.named_modules():
        is_norm = "norm" in type(module).__name__.lower()
        for name, param in module.named_parameters(recurse=False):
            if name == "bias" or (is_norm and name == "weight"):
                terms[f"{module_name}.{name}"] = param.numel()
    return terms


def model_linears(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """{module name: (out, in)} of the linear layers inside decoder layers."""
    return {
        name: linear_shape(module)
        for name, module in model.named_modules()
        if is_linear(module) and layer_index(name) is not None
    }


class StructuredMethod(Method):
    """A fixed set of whole tensors trains with AdamW; a peft LoRA adapter where the selection has one."""

    def __init__(self, config):
        super().__init__(config)
        self.selection: Selection | None = None  # what trains, from the model (place or setup)
        self.peft_model = None  # peft's wrapper, when the selection has LoRA adapters
        self._names: list[str] = []
        self._params: list[torch.nn.Parameter] = []

    def weight_dtype(self) -> torch.dtype:
        return self.frozen_base_dtype()

    @abstractmethod
    def select(self, terms: dict[str, int], linears: dict, n_layers: int, model_type: str) -> Selection:
        """What this method trains in a model with these bias and norm ``terms`` and decoder
        ``linears`` (its package's ``select_*``, which the planner calls on the model's shape)."""

    def _select(self, model) -> Selection:
        if self.selection is None:
            n_layers, model_type = model.config.num_hidden_layers, model.config.model_type
            self.selection = self.select(model_terms(model), model_linears(model), n_layers, model_type)
        return self.selection

    def place(self, model, device) -> None:
        selection = self._select(model)
        # QLoRA: the adapted linears' weights in NF4
        if (getattr(self.config.method_options, "base_quant", None) or "none") != "none":
            from lowmem_ft.engine.quantised import quantise_linears_4bit

            quantise_linears_4bit(model, selection.lora_targets, device, self.config.compute_dtype())
        super().place(model, device)

    def setup(self, model) -> None:
        config = self.config
        selection = self._select(model)
        model.requires_grad_(False)
        params = dict(model.named_parameters())
        # Taken before peft wraps the adapted layers (their names gain ".base_layer").
        trained = [params[name] for name in selection.terms]
        for name in selection.added_biases:
            linear = model.get_submodule(name)
            linear.bias = torch.nn.Parameter(torch.zeros(linear.out_features, device=linear.weight.device))
            trained.append(linear.bias)
        if selection.lora_targets:
            self.peft_model = add_lora(model, selection, self.config.method_options)
        for param in trained:
            param.data = param.data.float()  # fp32: see the module docstring
            param.requires_grad_(True)
        self._names = [name for name, p in model.named_parameters() if p.requires_grad]
        self._params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(config.optimizer, self._params, config.lr, config.weight_decay)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self._params

    def reduce_gradients(self) -> None:
        """With several ranks: data-parallel, the gradients of the few trained tensors summed over
        the ranks (each rank's loss is already divided by the whole global batch's target tokens)."""
        if self.group.several:
            for p in self._params:
                if p.grad is None:  # (every rank must send the same tensors)
                    p.grad = torch.zeros_like(p)
            self.group.sum_tensors([p.grad for p in self._params])

    def describe_trainable(self) -> str:
        return f"{self.trainable_count():,} trainable: {self.selection.summary}"

    def changed_weights(self, model) -> dict[str, torch.Tensor]:
        return dict(zip(self._names, self._params, strict=True))  # the base never changes

    def export(self, model, tokenizer, job_dir, save_dtype, base):
        from lowmem_ft.models.saving import save_hf_model

        if self.peft_model is not None:
            model = self.peft_model.merge_and_unload()  # W + (α/r)·BA, into the base's own weights
        if self.selection.added_biases:
            _declare_added_biases(model)
        return save_hf_model(model, tokenizer, job_dir / "model", save_dtype, base.weights_dir)


def add_lora(model, selection: Selection, options) -> object:
    """peft's LoRA on the selected linear layers: A random, B zero, so the model starts unchanged.
    Adapter weights are fp32 whatever the base's dtype (peft's autocast_adapter_dtype)."""
    from peft import LoraConfig, get_peft_model

    rank = options.lora_rank
    lora_config = LoraConfig(
        r=rank,
        lora_alpha=options.lora_alpha or 2 * rank,
        lora_dropout=options.lora_dropout,
        target_modules=list(selection.lora_targets),  # full names: exactly these modules
        bias="none",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation chatter from peft/transformers, nothing to act on
        peft_model = get_peft_model(model, lora_config)  # modifies ``model`` in place
    # peft makes the embedding's output require grad for checkpointing; like transformers' own
    # (train.enable_checkpointing), that would back-propagate through the frozen layers below
    # the lowest adapter for nothing.
    if hasattr(model, "_require_grads_hook"):
        model.disable_input_require_grads()
    return peft_model


def _declare_added_biases(model) -> None:
    """Biases were added to some linear layers; transformers loads Llama biases all or none (by
    attention_bias and mlp_bias), so the others get zero biases and the config declares them."""
    kinds = {"self_attn": False, "mlp": False}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module.bias is not None and layer_index(name) is not None:
            kinds["self_attn" if ".self_attn." in name else "mlp"] = True
    for name, module in model.named_modules():
        kind = "self_attn" if ".self_attn." in name else "mlp"
        in_layer = isinstance(module, torch.nn.Linear) and layer_index(name) is not None
        if in_layer and kinds[kind] and module.bias is None:
            module.bias = torch.nn.Parameter(
                torch.zeros(module.out_features, device=module.weight.device), requires_grad=False
            )
    model.config.attention_bias = kinds["self_attn"]
    model.config.mlp_bias = kinds["mlp"]
