"""The command line: parse, call, print. Nothing here decides how training works.

lowmem-ft run tiny examples/python-qa.jsonl
lowmem-ft jobs
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import typer

import lowmem_ft
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

# Options that change nothing in the result, so `resume` accepts them too.
SAVE_EVERY = typer.Option(0, help="Save a checkpoint every N optimizer steps; 0 = by time only.")
SAVE_EVERY_MINUTES = typer.Option(
    30.0, help="Save a checkpoint every M minutes; 0 = by steps only. (Also at the end and on Ctrl-C.)"
)
KEEP_CHECKPOINTS = typer.Option(2, help="Checkpoints kept in JOB/checkpoints; older ones are deleted.")
MAX_BAD_STEPS = typer.Option(
    5, help="Stop after this many steps in a row with a NaN/Inf loss (each one is skipped)."
)

# Options of the structured methods (lowmem_ft/selections.py), shared by `run` and `plan`.
# Options `run` and `plan` share: declared once.
METHOD = typer.Option(
    "full",
    help="full = every parameter every step; hift = one group of layers per step (all parameters); "
    "sift = the top entries of each weight by gradient; random / magnitude = sparse baselines; "
    "bitfit, lora, spafit = structured. `lowmem-ft methods` lists them.",
)
UNITS_PER_GROUP = typer.Option(
    None, help="HiFT: units (embedding, each layer, head) trained together. [default: planner's]"
)
STATE_POLICY = typer.Option(
    None, help="HiFT: optimizer state of waiting groups: keep, keep-8bit or drop. [default: planner's]"
)
SPARSITY = typer.Option(
    None,
    help="SIFT/random/magnitude: fraction of each target weight that trains, e.g. 0.01. "
    "[default: the planner's]",
)
TARGETS = typer.Option(
    "all-linear",
    help="Sparse methods and LoRA: all-linear, attention, mlp, or module names/patterns such as "
    "q_proj,v_proj.",
)
BASE_QUANT = typer.Option(
    None,
    help="Sparse methods: frozen base weights as none, int8 or nf4 (bitsandbytes); LoRA: none or "
    "nf4 (QLoRA). [default: the planner's]",
)
SELECTION_BATCHES = typer.Option(
    1, help="SIFT: micro-batches whose gradients choose the entries (not trained on)."
)
STREAM = typer.Option(
    False,
    "--stream",
    help="HiFT/sparse methods: keep every decoder layer's frozen weights in host memory and stream "
    "them in to compute (the smallest GPU footprint). [default: the planner streams what does not fit]",
)
SEQ_LEN = typer.Option(512, help="Maximum tokens per example; longer examples are truncated (and counted).")
BATCH_SIZE = typer.Option(16, help="Examples per optimizer step.")
MICRO_BATCH_SIZE = typer.Option(
    None,
    help="Examples per forward/backward; gradients accumulate to --batch-size. [default: the planner's]",
)
DTYPE = typer.Option("auto", help="Compute precision: auto (fp32 on CPU, bf16 on GPU), fp32, bf16, fp16.")
GRADIENT_CHECKPOINTING = typer.Option(
    None,
    "--gradient-checkpointing/--no-gradient-checkpointing",
    help="Recompute activations in backward: far less memory, ~30% more compute. [default: planner's]",
)
GPU_MEM = typer.Option(None, help="GPU memory to plan for, e.g. 20GiB. [default: the GPU's free memory]")
CPU_MEM = typer.Option(None, help="Host RAM to plan for, e.g. 48GiB. [default: available]")

LORA_RANK = typer.Option(8, help="LoRA/SPAFIT: rank r of the adapters.")
LORA_ALPHA = typer.Option(None, help="LoRA/SPAFIT: scale α (the update is α/r·BA). [default: 2 × rank]")
CUTOFFS = typer.Option(
    None,
    help="SPAFIT: N1,N2: layers below N1 frozen, N1 to N2-1 bias/norm only, N2 up LoRA on attention. "
    "[default: the paper's 4,9 of 24 layers, scaled to the model]",
)
VARIANT = typer.Option(
    "I", help="SPAFIT: I = LoRA only in the top layers; II = LoRA and bias/norm terms there."
)
ADD_BIASES = typer.Option(
    False,
    "--add-biases",
    help="BitFit/SPAFIT: add zero-initialised biases to the decoder's linear layers and train them "
    "(Llama has none).",
)
FREEZE_LAYERS = typer.Option(
    None, help="BitFit/LoRA: decoder layers that stay frozen, numbered from 0, e.g. 0-15 or 0-3,8."
)

app = typer.Typer(
    name="lowmem-ft",
    help="Fine-tune 7B-class language models on one GPU that cannot hold them the usual way.",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lowmem-ft {lowmem_ft.__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Fine-tune 7B-class language models on one GPU that cannot hold them the usual way."""
    if ctx.invoked_subcommand is None:  # bare `lowmem-ft`: show the help, which is not an error
        typer.echo(ctx.get_help())


@app.command(epilog=RUN_EPILOG)
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
    from lowmem_ft.train import run as run_training

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
    from lowmem_ft.config import RunConfig
    from lowmem_ft.jobs import read_job
    from lowmem_ft.resume import resume as resume_training

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
    saved = RunConfig.from_json(json.loads((out / "job.json").read_text()).get("requested", {}))
    differ = [
        "--" + key.replace("_", "-")
        for key in ("model", "data", "method", "lr", "batch_size", "max_steps", "epochs", "seed")
        if getattr(saved, key) != getattr(config, key)
        and not (key == "data" and Path(saved.data).resolve() == Path(config.data).resolve())
    ]
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


@app.command(epilog=RESUME_EPILOG)
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


@app.command(epilog=PLAN_EPILOG)
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
    from lowmem_ft.planner import build_plan, render_plan

    # The same options as `run`, checked by the same code: one message per mistake, either command.
    RunConfig(
        model=model, data=Path("plan"), method=method, gpu_mem=gpu_mem, cpu_mem=cpu_mem, seq_len=seq_len,
        batch_size=batch_size, micro_batch_size=micro_batch_size,
        gradient_checkpointing=gradient_checkpointing, dtype=dtype, units_per_group=units_per_group,
        state_policy=state_policy, sparsity=sparsity, base_quant=base_quant, targets=targets,
        selection_batches=selection_batches, stream=stream, lora_rank=lora_rank, cutoffs=cutoffs,
        variant=variant, add_biases=add_biases, freeze_layers=freeze_layers,
    ).validate(data_files=False)  # fmt: skip
    result = build_plan(
        model, method=method, gpu_mem=gpu_mem, cpu_mem=cpu_mem, gpu=gpu, seq_len=seq_len,
        batch_size=batch_size, micro_batch_size=micro_batch_size,
        gradient_checkpointing=gradient_checkpointing, dtype=dtype,
        units_per_group=units_per_group, state_policy=state_policy, sparsity=sparsity, base_quant=base_quant,
        targets=targets, selection_batches=selection_batches, stream=stream, lora_rank=lora_rank,
        cutoffs=cutoffs, variant=variant, add_biases=add_biases, freeze_layers=freeze_layers,
    )  # fmt: skip
    if as_json:
        typer.echo(json.dumps({"model": result.model_name, **result.plan.to_json()}, indent=2))
    else:
        typer.echo(render_plan(result.plan, result.model_name, result.budget.describe()))
    raise typer.Exit(0 if result.plan.fits else 3)


EXPORT_EPILOG = """\
Examples:

  lowmem-ft export runs/sift                              # what the delta holds

  lowmem-ft export runs/sift --merge --out merged/        # a full Hugging Face model

  lowmem-ft export runs/sift --merge --out merged/ --base /data/llama-2-7b --save-dtype bf16
"""


@app.command(epilog=EXPORT_EPILOG)
def export(
    job_dir: Path = typer.Argument(
        ..., help="Job directory of a sparse or LoRA run (or its delta.safetensors / adapter directory)."
    ),
    merge: bool = typer.Option(False, "--merge", help="Write base + increment as a full Hugging Face model."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Directory for the merged model (with --merge)."
    ),
    base: str | None = typer.Option(
        None, help="The base model, if not where the job found it (its weights must hash the same)."
    ),
    save_dtype: str = typer.Option(
        "auto", help="Precision of the merged weights: auto (the base's own), fp32, bf16, fp16."
    ),
) -> None:
    """Show a sparse or LoRA job's result, or merge it into its base model (--merge --out DIR)."""
    from lowmem_ft.export import merge_result
    from lowmem_ft.results import find_result

    if not merge:
        given = [flag for flag, value in (("--out", out), ("--base", base)) if value is not None]
        given += ["--save-dtype"] if save_dtype != "auto" else []
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise UserError(f"{', '.join(given)} only {verb} to --merge; add --merge")
        kind, path = find_result(job_dir)
        (_show_delta if kind == "delta" else _show_adapter)(path)
        typer.echo(f"merge      lowmem-ft export {job_dir} --merge --out DIR")
        return
    if out is None:
        raise UserError("--merge needs --out DIR, the directory to write the merged model to")
    started = time.perf_counter()
    written, meta = merge_result(job_dir, out, base, save_dtype)
    if meta.get("base_quant", "none") != "none":
        typer.echo(
            f"note       trained on a {meta['base_quant']} base; merged into the original weights, "
            "as QLoRA adapters are"
        )
    typer.echo(f"merged     {written} ({time.perf_counter() - started:.1f}s); loads with transformers")


def _show_delta(path: Path) -> None:
    from lowmem_ft.delta import read_delta
    from lowmem_ft.sizes import format_bytes

    delta = read_delta(path)
    meta = delta.meta
    typer.echo(f"delta      {path} ({format_bytes(path.stat().st_size)})")
    typer.echo(
        f"entries    {delta.count:,} in {len(delta.entries)} weights "
        f"(--method {meta.get('method')}, sparsity {meta.get('sparsity')}, targets {meta.get('targets')})"
    )
    typer.echo(
        f"base       {meta.get('base_model')} ({meta.get('base_quant')} during training), "
        f"weights sha256 {str(meta.get('base_weights_sha256'))[:16]}…"
    )


def _show_adapter(path: Path) -> None:
    from lowmem_ft.results import ADAPTER_META
    from lowmem_ft.sizes import format_bytes

    meta = json.loads((path / ADAPTER_META).read_text())
    peft_config = json.loads((path / "adapter_config.json").read_text())
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    typer.echo(f"adapter    {path} ({format_bytes(size)}; peft format: PeftModel.from_pretrained(base, DIR))")
    typer.echo(
        f"lora       rank {peft_config.get('r')}, alpha {peft_config.get('lora_alpha')} on "
        f"{meta.get('lora_targets')} linear layers (targets {meta.get('targets')}), "
        f"{meta.get('trainable', 0):,} values"
    )
    typer.echo(
        f"base       {meta.get('base_model')} ({meta.get('base_quant')} during training), "
        f"weights sha256 {str(meta.get('base_weights_sha256'))[:16]}…"
    )


@app.command()
def methods() -> None:
    """List the fine-tuning methods, one line each, with their key options."""
    from lowmem_ft.registry import METHOD_SPECS

    width = max(len(name) for name in METHOD_SPECS)
    for name, spec in METHOD_SPECS.items():
        typer.echo(f"{name.ljust(width)}  {spec.summary}")
        options = (spec.flags() or "none beyond the common ones") + (f" ({spec.note})" if spec.note else "")
        typer.echo(f"{''.ljust(width)}  options: {options}")
    typer.echo(
        "\n`lowmem-ft run --help` lists every option; docs/methods.md explains the methods side by side."
    )


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


@app.command()
def jobs(
    root: Path = typer.Argument(
        Path("runs"), help="Directory holding job directories (or one job directory)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
) -> None:
    """List the jobs under ROOT with their status, progress and losses."""
    from lowmem_ft.jobs import list_jobs

    found = list_jobs(root)
    if as_json:
        typer.echo(json.dumps([j.to_json() for j in found], indent=2))
        return
    if not found:
        typer.echo(f"no jobs under {root}")
        return

    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    rows = [("JOB", "STATUS", "STEP", "CHECKPOINT", "LOSS", "EVAL LOSS", "METHOD", "MODEL", "UPDATED")]
    for j in found:
        step = f"{j.step}/{j.max_steps}" if j.max_steps else str(j.step)
        rows.append(
            (
                str(j.path),
                j.status,
                step,
                "-" if j.checkpoint_step is None else f"step {j.checkpoint_step}",
                num(j.loss),
                num(j.eval_loss),
                j.method,
                j.model,
                _age(time.time() - j.updated),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    for j in found:
        if j.status == "failed" and j.error:
            typer.echo(f"{j.path}: failed: {j.error}")
        elif j.status == "interrupted":
            typer.echo(f"{j.path}: interrupted; continue with `lowmem-ft resume {j.path}`")


def main(argv: list[str] | None = None) -> None:
    """Entry point: every error the user can fix is one line on stderr and a non-zero exit code."""
    from lowmem_ft.hardware import configure_cuda_allocator

    configure_cuda_allocator()  # before anything initialises CUDA: the allocator reads it once
    # SIGTERM (kill, a scheduler stopping us) is treated like Ctrl-C: the job records 'interrupted'.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        # Without standalone mode, typer returns (not raises) the code of `typer.Exit`.
        code = app(args=argv, standalone_mode=False)
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except typer.TyperException as exc:  # usage errors: unknown option, bad value, missing argument
        ctx = getattr(exc, "ctx", None)
        hint = f"; see '{ctx.command_path} --help'" if ctx is not None else ""
        typer.echo(f"error: {exc.format_message().rstrip('.')}{hint}", err=True)
        sys.exit(getattr(exc, "exit_code", 2))
    except Exception as exc:  # a bug or a failure during training: one line, details in error.log
        typer.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        typer.echo("the job directory's error.log has the traceback, if a job was created", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
