"""Every fine-tuning method, once: its name, what it does, the options it takes, where its code is
and what it leaves. Torch-free, so the options' checks, the planner and `lowmem-ft methods` read it
without importing a method. The option checks (config.py), `lowmem-ft methods`, `build_method` and
the method lists in choices.py all derive from this table.

Adding a method: its module under lowmem_ft/methods/ (a subclass of methods.base.Method, or for a
sparse mask an entry chooser given to methods.sparse.SparseIncrement), its planner estimate
(planner/estimates.py), and one line here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

# What a method leaves in its job directory (lowmem_ft/results.py).
RESULTS = ("model", "delta", "adapter")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str  # one line for `lowmem-ft methods` and the run header
    # the method-specific options it takes (RunConfig field names); every other method refuses them
    options: tuple[str, ...]
    runtime: str  # "module:name" of what builds it from a RunConfig, imported only when a run needs it
    result: str  # "model" (a full Hugging Face model), "delta" (sparse entries) or "adapter" (LoRA)
    family: str  # "full", "sparse" (one sparse-increment engine) or "structured" (selections.py)
    note: str = ""  # said after the options in `lowmem-ft methods`

    def flags(self) -> str:
        """The options as the command line spells them."""
        return ", ".join("--" + option.replace("_", "-") for option in self.options)

    def load(self) -> type:
        module, name = self.runtime.split(":")
        return getattr(importlib.import_module(module), name)


_SPARSE = ("sparsity", "targets", "base_quant", "stream")
_LORA = ("lora_rank", "lora_alpha", "lora_dropout")

METHOD_SPECS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "full", "all parameters, every step, fp32 master weights (the baseline)",
            (), "lowmem_ft.methods.full:FullFineTuning", "model", "full",
        ),
        MethodSpec(
            "hift",
            "all parameters, one group of layers per step, optimizer state of the others in host memory",
            ("units_per_group", "groups", "order", "switch_every", "state_policy", "stream"),
            "lowmem_ft.methods.hift:HiFT", "model", "full",
        ),
        MethodSpec(
            "sift", "top-k entries of each weight by gradient, fixed after selection; fp32 increments",
            (*_SPARSE, "selection_batches", "selection_score", "selection_passes"),
            "lowmem_ft.methods.sift:sift", "delta", "sparse",
            note="--selection-score grad2 over a window is Fu et al.'s SAM",
        ),
        MethodSpec(
            "random", "k random entries of each weight (seeded by --seed), trained like SIFT",
            _SPARSE, "lowmem_ft.methods.masks:random_mask", "delta", "sparse",
        ),
        MethodSpec(
            "magnitude",
            "the k largest-magnitude entries of each base weight (MagPruning), trained like SIFT",
            _SPARSE, "lowmem_ft.methods.masks:magnitude_mask", "delta", "sparse",
        ),
        MethodSpec(
            "bitfit",
            "bias and norm terms only (Llama has no biases: norm weights, optionally added biases)",
            ("add_biases", "freeze_layers"), "lowmem_ft.methods.structured:BitFit", "model", "structured",
        ),
        MethodSpec(
            "lora", "low-rank adapters on the target linear layers (peft); QLoRA with --base-quant nf4",
            (*_LORA, "targets", "base_quant", "freeze_layers"),
            "lowmem_ft.methods.structured:LoRA", "adapter", "structured",
        ),
        MethodSpec(
            "spafit",
            "by depth: lowest layers frozen, middle bias/norm terms, top LoRA on attention (+terms: II)",
            ("cutoffs", "variant", *_LORA, "add_biases"),
            "lowmem_ft.methods.structured:SPAFIT", "model", "structured",
        ),
    )
}  # fmt: skip

# Options the planner chooses when the user leaves them open (the run adopts its choice): they
# decide what trains, so a resumed job keeps the first machine's choice rather than planning again.
PLANNED_OPTIONS = ("units_per_group", "state_policy", "sparsity", "base_quant", "selection_passes", "cutoffs")

# Every option some method takes and others refuse.
METHOD_OPTIONS = tuple(dict.fromkeys(option for spec in METHOD_SPECS.values() for option in spec.options))


def methods_taking(option: str) -> tuple[str, ...]:
    """The methods that take ``option`` (a RunConfig field name), in the table's order."""
    return tuple(name for name, spec in METHOD_SPECS.items() if option in spec.options)
