"""A job's result or a model, put together in memory for generation (see the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lowmem_ft.errors import UserError
from lowmem_ft.files import read_json_object
from lowmem_ft.generate.options import GenerateOptions
from lowmem_ft.models import ResolvedModel, load_model, load_tokenizer, resolve_model


# -- loading --------------------------------------------------------------------------------------
@dataclass
class Loaded:
    """What ``load_weights`` put together: the model on the host, its tokenizer, and how."""

    model: torch.nn.Module
    tokenizer: object
    lines: list[tuple[str, str]]  # (label, text) for the user: what was loaded, and from where
    job_dir: Path | None = None  # the job it came from, if any


def load_weights(target: str, options: GenerateOptions, dtype: torch.dtype) -> Loaded:
    """A job's result (its model, or its base with the delta or adapter applied) or a model
    (alias, local directory, cached hub id), on the host in ``dtype``."""
    from lowmem_ft.results import ADAPTER_META

    path = Path(target).expanduser()
    job_dir = _job_of(path)
    if job_dir == path:
        if (path / "model" / "config.json").is_file():  # full, hift, bitfit, spafit
            return _load_model(str(path / "model"), options, dtype, job_dir)
        _refuse_unfinished(path)
        return _load_result(path, options, dtype, job_dir)
    if path.is_file() or (path / ADAPTER_META).is_file():  # a delta or an adapter, in a job or not
        return _load_result(path, options, dtype, job_dir)
    if path.is_dir() and not (path / "config.json").is_file():
        raise UserError(
            f"{target}: neither a lowmem-ft job (no job.json) nor a Hugging Face model directory "
            "(no config.json); `lowmem-ft jobs` lists the jobs under runs/"
        )
    if not path.exists() and len(path.parts) > 1 and path.parent.is_dir():
        # "runs/typo" would be taken for a hub id, but "runs" is a directory here: a path was meant.
        raise UserError(
            f"{target}: no such job or model directory; `lowmem-ft jobs` lists the jobs under runs/"
        )
    return _load_model(target, options, dtype, job_dir)


def _load_model(spec: str, options: GenerateOptions, dtype: torch.dtype, job_dir: Path | None) -> Loaded:
    if options.base is not None:  # (a whole model has no base to apply anything to)
        raise UserError(
            f"--base only applies to a sparse delta or a LoRA adapter, and {spec} is a whole model; "
            "leave --base out"
        )
    resolved = _resolve(spec, options)
    model = load_model(resolved, dtype, trust_remote_code=options.trust_remote_code)
    what = "the job's model, " if job_dir is not None else f"{resolved.source} model, "
    return Loaded(
        model,
        load_tokenizer(resolved, trust_remote_code=options.trust_remote_code),
        [("model", f"{spec} ({what}{_count(model)} parameters)")],
        job_dir,
    )


def _load_result(path: Path, options: GenerateOptions, dtype: torch.dtype, job_dir: Path | None) -> Loaded:
    from lowmem_ft.results import find_result

    kind, result = find_result(path)
    loaded = (_load_delta if kind == "delta" else _load_adapter)(result, options, dtype)
    loaded.job_dir = job_dir
    return loaded


def _job_of(path: Path) -> Path | None:
    """The job directory ``path`` is, or is a result of (its delta, adapter or model)."""
    for candidate in (path, path.parent) if path.exists() else ():
        if (candidate / "job.json").is_file():
            return candidate
    return None


def _refuse_unfinished(job_dir: Path) -> None:
    from lowmem_ft.delta import DELTA_FILE
    from lowmem_ft.results import ADAPTER_DIR

    if (job_dir / DELTA_FILE).is_file() or (job_dir / ADAPTER_DIR).is_dir():
        return
    from lowmem_ft.job_lock import being_run

    record = job_record(job_dir)
    status, step, steps = record.get("status", "?"), record.get("step", "?"), record.get("max_steps", "?")
    if status == "done":  # it had one: deleted or moved since (resume writes it again, or says why not)
        raise UserError(
            f"{job_dir} is done, but its result ({Path(record.get('output') or 'model').name}) is not "
            f"there; `lowmem-ft resume {job_dir}` writes it again from the job's last checkpoint"
        )
    when = being_run(job_dir) or f"`lowmem-ft resume {job_dir}` finishes it"
    raise UserError(
        f"{job_dir} has no result yet (status {status}, step {step} of {steps}); its model is written "
        f"when the job finishes: {when}"
    )


def job_record(job_dir: Path) -> dict:
    from lowmem_ft.files import read_json_object

    return read_json_object(job_dir / "job.json", "job record")


def _resolve(spec: str, options: GenerateOptions) -> ResolvedModel:
    return resolve_model(
        spec, allow_download=options.allow_download, trust_remote_code=options.trust_remote_code
    )


def _check_base(meta: dict, options: GenerateOptions, what: str) -> tuple[ResolvedModel, bool]:
    # export's check, so that generate and `export --merge` accept and refuse the same bases. It
    # reads every byte of the base (a 7B model: tens of seconds): applying a delta to another base
    # would give plausible-looking nonsense, which is worse than waiting.
    from lowmem_ft.export import check_base

    return check_base(meta, options.base, what, options.trust_remote_code)


def _load_delta(path: Path, options: GenerateOptions, dtype: torch.dtype) -> Loaded:
    from lowmem_ft.delta import merged_weight, read_delta

    delta = read_delta(path)
    resolved, trusted = _check_base(delta.meta, options, "delta")
    model = load_model(resolved, dtype, trust_remote_code=trusted)
    shapes = delta.meta.get("shapes", {})
    for name, (indices, values) in delta.entries.items():
        try:
            weight = model.get_parameter(name)
        except AttributeError:
            raise UserError(
                f"{resolved.spec} has no weight named {name}, which the delta {path} changes; "
                "is it the same architecture?"
            ) from None
        # As `export --merge`: base + Δ in fp32, then one rounding, one weight at a time (the extra
        # memory is one fp32 copy of the largest weight).
        with torch.no_grad():
            weight.copy_(merged_weight(name, weight, indices, values, shapes))
    return Loaded(
        model,
        load_tokenizer(resolved, trust_remote_code=trusted),
        [
            (
                "model",
                f"{resolved.spec} ({_count(model)} parameters) + the sparse delta {path} "
                f"({delta.count:,} entries in {len(delta.entries)} weights; base sha256 checked)",
            ),
            *_base_quant_note(delta.meta),
        ],
    )


def _load_adapter(path: Path, options: GenerateOptions, dtype: torch.dtype) -> Loaded:
    from lowmem_ft.models.loading import merge_lora_adapter
    from lowmem_ft.results import ADAPTER_META

    meta = read_json_object(path / ADAPTER_META, "LoRA adapter's lowmem-ft record")
    resolved, trusted = _check_base(meta, options, "adapter")
    # Merged, not kept beside the base: generation then runs at the base model's speed.
    model = merge_lora_adapter(load_model(resolved, dtype, trust_remote_code=trusted), path)
    return Loaded(
        model,
        load_tokenizer(resolved, trust_remote_code=trusted),
        [
            ("model", f"{resolved.spec} ({_count(model)} parameters) + the LoRA adapter {path}, merged"),
            *_base_quant_note(meta),
        ],
    )


def _base_quant_note(meta: dict) -> list[tuple[str, str]]:
    quant = meta.get("base_quant", "none")
    if quant == "none":
        return []
    article = "an" if quant in ("int8", "nf4") else "a"  # (said "an int8", "an en-ef-four")
    return [
        (
            "note",
            f"trained on {article} {quant} base; applied to the original weights, as `export --merge` does",
        )
    ]


def _count(model: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()):,}"
