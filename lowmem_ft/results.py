"""What a finished job leaves besides its full model: the names of its result files, and finding them.

JOB/model/                 methods that train every weight they touch: a Hugging Face model
JOB/delta.safetensors      the sparse methods: the trained entries (lowmem_ft/delta.py)
JOB/adapter/               LoRA: peft's adapter files, and ADAPTER_META beside them
"""

from __future__ import annotations

import json
from pathlib import Path

from lowmem_ft.delta import DELTA_FILE
from lowmem_ft.errors import UserError
from lowmem_ft.files import read_json_object


def base_metadata(method: str, base, options, trust_remote_code: bool) -> dict:
    """What a delta or an adapter records about its base (``base``: models.ResolvedModel), so that
    `export --merge` and `generate` find it (from any directory) and refuse any other (the sha256 of
    its weights), running its own code where the run did. ``options``: the method's (its
    --base-quant and --targets)."""
    from lowmem_ft.models import weights_hash

    return {
        "method": method,
        "base_model": base.spec,
        "base_name": base.name,
        "base_hub_id": base.hub_id,
        "base_weights_dir": str(base.weights_dir),
        "base_weights_sha256": weights_hash(base.weights_dir),
        "base_trust_remote_code": trust_remote_code,
        "base_quant": options.base_quant or "none",
        "targets": options.targets,
    }


ADAPTER_DIR = "adapter"
ADAPTER_META = "lowmem_ft.json"  # beside peft's files: the base the adapter belongs to, and its hash


def describe_result(kind: str, path: Path) -> list[tuple[str, str]]:
    """What a delta or an adapter (``find_result``'s answer) holds, as (label, text) lines."""
    from lowmem_ft.sizes import format_bytes

    if kind == "delta":
        from lowmem_ft.delta import read_delta

        delta = read_delta(path)
        meta = delta.meta
        lines = [
            ("delta", f"{path} ({format_bytes(path.stat().st_size)})"),
            (
                "entries",
                f"{delta.count:,} in {len(delta.entries)} weights (--method {meta.get('method')}, "
                f"sparsity {meta.get('sparsity')}, targets {meta.get('targets')})",
            ),
        ]
    else:
        meta = json.loads((path / ADAPTER_META).read_text())
        peft_config = json.loads((path / "adapter_config.json").read_text())
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        lines = [
            ("adapter", f"{path} ({format_bytes(size)}; peft format: PeftModel.from_pretrained(base, DIR))"),
            (
                "lora",
                f"rank {peft_config.get('r')}, alpha {peft_config.get('lora_alpha')} on "
                f"{meta.get('lora_targets')} linear layers (targets {meta.get('targets')}), "
                f"{meta.get('trainable', 0):,} values",
            ),
        ]
    quant = meta.get("base_quant") or "none"
    trained_on = "not quantised in training" if quant == "none" else f"{quant} in training"
    digest = str(meta.get("base_weights_sha256"))[:16]
    return [*lines, ("base", f"{meta.get('base_model')} ({trained_on}), weights sha256 {digest}…")]


def find_result(job_dir: Path) -> tuple[str, Path]:
    """The mergeable result of a job: ("delta", its delta file) or ("adapter", its LoRA adapter
    directory); the job directory or the file/directory itself may be given."""
    if job_dir.is_file():
        if job_dir.suffix != ".safetensors":
            instead = "a job directory, its delta.safetensors or its adapter directory"
            if (job_dir.parent / "job.json").is_file():
                instead = f"the job directory {job_dir.parent}"
            raise UserError(f"{job_dir}: a file that is not a sparse delta (.safetensors); give {instead}")
        return "delta", job_dir
    if (job_dir / ADAPTER_META).is_file():
        return "adapter", job_dir
    if not job_dir.is_dir():
        raise UserError(f"{job_dir}: no such job directory")
    if (job_dir / DELTA_FILE).is_file():
        return "delta", job_dir / DELTA_FILE
    if (job_dir / ADAPTER_DIR / ADAPTER_META).is_file():
        return "adapter", job_dir / ADAPTER_DIR
    job_file = job_dir / "job.json"
    if not job_file.is_file():
        raise UserError(f"{job_dir}: not a lowmem-ft job directory (no job.json)")
    record = read_json_object(job_file, "job record")
    config = record.get("config")
    method = config.get("method", "?") if isinstance(config, dict) else "?"
    if (job_dir / "model").is_dir():
        raise UserError(
            f"{job_dir} was trained with --method {method}; its full model is already in {job_dir / 'model'}"
        )
    status = record.get("status", "?")
    resume = f"; `lowmem-ft resume {job_dir}` continues it" if status in ("interrupted", "failed") else ""
    raise UserError(
        f"{job_dir} has no result yet (status: {status}); it is written when the job finishes{resume}"
    )
