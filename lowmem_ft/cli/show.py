"""`export`, `methods` and `jobs`: what a job left, what the tool offers, what has run."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import typer

from lowmem_ft.cli.examples import examples
from lowmem_ft.errors import UserError

EXPORT_EPILOG = examples(
    "lowmem-ft export runs/sift                              # what the delta holds",
    "lowmem-ft export runs/sift --merge --out merged/        # a full Hugging Face model",
    "lowmem-ft export runs/sift --merge --out merged/ --base /data/llama-2-7b --save-dtype bf16",
)


def export(
    job_dir: Path = typer.Argument(
        ...,
        metavar="JOB_DIR",
        help="Job directory of a sparse or LoRA run (or its delta.safetensors / adapter directory).",
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
    from lowmem_ft.results import describe_result, find_result

    job_dir, out = job_dir.expanduser(), out.expanduser() if out is not None else None  # (`--out=~/m`)
    if not merge:
        given = [flag for flag, value in (("--out", out), ("--base", base)) if value is not None]
        given += ["--save-dtype"] if save_dtype != "auto" else []
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise UserError(f"{', '.join(given)} only {verb} to --merge; add --merge")
        for label, text in describe_result(*find_result(job_dir)):
            typer.echo(f"{label:<10} {text}")
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


JOBS_EPILOG = examples(
    "lowmem-ft jobs                                        # the jobs under runs/",
    "lowmem-ft jobs runs/sift runs/lora --plot compare.png # their loss curves in one picture",
)


def jobs(
    roots: list[Path] | None = typer.Argument(
        None,
        metavar="ROOTS",
        help="Directories holding job directories, or job directories. [default: runs]",
        show_default=False,
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
    plot: Path | None = typer.Option(
        None, help="Also draw the jobs' evaluation and training losses against step to this .png file."
    ),
) -> None:
    """List the jobs under ROOTS with their status, progress and losses."""
    from lowmem_ft.jobs import list_jobs

    if plot is not None:
        from lowmem_ft import pictures

        pictures.check_destination(plot)
    for root in roots or []:  # (the default, runs/, may not exist yet: "no jobs under runs")
        if not root.is_dir():
            wrong = "not a directory" if root.exists() else "no such directory"
            raise UserError(f"{root}: {wrong}; give directories holding jobs, or job directories")
    roots = roots or [Path("runs")]
    listed = [list_jobs(root) for root in roots]
    unique = {j.path.resolve(): j for jobs, _ in listed for j in jobs}  # (a job given twice: once)
    found = sorted(unique.values(), key=lambda j: j.updated)
    for directory in (directory for _, damaged in listed for directory in damaged):  # (stderr: --json)
        typer.echo(
            f"warning    {directory} is left out: its job.json cannot be read as a job record "
            f"(`lowmem-ft resume {directory}` says what is wrong)",
            err=True,
        )
    root = " ".join(map(str, roots))
    if plot is not None:
        if not found:
            raise UserError(f"no jobs under {root} to draw")
        names = distinct_names([j.path.resolve() for j in found])
        pictures.draw_comparison(
            [(f"{name} ({j.method})", j.path) for name, j in zip(names, found, strict=True)], plot
        )
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
            again = "" if "lowmem-ft resume" in j.error else f"; `lowmem-ft resume {j.path}` continues it"
            typer.echo(f"{j.path}: failed: {j.error}{again}")
        elif j.status == "interrupted":
            typer.echo(f"{j.path}: interrupted; continue with `lowmem-ft resume {j.path}`")
    if plot is not None:
        typer.echo(f"plot       {plot} ({len(found)} job{'s' if len(found) > 1 else ''})")


def distinct_names(paths: list[Path]) -> list[str]:
    """What tells each of ``paths`` apart, for a legend: the part below their common directory
    (``exp1/sift`` and ``exp2/sift``, where the last part alone would say ``sift`` twice)."""
    if len(paths) == 1:
        return [paths[0].name]
    common = Path(os.path.commonpath(paths))
    return [str(p.relative_to(common)) if p != common else p.name for p in paths]
