"""`run`, `resume` and `plan`: parse, call the library, print."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from lowmem_ft.cli.options import (
    ADD_BIASES,
    BASE_QUANT,
    BATCH_SIZE,
    CPU_MEM,
    CUTOFFS,
    DTYPE,
    FREEZE_LAYERS,
    GPU_MEM,
    GRADIENT_CHECKPOINTING,
    KEEP_CHECKPOINTS,
    LORA_ALPHA,
    LORA_RANK,
    MAX_BAD_STEPS,
    METHOD,
    MICRO_BATCH_SIZE,
    SAVE_EVERY,
    SAVE_EVERY_MINUTES,
    SELECTION_BATCHES,
    SEQ_LEN,
    SPARSITY,
    STATE_POLICY,
    STREAM,
    TARGETS,
    UNITS_PER_GROUP,
    VARIANT,
)  # fmt: skip
from lowmem_ft.errors import UserError

RUN_EPILOG = """\
Examples:

  lowmem-ft run tiny examples/python-qa.jsonl                      # the embedded model, on CPU

  lowmem-ft run tiny examples/python-qa.jsonl --max-steps 20 --lr 1e-3 --out runs/try

  lowmem-ft run ./my-llama-dir data.jsonl --eval-data dev.jsonl --seq-len 1024

  lowmem-ft run llama-2-7b chat.jsonl --format chat --batch-size 32 --micro-batch-size 2 \
      --gradient-checkpointing

  lowmem-ft run tiny examples/python-qa.jsonl --method sift --sparsity 0.01 --lr 1e-3
"""


def run(
    model: str = typer.Argument(
        ..., help="Model alias (tiny, llama-2-7b, ...), local Hugging Face directory, or cached hub id."
    ),
    data: Path = typer.Argument(
        ..., help="Training data: a JSONL file (text, prompt-completion, alpaca or chat records)."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Job directory to create. [default: runs/<model>-<method>-<time>]"
    ),
    method: str = METHOD,
    optimizer: str = typer.Option(
        "adamw", help="adamw, sgd (momentum 0.9), adagrad, or adamw8bit (bitsandbytes)."
    ),
    units_per_group: int | None = UNITS_PER_GROUP,
    groups: int | None = typer.Option(None, help="HiFT: number of groups (instead of --units-per-group)."),
    order: str = typer.Option(
        "bottom-up", help="HiFT: order of the groups: bottom-up, top-down or random (seeded)."
    ),
    switch_every: int = typer.Option(
        1, help="HiFT: optimizer steps per group before switching (BAdam uses 50)."
    ),
    state_policy: str | None = STATE_POLICY,
    sparsity: float | None = SPARSITY,
    targets: str = TARGETS,
    base_quant: str | None = BASE_QUANT,
    lora_rank: int = LORA_RANK,
    lora_alpha: float | None = LORA_ALPHA,
    lora_dropout: float = typer.Option(0.0, help="LoRA/SPAFIT: dropout on the adapters' input."),
    cutoffs: str | None = CUTOFFS,
    variant: str = VARIANT,
    add_biases: bool = ADD_BIASES,
    freeze_layers: str | None = FREEZE_LAYERS,
    selection_batches: int = SELECTION_BATCHES,
    selection_score: str = typer.Option(
        "grad", help="SIFT: grad = |sum of gradients|, grad2 = sum of squared gradients."
    ),
    selection_passes: int | None = typer.Option(
        None,
        help="SIFT: passes over the selection window (scores kept for a slice of the weights "
        "per pass). [default: the planner's]",
    ),
    stream: bool = STREAM,
    format: str = typer.Option(
        "auto", "--format", help="Data format: auto, text, prompt-completion, alpaca, chat."
    ),
    seq_len: int = SEQ_LEN,
    pack: bool = typer.Option(
        False, "--pack", help="Concatenate examples into rows of --seq-len tokens (less padding)."
    ),
    eval_data: Path | None = typer.Option(
        None, help="Evaluation JSONL file. Without it, --eval-fraction of the data is held out."
    ),
    eval_fraction: float = typer.Option(
        0.1, help="Fraction of the data held out for evaluation (seeded by --seed); 0 = none."
    ),
    eval_every: int = typer.Option(
        50, help="Evaluate every N optimizer steps (and always at the start and end); 0 = start and end."
    ),
    skip_bad_lines: bool = typer.Option(
        False,
        "--skip-bad-lines",
        help="Skip malformed JSONL lines (and report how many) instead of stopping.",
    ),
    lr: float = typer.Option(2e-5, help="Peak learning rate."),
    schedule: str = typer.Option(
        "cosine", help="Learning-rate decay after warmup: cosine, linear or constant."
    ),
    warmup_ratio: float = typer.Option(
        0.03, help="Fraction of the optimizer steps spent warming up linearly."
    ),
    min_lr_ratio: float = typer.Option(0.1, help="Final learning rate as a fraction of --lr."),
    weight_decay: float = typer.Option(0.0, help="AdamW weight decay (not applied to norms and biases)."),
    grad_clip: float = typer.Option(1.0, help="Clip the gradient norm to this value; 0 disables clipping."),
    batch_size: int = BATCH_SIZE,
    micro_batch_size: int | None = MICRO_BATCH_SIZE,
    epochs: float = typer.Option(
        1.0, help="Passes over the training data (ignored when --max-steps is given)."
    ),
    max_steps: int | None = typer.Option(None, help="Number of optimizer steps; overrides --epochs."),
    dtype: str = DTYPE,
    device: str = typer.Option(
        "auto", help="Where to train: auto, cpu, cuda or cuda:N (the Nth visible GPU, counted from 0)."
    ),
    gradient_checkpointing: bool | None = GRADIENT_CHECKPOINTING,
    gpu_mem: str | None = GPU_MEM,
    cpu_mem: str | None = CPU_MEM,
    save_dtype: str = typer.Option(
        "auto", help="Precision of the saved model: auto (the base model's), fp32, bf16, fp16."
    ),
    seed: int = typer.Option(0, help="Seed for data order, evaluation split and initialisation."),
    save_every: int = SAVE_EVERY,
    save_every_minutes: float = SAVE_EVERY_MINUTES,
    keep_checkpoints: int = KEEP_CHECKPOINTS,
    max_bad_steps: int = MAX_BAD_STEPS,
    allow_download: bool = typer.Option(
        False,
        "--allow-download",
        help="Download missing weights from the Hugging Face hub (safetensors only).",
    ),
    trust_remote_code: bool = typer.Option(
        False,
        "--trust-remote-code",
        help="Allow models that run their own Python code from the hub. Off unless you ask.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Fine-tune MODEL on DATA and write a job directory with metrics, checkpoints and the result."""
    from lowmem_ft.config import RunConfig
    from lowmem_ft.start import run as run_training

    config = RunConfig(
        model=model, data=data, out=out, method=method, optimizer=optimizer, units_per_group=units_per_group,
        groups=groups, order=order, switch_every=switch_every, state_policy=state_policy,
        sparsity=sparsity, targets=targets, base_quant=base_quant, selection_batches=selection_batches,
        selection_score=selection_score, selection_passes=selection_passes, stream=stream, format=format,
        lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, cutoffs=cutoffs,
        variant=variant, add_biases=add_biases, freeze_layers=freeze_layers,
        seq_len=seq_len, pack=pack,
        eval_data=eval_data, eval_fraction=eval_fraction, eval_every=eval_every,
        skip_bad_lines=skip_bad_lines,
        lr=lr, schedule=schedule, warmup_ratio=warmup_ratio, min_lr_ratio=min_lr_ratio,
        weight_decay=weight_decay, grad_clip=grad_clip, batch_size=batch_size,
        micro_batch_size=micro_batch_size, epochs=epochs, max_steps=max_steps, dtype=dtype, device=device,
        gradient_checkpointing=gradient_checkpointing, gpu_mem=gpu_mem, cpu_mem=cpu_mem,
        save_dtype=save_dtype, seed=seed, save_every=save_every, save_every_minutes=save_every_minutes,
        keep_checkpoints=keep_checkpoints, max_bad_steps=max_bad_steps,
        allow_download=allow_download, trust_remote_code=trust_remote_code,
    )  # fmt: skip
    if out is not None and (out / "job.json").exists():
        _offer_resume(out, config, quiet)
        return
    _training(lambda: run_training(config, show_progress=not quiet))


def _training(start) -> None:
    """Run a training entry point; Ctrl-C and SIGTERM end it with exit code 130."""
    from lowmem_ft.stop import RunInterrupted

    try:
        start()
    except RunInterrupted as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(130) from None
    except KeyboardInterrupt:  # still setting up: no training state was written
        typer.echo("interrupted before training started; nothing was lost", err=True)
        raise typer.Exit(130) from None


def _interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


def _offer_resume(out: Path, config, quiet: bool) -> None:
    """`run --out DIR` where DIR already holds a job: offer to resume it, never overwrite it."""
    from lowmem_ft.jobs import read_job
    from lowmem_ft.resume import resume as resume_training
    from lowmem_ft.resume import settings_that_differ

    info = read_job(out)
    if info is None:
        raise UserError(f"--out {out} holds a job.json that cannot be read; choose a new --out")
    if info.status == "done":
        raise UserError(f"--out {out} holds a finished job; choose a new --out")
    where = f"{info.status} at step {info.step}/{info.max_steps}"
    if not _interactive():
        raise UserError(
            f"--out {out} holds an unfinished job ({where}); continue it with `lowmem-ft resume {out}`, "
            "or choose a new --out"
        )
    if not typer.confirm(f"{out} holds an unfinished job ({where}). Resume it?", default=True):
        raise UserError(f"--out {out} holds a job; choose a new --out")
    differ = settings_that_differ(out, config)
    if differ:
        typer.echo(f"note       the job keeps its own settings; this command's differ in {', '.join(differ)}")
    _training(lambda: resume_training(out, show_progress=not quiet))


RESUME_EPILOG = """\
Examples:

  lowmem-ft resume runs/tiny-hift-20261122-101500

  lowmem-ft resume runs/big --gpu-mem 20GiB --micro-batch-size 2     # on a smaller GPU

The job continues from its newest checkpoint that verifies (or from step 0 if it has none), with
its own settings, planned again for this machine.
"""


def resume(
    job_dir: Path = typer.Argument(..., help="The job directory to continue."),
    gpu_mem: str | None = GPU_MEM,
    cpu_mem: str | None = CPU_MEM,
    micro_batch_size: int | None = MICRO_BATCH_SIZE,
    save_every: int | None = typer.Option(None, help="Checkpoint every N steps. [default: the job's]"),
    save_every_minutes: float | None = typer.Option(
        None, help="Checkpoint every M minutes. [default: the job's]"
    ),
    keep_checkpoints: int | None = typer.Option(None, help="Checkpoints kept. [default: the job's]"),
    max_bad_steps: int | None = typer.Option(
        None, help="NaN/Inf steps in a row before stopping. [default: the job's]"
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Continue an interrupted or failed job from its last valid checkpoint."""
    from lowmem_ft.resume import resume as resume_training

    overrides = {
        "gpu_mem": gpu_mem, "cpu_mem": cpu_mem, "micro_batch_size": micro_batch_size,
        "save_every": save_every, "save_every_minutes": save_every_minutes,
        "keep_checkpoints": keep_checkpoints, "max_bad_steps": max_bad_steps,
    }  # fmt: skip
    _training(lambda: resume_training(job_dir, overrides, show_progress=not quiet))


PLAN_EPILOG = """\
Examples:

  lowmem-ft plan llama-2-7b --method full --gpu-mem 24GiB             # does it fit a 24 GB card?

  lowmem-ft plan llama-2-7b --method hift --gpu-mem 8GiB --cpu-mem 64GiB

  lowmem-ft plan qwen2.5-7b --method sift --gpu-mem 16GiB --seq-len 2048 --json

Exit code 0 when the plan fits, 3 when it does not.
"""


def plan(
    model: str = typer.Argument(
        ..., help="Model alias, local Hugging Face directory, or cached hub id (no weights needed)."
    ),
    method: str = METHOD,
    gpu_mem: str | None = GPU_MEM,
    cpu_mem: str | None = CPU_MEM,
    gpu: str | None = typer.Option(None, help="'none' plans a CPU-only run even where a GPU is present."),
    seq_len: int = SEQ_LEN,
    batch_size: int = BATCH_SIZE,
    micro_batch_size: int | None = MICRO_BATCH_SIZE,
    gradient_checkpointing: bool | None = GRADIENT_CHECKPOINTING,
    dtype: str = DTYPE,
    units_per_group: int | None = UNITS_PER_GROUP,
    state_policy: str | None = STATE_POLICY,
    sparsity: float | None = SPARSITY,
    base_quant: str | None = BASE_QUANT,
    targets: str = TARGETS,
    selection_batches: int = SELECTION_BATCHES,
    lora_rank: int = LORA_RANK,
    cutoffs: str | None = CUTOFFS,
    variant: str = VARIANT,
    add_biases: bool = ADD_BIASES,
    freeze_layers: str | None = FREEZE_LAYERS,
    stream: bool = STREAM,
    as_json: bool = typer.Option(
        False, "--json", help="Print the plan as JSON (documented in docs/planner.md)."
    ),
) -> None:
    """Plan a fine-tune for this machine (or one you describe) without loading any weights."""
    from lowmem_ft.config import RunConfig
    from lowmem_ft.planner import PLANNED_AS_GIVEN, build_plan, render_plan

    # The same options as `run`, checked by the same code: one message per mistake, either command;
    # and passed to the planner the way `run` passes them.
    config = RunConfig(
        model=model, data=Path("plan"), method=method, gpu_mem=gpu_mem, cpu_mem=cpu_mem, seq_len=seq_len,
        batch_size=batch_size, micro_batch_size=micro_batch_size,
        gradient_checkpointing=gradient_checkpointing, dtype=dtype, units_per_group=units_per_group,
        state_policy=state_policy, sparsity=sparsity, base_quant=base_quant, targets=targets,
        selection_batches=selection_batches, stream=stream, lora_rank=lora_rank, cutoffs=cutoffs,
        variant=variant, add_biases=add_biases, freeze_layers=freeze_layers,
    )  # fmt: skip
    config.validate(data_files=False)
    result = build_plan(
        model, gpu_mem=gpu_mem, gpu=gpu, dtype=dtype, selection_batches=selection_batches,
        **{option: getattr(config, option) for option in PLANNED_AS_GIVEN},
    )  # fmt: skip
    if as_json:
        typer.echo(json.dumps({"model": result.model_name, **result.plan.to_json()}, indent=2))
    else:
        typer.echo(render_plan(result.plan, result.model_name, result.budget.describe()))
    raise typer.Exit(0 if result.plan.fits else 3)
