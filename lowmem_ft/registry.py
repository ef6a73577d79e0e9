"""Every fine-tuning method, once: its name, what it does, what it leaves, and where its options,
its planner and its code are. Torch-free: the option checks, the command line's flags, the planner's
dispatch, `lowmem-ft methods`, resume's keep-list and ``build_method`` all derive from this table,
and a method's options and planner are imported (torch-free too) only when they are read.

Adding a method: one package under lowmem_ft/methods/ (options.py: a MethodOptions dataclass;
plan.py: what it costs; method.py: a methods.base.Method, or for a sparse mask an entry chooser
given to methods.sparse.method.SparseIncrement) and one line here. The table names them by string,
so this module, lowest in the layers contract (pyproject.toml), depends on nothing above it.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lowmem_ft.methods.options import MethodOptions

# What a method leaves in its job directory (lowmem_ft/results.py).
RESULTS = ("model", "delta", "adapter")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str  # one line for `lowmem-ft methods` and the run header
    result: str  # "model" (a full Hugging Face model), "delta" (sparse entries) or "adapter" (LoRA)
    # "module:name" under lowmem_ft.methods, imported when first needed: its options (a torch-free
    # MethodOptions dataclass), its planner (torch-free: what it costs, what the planner chooses)
    # and what builds it from the resolved run (imports torch)
    options: str
    plan: str
    runtime: str
    note: str = ""  # said after the options in `lowmem-ft methods`
    # The default --lr is this times full fine-tuning's for the model's size (config.default_lr):
    # a method that trains a small part of the model takes larger steps (LoRA's usual 2e-4 at 7B).
    lr_factor: float = 10.0

    def options_class(self) -> type[MethodOptions]:
        return _load(self.options)

    def planner(self) -> Callable:
        return _load(self.plan)

    def load(self) -> Callable:
        return _load(self.runtime)

    def option_names(self) -> tuple[str, ...]:
        return self.options_class().names()

    def flags(self) -> str:
        """The options as the command line spells them."""
        return ", ".join("--" + option.replace("_", "-") for option in self.option_names())


@cache
def _load(where: str):
    module, name = where.split(":")
    return getattr(importlib.import_module(f"lowmem_ft.methods.{module}"), name)


# Adding a method: its package under lowmem_ft/methods/ (options.py, plan.py, method.py; see
# docs/architecture.md) and one line here.
METHOD_SPECS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "full", "all parameters, every step, fp32 master weights (the baseline)", "model",
            "options:MethodOptions", "full.plan:plan_full", "full.method:FullFineTuning", lr_factor=1.0,
        ),
        MethodSpec(
            "hift",
            "all parameters, one group of layers per step, optimizer state of the others in host memory",
            "model", "hift.options:HiFTOptions", "hift.plan:plan_hift", "hift.method:HiFT", lr_factor=1.0,
        ),
        MethodSpec(
            "sift", "top-k entries of each weight by gradient, fixed after selection; fp32 increments",
            "delta", "sift.options:SiftOptions", "sift.plan:plan_sift", "sift.method:sift",
            note="--selection-batches N is Fu et al.'s SAM (|Σg| over a window; grad2: their Fisher option)",
        ),
        MethodSpec(
            "random", "k random entries of each weight (seeded by --seed), trained like SIFT", "delta",
            "sparse.options:SparseOptions", "sparse.plan:plan_sparse", "random.method:random_mask",
        ),
        MethodSpec(
            "magnitude",
            "the k largest-magnitude entries of each base weight (MagPruning), trained like SIFT",
            "delta", "sparse.options:SparseOptions", "sparse.plan:plan_sparse",
            "magnitude.method:magnitude_mask",
        ),
        MethodSpec(
            "bitfit",
            "bias and norm terms only (Llama has no biases: norm weights, optionally added biases)",
            "model", "bitfit.options:BitFitOptions", "bitfit.plan:plan_bitfit", "bitfit.method:BitFit",
        ),
        MethodSpec(
            "lora", "low-rank adapters on the target linear layers (peft); QLoRA with --base-quant nf4",
            "adapter", "lora.options:LoraOptions", "lora.plan:plan_lora", "lora.method:LoRA",
        ),
        MethodSpec(
            "spafit",
            "by depth: lowest layers frozen, middle bias/norm terms, top LoRA on attention (+terms: II)",
            "model", "spafit.options:SpafitOptions", "spafit.plan:plan_spafit", "spafit.method:SPAFIT",
        ),
    )
}  # fmt: skip


def options_class(method: str) -> type[MethodOptions]:
    return METHOD_SPECS[method].options_class()


def option_fields() -> dict[str, dataclasses.Field]:
    """Every method option by name (its first declaration: a shared one is declared alike by each
    method that takes it), in the table's order."""
    fields: dict[str, dataclasses.Field] = {}
    for spec in METHOD_SPECS.values():
        for field in dataclasses.fields(spec.options_class()):
            fields.setdefault(field.name, field)
    return fields


def methods_taking(option: str) -> tuple[str, ...]:
    """The methods that take ``option`` (a method-options field name), in the table's order."""
    return tuple(name for name, spec in METHOD_SPECS.items() if option in spec.option_names())


def planned_options(method: str) -> tuple[str, ...]:
    """The options of ``method`` the planner fills in when left open (None)."""
    return tuple(f.name for f in dataclasses.fields(options_class(method)) if f.metadata["planned"])


def kept_on_resume(method: str) -> tuple[str, ...]:
    """The options of ``method`` a resumed job keeps from its first machine: they decide what trains
    (or, for --stream, what lives where), so the job does not plan them again."""
    return tuple(f.name for f in dataclasses.fields(options_class(method)) if f.metadata["kept"])
