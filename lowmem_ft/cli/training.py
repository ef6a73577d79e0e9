"""`run`, `resume` and `plan`: parse, call the library, print."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from lowmem_ft.cli.examples import examples
from lowmem_ft.cli.options import (
    PLAN_OPTIONS,
    QUIET,
    RUN_PARAMETERS,
    given,
    option,
    run_config_options,
    with_parameters,
)
from lowmem_ft.config import RunConfig
from lowmem_ft.errors import UserError

RUN_EPILOG = examples(
    "lowmem-ft run tiny examples/python-qa.jsonl                      # the embedded model, on CPU",
    "lowmem-ft run tiny examples/python-qa.jsonl --max-steps 20 --lr 1e-3 --out runs/try",
    "lowmem-ft run ./my-llama-dir data.jsonl --eval-data dev.jsonl --seq-len 1024",
    "lowmem-ft run llama-2-7b chat.jsonl --format chat --batch-size 32 --micro-batch-size 2 \\\n"
    "    --gradient-checkpointing",
    "lowmem-ft run tiny examples/python-qa.jsonl --method sift --sparsity 0.01 --lr 1e-3",
)


@with_parameters(
    {
        "model": (
            str,
            typer.Argument(
                ...,
                metavar="MODEL",
                help="Model alias (tiny, llama-2-7b, ...), local Hugging Face directory, or cached hub id.",
            ),
        ),
        "data": (
            Path,
            typer.Argument(
                ...,
                metavar="DATA",
                help="Training data: a .jsonl, .json or .parquet file, a directory of them, or a saved "
                "dataset (text, prompt-completion, alpaca, chat or sharegpt records; docs/data.md).",
            ),
        ),
        **run_config_options(RUN_PARAMETERS),
        "quiet": QUIET,
    }
)
def run(context: typer.Context, quiet: bool, **options) -> None:
    """Fine-tune MODEL on DATA and write a job directory with metrics, checkpoints and the result."""
    from lowmem_ft.start import run as run_training

    config = RunConfig.create(**given(context, options))
    if config.out is not None and (config.out / "job.json").exists():
        _offer_resume(config.out, config, quiet)
        return
    _training(lambda: run_training(config, show_progress=not quiet))


def _training(start) -> None:
    """Run a training entry point; Ctrl-C and SIGTERM end it with exit code 130."""
    from lowmem_ft.stop import RunInterrupted

    try:
        start()
    except RunInterrupted as exc:
        typer.echo(str(exc), err=True)
        raise UserError("", exit_code=130) from None  # (said: the command ends with nothing more)
    except KeyboardInterrupt:  # still setting up: no training state was written
        typer.echo("interrupted before training started; nothing was lost", err=True)
        raise UserError("", exit_code=130) from None


def _interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


def _offer_resume(out: Path, config, quiet: bool) -> None:
    """`run --out DIR` where DIR already holds a job: offer to resume it, never overwrite it."""
    from lowmem_ft.job_lock import being_run
    from lowmem_ft.jobs import read_job
    from lowmem_ft.resume import resume as resume_training
    from lowmem_ft.resume import settings_that_differ

    info = read_job(out)
    if info is None:
        raise UserError(f"--out {out} holds a job.json that cannot be read; choose a new --out")
    if info.status == "done":
        raise UserError(f"--out {out} holds a finished job; choose a new --out")
    if running := being_run(out):  # (its job.json says "running" too, and resume would be refused)
        raise UserError(f"--out {running}; or choose a new --out")
    where = f"{info.status} at step {info.step}/{info.max_steps}"
    if not _interactive():
        raise UserError(
            f"--out {out} holds an unfinished job ({where}); continue it with `lowmem-ft resume {out}`, "
            "or choose a new --out"
        )
    differ = settings_that_differ(out, config)  # said before the question: its answer depends on it
    if differ:
        typer.echo(f"note       the job keeps its own settings; this command's differ in {', '.join(differ)}")
    if not typer.confirm(f"{out} holds an unfinished job ({where}). Resume it?", default=True):
        raise UserError(f"--out {out} holds a job; choose a new --out")
    _training(lambda: resume_training(out, show_progress=not quiet))


RESUME_EPILOG = examples(
    "lowmem-ft resume runs/tiny-hift-20261122-101500",
    "lowmem-ft resume runs/big --gpu-mem 20GiB --micro-batch-size 2     # on a smaller GPU",
    after="The job continues from its newest checkpoint that verifies (or from step 0 if it has none), "
    "with its own settings, planned again for this machine.",
)


def resume(
    job_dir: Path = typer.Argument(..., metavar="JOB_DIR", help="The job directory to continue."),
    gpu_mem: str | None = option("gpu_mem"),
    cpu_mem: str | None = option("cpu_mem"),
    micro_batch_size: int | None = option("micro_batch_size"),
    save_every: int | None = option("save_every", None, "Checkpoint every N steps. [default: the job's]"),
    save_every_minutes: float | None = option(
        "save_every_minutes", None, "Checkpoint every M minutes. [default: the job's]"
    ),
    keep_checkpoints: int | None = option("keep_checkpoints", None, "Checkpoints kept. [default: the job's]"),
    max_bad_steps: int | None = option(
        "max_bad_steps", None, "NaN/Inf steps in a row before stopping. [default: the job's]"
    ),
    log: str | None = option("log", None, "Also log as csv, tensorboard or both. [default: the job's]"),
    nproc: int | None = option(
        "nproc",
        None,
        "Ranks to continue on; a job of several ranks resumes on any number. [default: the job's]",
    ),
    quiet: bool = QUIET[1],
) -> None:
    """Continue an interrupted or failed job from its last valid checkpoint."""
    from lowmem_ft.resume import resume as resume_training

    overrides = {
        "gpu_mem": gpu_mem, "cpu_mem": cpu_mem, "micro_batch_size": micro_batch_size,
        "save_every": save_every, "save_every_minutes": save_every_minutes,
        "keep_checkpoints": keep_checkpoints, "max_bad_steps": max_bad_steps, "log": log, "nproc": nproc,
    }  # fmt: skip
    _training(lambda: resume_training(job_dir.expanduser(), overrides, show_progress=not quiet))


PLAN_EPILOG = examples(
    "lowmem-ft plan llama-2-7b --method full --gpu-mem 24GiB             # does it fit a 24 GB card?",
    "lowmem-ft plan llama-2-7b --method hift --gpu-mem 8GiB --cpu-mem 64GiB",
    "lowmem-ft plan qwen2.5-7b --method sift --gpu-mem 16GiB --seq-len 2048 --json",
    "lowmem-ft plan llama-3-8b --method hift --gpu-mem 24GiB --plot plan.png   # draw it",
    after="Exit code 0 when the plan fits, 3 when it does not.",
)


@with_parameters(
    {
        "model": (
            str,
            typer.Argument(
                ...,
                metavar="MODEL",
                help="Model alias, local Hugging Face directory, or cached hub id (no weights needed).",
            ),
        ),
        **run_config_options(PLAN_OPTIONS[:3]),
        "gpu": (
            str | None,
            typer.Option(None, help="'none' plans a CPU-only run even where a GPU is present."),
        ),
        **run_config_options(PLAN_OPTIONS[3:]),
        "as_json": (
            bool,
            typer.Option(False, "--json", help="Print the plan as JSON (documented in docs/planner.md)."),
        ),
        "plot": (
            Path | None,
            typer.Option(
                None, help="Also draw the plan's memory, by component, against the budget, to this .png file."
            ),
        ),
    }
)
def plan(
    context: typer.Context, model: str, gpu: str | None, as_json: bool, plot: Path | None, **options
) -> None:
    """Plan a fine-tune for this machine (or one you describe) without loading any weights."""
    from lowmem_ft.planner import build_plan, planned_as_given, render_plan

    # The same options as `run`, checked by the same code (one message per mistake, either command)
    # and passed to the planner the way `run` passes them.
    config = RunConfig.create(model=model, data=Path("plan"), **given(context, options))
    config.validate(data_files=False, count_gpus=False)
    if plot is not None:
        from lowmem_ft import pictures

        pictures.check_destination(plot)  # before planning: a mistake in --plot costs nothing
    result = build_plan(
        model, gpu=gpu, gpu_mem=config.gpu_mem, dtype=config.dtype, **planned_as_given(config)
    )
    if as_json:
        typer.echo(json.dumps({"model": result.model_name, **result.plan.to_json()}, indent=2))
    else:
        typer.echo(render_plan(result.plan, result.model_name, result.budget.describe()))
    if plot is not None:
        pictures.draw_plan(result.plan.to_json(), result.model_name, plot)
        if not as_json:  # (the JSON on standard output stays JSON)
            typer.echo(f"plot       {plot}")
    raise typer.Exit(0 if result.plan.fits else 3)
