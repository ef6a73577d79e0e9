"""Every option of `run` and `plan`, declared once. A common option's flags and help are here, its
type and default RunConfig's (config.py), its check RunConfig.validate; a method's own option is
declared whole (default, help, check) in its package's options.py, and its flag comes from there.
The commands' parameter lists are made from these (``with_parameters``), so an option cannot be
added to one list and forgotten in another, and `run`, `plan` and `resume` cannot disagree on a
default.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable

import typer

from lowmem_ft.config import RunConfig
from lowmem_ft.registry import METHOD_SPECS, methods_taking, option_fields

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
    "format": (
        ("--format",),
        "Data format: auto, text, prompt-completion, alpaca, chat, sharegpt (docs/data.md).",
    ),
    "seq_len": ((), "Maximum tokens per example; longer examples are truncated (and counted)."),
    "pack": (("--pack",), "Concatenate examples into rows of --seq-len tokens (less padding)."),
    "eval_data": (
        (),
        "Evaluation data (a file or directory, like DATA); without it --eval-fraction is held out.",
    ),
    "eval_fraction": ((), "Fraction of the data held out for evaluation (seeded by --seed); 0 = none."),
    "eval_every": (
        (),
        "Evaluate every N optimizer steps (and always at the start and end); 0 = start and end.",
    ),
    "max_eval_examples": (
        (),
        "Evaluate on at most this many of the held-out examples (a choice seeded by --seed, the same "
        "at every evaluation and after resume); 0 = all of them.",
    ),
    "skip_bad_lines": (
        ("--skip-bad-lines",),
        "Skip malformed records (and report how many) instead of stopping.",
    ),
    "lr": (
        (),
        "Peak learning rate. [default: by method and model size: 2e-5 for full fine-tuning at 7B, "
        "more for smaller models, 10x for the methods that train a small part (docs/user-guide.md)]",
    ),
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
    "nproc": (
        (),
        "Ranks on this machine: one per GPU (FSDP2 for --method full and hift, the other methods "
        "data-parallel), or CPU processes with gloo where there is no GPU. --batch-size is "
        "the global batch "
        "(docs/distributed.md).",
    ),
    "save_dtype": ((), "Precision of the saved model: auto (the base model's), fp32, bf16, fp16."),
    "seed": ((), "Seed for data order, evaluation split and initialisation."),
    "save_every": ((), "Save a checkpoint every N optimizer steps; 0 = by time only."),
    "save_every_minutes": (
        (),
        "Save a checkpoint every M minutes; 0 = by steps only. (Also at the end and on Ctrl-C.)",
    ),
    "keep_checkpoints": ((), "Checkpoints kept in JOB/checkpoints; older ones are deleted."),
    "max_bad_steps": (
        (),
        "Stop after this many steps in a row with a NaN/Inf loss or gradient norm (each one is skipped).",
    ),
    "log": (
        (),
        "Also log the metrics as csv (JOB/metrics.csv), tensorboard (JOB/tensorboard/) or both: "
        "--log csv,tensorboard. JOB/metrics.jsonl is always written.",
    ),
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
_TYPES = typing.get_type_hints(RunConfig, localns={"MethodOptions": object})  # (not an option)


def _method_option_help(name: str, field: dataclasses.Field) -> str:
    """A method option's help, with the methods that take it in front (``sift/random: ...``)."""
    return f"{'/'.join(methods_taking(name))}: {field.metadata['help']}"


def _method_options() -> dict[str, tuple[object, tuple[str, ...], str, object]]:
    """Every method's own options (from their options.py): name -> (type, flags, help, default)."""
    types = {}
    for spec in reversed(METHOD_SPECS.values()):  # the first method to declare a name wins, as below
        types |= typing.get_type_hints(spec.options_class())
    return {
        name: (types[name], field.metadata["flags"], _method_option_help(name, field), field.default)
        for name, field in option_fields().items()
    }


METHOD_OPTIONS = _method_options()


def option(name: str, default=dataclasses.MISSING, help: str | None = None) -> typer.models.OptionInfo:
    """The typer option of ``name`` (a RunConfig field or a method's option): its flags, help and
    default from where it is declared (unless ``default``, e.g. `resume`'s "the job's" None)."""
    if name in METHOD_OPTIONS:
        _, flags, text, declared = METHOD_OPTIONS[name]
    else:
        (flags, text), declared = RUN_OPTIONS[name], _FIELDS[name].default
    return typer.Option(declared if default is dataclasses.MISSING else default, *flags, help=help or text)


def with_parameters(parameters: dict[str, tuple[object, object]]) -> Callable:
    """Give ``function(context, **values)`` the signature typer reads: the command's context (to
    tell an option given from its default), then one keyword parameter per entry,
    ``name: (type, typer.Option or typer.Argument)``."""

    def wrap(function: Callable) -> Callable:
        function.__signature__ = inspect.Signature(
            [
                inspect.Parameter("context", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context),
                *[
                    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=kind)
                    for name, (kind, info) in parameters.items()
                ],
            ]
        )
        return function

    return wrap


def given(context: typer.Context, options: dict) -> dict:
    """The options of a command, less the method options the user did not give: those are refused
    for a method that does not take them whatever their value (`--method full --order bottom-up`,
    HiFT's default order, is as wrong as `--order top-down`), and a method that does take them has
    its own defaults (its options.py), which the shared flag's shown default may not be."""
    return {
        name: value
        for name, value in options.items()
        if name not in METHOD_OPTIONS or context.get_parameter_source(name).name != "DEFAULT"
    }


def run_config_options(names) -> dict[str, tuple[object, object]]:
    """Options as command parameters, in the order of ``names``."""
    kind = lambda name: _TYPES[name] if name in _TYPES else METHOD_OPTIONS[name][0]  # noqa: E731
    return {name: (kind(name), option(name)) for name in names}


# `run`'s options: the common ones, then every method's own, in `run --help` order
_FIRST = ("out", "method", "optimizer")
RUN_PARAMETERS = (*_FIRST, *METHOD_OPTIONS, *[name for name in RUN_OPTIONS if name not in _FIRST])

# `plan`'s options: the common ones the planner reads (planner.PLANNED_AS_GIVEN, with the budget and
# precision first), then every method's own, in `plan --help` order.
PLAN_OPTIONS = (
    "method", "gpu_mem", "cpu_mem", "seq_len", "batch_size", "micro_batch_size", "gradient_checkpointing",
    "dtype", "nproc", *METHOD_OPTIONS,
)  # fmt: skip


QUIET = (bool, typer.Option(False, "--quiet", "-q", help="No progress bar."))
