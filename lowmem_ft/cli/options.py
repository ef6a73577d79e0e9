"""Every option of `run` and `plan`, declared once: its flags and help here; its type and default
are RunConfig's (config.py), its check RunConfig.validate. The commands' parameter lists are made
from this table (``with_options``), so an option cannot be added to one list and forgotten in
another, and `run`, `plan` and `resume` cannot disagree on a default.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable

import typer

from lowmem_ft.config import RunConfig

# RunConfig field -> (flags, help). Empty flags: typer's own --field-name. In `run --help` order.
RUN_OPTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "out": (("--out", "-o"), "Job directory to create. [default: runs/<model>-<method>-<time>]"),
    "method": (
        (),
        "full = every parameter every step; hift = one group of layers per step (all parameters); "
        "sift = the top entries of each weight by gradient; random / magnitude = sparse baselines; "
        "bitfit, lora, spafit = structured. `lowmem-ft methods` lists them.",
    ),
    "optimizer": ((), "adamw, sgd (momentum 0.9), adagrad, or adamw8bit (bitsandbytes)."),
    "units_per_group": (
        (),
        "HiFT: units (embedding, each layer, head) trained together. [default: planner's]",
    ),
    "groups": ((), "HiFT: number of groups (instead of --units-per-group)."),
    "order": ((), "HiFT: order of the groups: bottom-up, top-down or random (seeded)."),
    "switch_every": ((), "HiFT: optimizer steps per group before switching (BAdam uses 50)."),
    "state_policy": (
        (),
        "HiFT: optimizer state of waiting groups: keep, keep-8bit or drop. [default: planner's]",
    ),
    "sparsity": (
        (),
        "SIFT/random/magnitude: fraction of each target weight that trains, e.g. 0.01. "
        "[default: the planner's]",
    ),
    "targets": (
        (),
        "Sparse methods and LoRA: all-linear, attention, mlp, or module names/patterns such as "
        "q_proj,v_proj.",
    ),
    "base_quant": (
        (),
        "Sparse methods: frozen base weights as none, int8 or nf4 (bitsandbytes); LoRA: none or "
        "nf4 (QLoRA). [default: the planner's]",
    ),
    "lora_rank": ((), "LoRA/SPAFIT: rank r of the adapters."),
    "lora_alpha": ((), "LoRA/SPAFIT: scale α (the update is α/r·BA). [default: 2 × rank]"),
    "lora_dropout": ((), "LoRA/SPAFIT: dropout on the adapters' input."),
    "cutoffs": (
        (),
        "SPAFIT: N1,N2: layers below N1 frozen, N1 to N2-1 bias/norm only, N2 up LoRA on attention. "
        "[default: the paper's 4,9 of 24 layers, scaled to the model]",
    ),
    "variant": ((), "SPAFIT: I = LoRA only in the top layers; II = LoRA and bias/norm terms there."),
    "add_biases": (
        ("--add-biases",),
        "BitFit/SPAFIT: add zero-initialised biases to the decoder's linear layers and train them "
        "(Llama has none).",
    ),
    "freeze_layers": (
        (),
        "BitFit/LoRA: decoder layers that stay frozen, numbered from 0, e.g. 0-15 or 0-3,8.",
    ),
    "selection_batches": ((), "SIFT: micro-batches whose gradients choose the entries (not trained on)."),
    "selection_score": ((), "SIFT: grad = |sum of gradients|, grad2 = sum of squared gradients."),
    "selection_passes": (
        (),
        "SIFT: passes over the selection window (scores kept for a slice of the weights per pass). "
        "[default: the planner's]",
    ),
    "stream": (
        ("--stream",),
        "HiFT/sparse methods: keep every decoder layer's frozen weights in host memory and stream "
        "them in to compute (the smallest GPU footprint). [default: the planner streams what does not fit]",
    ),
    "format": (("--format",), "Data format: auto, text, prompt-completion, alpaca, chat."),
    "seq_len": ((), "Maximum tokens per example; longer examples are truncated (and counted)."),
    "pack": (("--pack",), "Concatenate examples into rows of --seq-len tokens (less padding)."),
    "eval_data": ((), "Evaluation JSONL file. Without it, --eval-fraction of the data is held out."),
    "eval_fraction": ((), "Fraction of the data held out for evaluation (seeded by --seed); 0 = none."),
    "eval_every": (
        (),
        "Evaluate every N optimizer steps (and always at the start and end); 0 = start and end.",
    ),
    "skip_bad_lines": (
        ("--skip-bad-lines",),
        "Skip malformed JSONL lines (and report how many) instead of stopping.",
    ),
    "lr": ((), "Peak learning rate."),
    "schedule": ((), "Learning-rate decay after warmup: cosine, linear or constant."),
    "warmup_ratio": ((), "Fraction of the optimizer steps spent warming up linearly."),
    "min_lr_ratio": ((), "Final learning rate as a fraction of --lr."),
    "weight_decay": ((), "AdamW weight decay (not applied to norms and biases)."),
    "grad_clip": ((), "Clip the gradient norm to this value; 0 disables clipping."),
    "batch_size": ((), "Examples per optimizer step."),
    "micro_batch_size": (
        (),
        "Examples per forward/backward; gradients accumulate to --batch-size. [default: the planner's]",
    ),
    "epochs": ((), "Passes over the training data (ignored when --max-steps is given)."),
    "max_steps": ((), "Number of optimizer steps; overrides --epochs."),
    "dtype": ((), "Compute precision: auto (fp32 on CPU, bf16 on GPU), fp32, bf16, fp16."),
    "device": ((), "Where to train: auto, cpu, cuda or cuda:N (the Nth visible GPU, counted from 0)."),
    "gradient_checkpointing": (
        ("--gradient-checkpointing/--no-gradient-checkpointing",),
        "Recompute activations in backward: far less memory, ~30% more compute. [default: planner's]",
    ),
    "gpu_mem": ((), "GPU memory to plan for, e.g. 20GiB. [default: the GPU's free memory]"),
    "cpu_mem": ((), "Host RAM to plan for, e.g. 48GiB. [default: available]"),
    "save_dtype": ((), "Precision of the saved model: auto (the base model's), fp32, bf16, fp16."),
    "seed": ((), "Seed for data order, evaluation split and initialisation."),
    "save_every": ((), "Save a checkpoint every N optimizer steps; 0 = by time only."),
    "save_every_minutes": (
        (),
        "Save a checkpoint every M minutes; 0 = by steps only. (Also at the end and on Ctrl-C.)",
    ),
    "keep_checkpoints": ((), "Checkpoints kept in JOB/checkpoints; older ones are deleted."),
    "max_bad_steps": ((), "Stop after this many steps in a row with a NaN/Inf loss (each one is skipped)."),
    "allow_download": (
        ("--allow-download",),
        "Download missing weights from the Hugging Face hub (safetensors only).",
    ),
    "trust_remote_code": (
        ("--trust-remote-code",),
        "Allow models that run their own Python code from the hub. Off unless you ask.",
    ),
}

_FIELDS = {field.name: field for field in dataclasses.fields(RunConfig)}
_TYPES = typing.get_type_hints(RunConfig)


def option(name: str, default=dataclasses.MISSING, help: str | None = None) -> typer.models.OptionInfo:
    """The typer option of RunConfig field ``name``: its flags and help from RUN_OPTIONS, its
    default RunConfig's (unless ``default``, e.g. `resume`'s "the job's" None)."""
    flags, text = RUN_OPTIONS[name]
    value = _FIELDS[name].default if default is dataclasses.MISSING else default
    return typer.Option(value, *flags, help=help or text)


def with_parameters(parameters: dict[str, tuple[object, object]]) -> Callable:
    """Give ``function(**values)`` the signature typer reads: one keyword parameter per entry,
    ``name: (type, typer.Option or typer.Argument)``."""

    def wrap(function: Callable) -> Callable:
        function.__signature__ = inspect.Signature(
            [
                inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=kind)
                for name, (kind, info) in parameters.items()
            ]
        )
        return function

    return wrap


def run_config_options(names) -> dict[str, tuple[object, object]]:
    """RunConfig fields as command parameters, in the order of ``names``."""
    return {name: (_TYPES[name], option(name)) for name in names}


# `plan`'s options: what the planner reads (planner.PLANNED_AS_GIVEN, with the budget and precision
# first), in `plan --help` order.
PLAN_OPTIONS = (
    "method", "gpu_mem", "cpu_mem", "seq_len", "batch_size", "micro_batch_size",
    "gradient_checkpointing", "dtype", "units_per_group", "groups", "order", "switch_every",
    "state_policy", "sparsity", "base_quant", "targets", "selection_batches", "lora_rank", "cutoffs",
    "variant", "add_biases", "freeze_layers", "stream",
)  # fmt: skip


QUIET = (bool, typer.Option(False, "--quiet", "-q", help="No progress bar."))
