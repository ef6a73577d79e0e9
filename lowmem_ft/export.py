"""Writing results in formats other tools load: Hugging Face model directories (safetensors)."""

from __future__ import annotations

from pathlib import Path

import torch

from lowmem_ft.errors import UserError
from lowmem_ft.models.loading import quiet_transformers


def save_hf_model(model: torch.nn.Module, tokenizer, out_dir: Path, save_dtype: torch.dtype) -> Path:
    """Save ``model`` and ``tokenizer`` so ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads them.

    Tensors are cast one at a time into the state dict that is written, so the peak extra memory
    is one copy of the model in ``save_dtype``, not a second model object.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().to("cpu", save_dtype) for name, t in model.state_dict().items()}
    model.config.dtype = save_dtype
    with quiet_transformers():  # no per-shard progress bar in the middle of our output
        model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def find_delta(job_dir: Path) -> Path:
    """The delta of a job directory (or a delta file given directly), with a clear error if none."""
    import json

    from lowmem_ft.delta import DELTA_FILE

    if job_dir.is_file():
        return job_dir
    if not job_dir.is_dir():
        raise UserError(f"{job_dir}: no such job directory")
    delta = job_dir / DELTA_FILE
    if delta.is_file():
        return delta
    job_file = job_dir / "job.json"
    if not job_file.is_file():
        raise UserError(f"{job_dir}: not a lowmem-ft job directory (no job.json)")
    record = json.loads(job_file.read_text())
    method = record.get("config", {}).get("method", "?")
    if (job_dir / "model").is_dir():
        raise UserError(
            f"{job_dir} was trained with --method {method}; its full model is already in {job_dir / 'model'}"
        )
    raise UserError(
        f"{job_dir} has no delta yet (status: {record.get('status', '?')}); "
        "it is written when the job finishes"
    )


def merge_delta(
    job_dir: Path, out: Path, base: str | None = None, save_dtype: str = "auto"
) -> tuple[Path, dict]:
    """Merge a job's sparse increment into its base model: ``out`` is a Hugging Face model directory.

    The base is the model the job was trained from (or ``base``), and must be byte-identical to
    it: the delta records the sha256 of the base's weights and a mismatch is refused.
    """
    from lowmem_ft.config import DTYPES
    from lowmem_ft.delta import merge_into_files, read_delta
    from lowmem_ft.models import resolve_model, weights_hash

    delta = read_delta(find_delta(job_dir))
    if save_dtype != "auto" and save_dtype not in DTYPES:
        raise UserError(f"--save-dtype must be auto, fp32, bf16 or fp16, got {save_dtype!r}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not empty; choose a new directory or remove it")
    spec = base or delta.meta.get("base_model")
    if not spec:
        raise UserError("the delta does not name its base model; give it with --base")
    resolved = resolve_model(spec)
    expected = delta.meta.get("base_weights_sha256")
    found = weights_hash(resolved.weights_dir)
    if expected != found:
        raise UserError(
            f"{spec} ({resolved.weights_dir}) is not the base this delta was trained from: its weights "
            f"hash to {found[:12]}…, the delta expects {str(expected)[:12]}…; pass the original with --base"
        )
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        import shutil

        shutil.rmtree(partial)
    merge_into_files(delta, resolved.weights_dir, partial, DTYPES.get(save_dtype))
    if out.exists():
        out.rmdir()  # checked empty above
    partial.rename(out)  # a half-merged directory never carries the final name
    return out, delta.meta
