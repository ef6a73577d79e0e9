"""Writing results in formats other tools load: Hugging Face model directories (safetensors)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from lowmem_ft.errors import DiskError, UserError, disk_fault
from lowmem_ft.files import check_can_create, free_bytes, read_json_object
from lowmem_ft.models.saving import model_dtype_on_disk, save_hf_model
from lowmem_ft.results import ADAPTER_META, find_result
from lowmem_ft.sizes import format_bytes


def check_base(meta: dict, given: str | None, what: str, trust_remote_code: bool = False):
    """The base model to merge into (``given`` with --base, else the one ``meta`` names), refused
    unless its weights hash as the ones trained on; and whether its code may run (the run was
    allowed to, or ``trust_remote_code``). Returns both.

    Without --base, the base is also looked for where the run found it (``base_weights_dir``): a
    local base named by a relative path (``run my-model ...``) names nothing, or another model, when
    export or generate runs in another directory."""
    from lowmem_ft.models import resolve_model, weights_hash

    expected = meta.get("base_weights_sha256")
    trusted = trust_remote_code or bool(meta.get("base_trust_remote_code"))
    named = given or meta.get("base_model")
    if not named:
        raise UserError(f"the {what} does not name its base model; give it with --base")
    recorded = None if given else meta.get("base_weights_dir")
    candidates = [named] + ([recorded] if recorded and Path(recorded).is_dir() else [])
    refusal = None
    for spec in candidates:
        try:
            resolved = resolve_model(spec, trust_remote_code=trusted)
        except UserError as exc:
            if given:
                refusal = refusal or exc
            else:  # the base the job recorded is gone (moved, deleted): say which, and the way out
                where = f" ({meta['base_weights_dir']})" if meta.get("base_weights_dir") else ""
                refusal = refusal or UserError(
                    f"the {what}'s base model {named}{where} cannot be found ({exc}); if it was moved, "
                    "give it with --base DIR (its weights must be the ones trained on)"
                )
            continue
        found = weights_hash(resolved.weights_dir)
        if found == expected:
            return resolved, trusted
        refusal = refusal or UserError(
            f"{spec} ({resolved.weights_dir}) is not the base this {what} was trained from: its weights "
            f"hash to {found[:12]}…, the {what} expects {str(expected)[:12]}…; pass the original with --base"
        )
    raise refusal


# Written into each merge's own temporary directory: only directories holding it are ever removed.
_PARTIAL_MARK = ".lowmem-ft-partial"


def _check_out(out: Path, save_dtype: str) -> None:
    from lowmem_ft.choices import precision_problem

    if (problem := precision_problem("--save-dtype", save_dtype)) is not None:
        raise UserError(problem)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "is not empty" if out.is_dir() else "is a file"
        raise UserError(f"--out {out} already exists and {what}; choose a new directory or remove it")
    check_can_create(out, "--out")  # before the merge, which may take minutes


@contextlib.contextmanager
def _writing_merged(out: Path, needed: int) -> Iterator[Path]:
    """A temporary directory of this merge's own (a unique name beside ``out``, marked as ours) to
    write into; renamed to ``out`` when the merge is complete, removed if it is not. A directory the
    user has, even one named like ``out.partial``, is never touched."""
    free = free_bytes(out.parent)
    if free is not None and needed > free:
        raise DiskError(
            f"could not write the merged model to {out}: it needs about {format_bytes(needed)} and "
            f"{format_bytes(free)} is free; nothing was written; free space or choose another --out"
        )
    _remove_abandoned_merges(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        (partial / _PARTIAL_MARK).write_text(str(os.getpid()))
    except OSError as exc:  # --out was checked; only a disk fault or a race lands here
        fault = disk_fault(exc)
        raise (DiskError if fault else UserError)(
            f"could not write the merged model to {out}: {fault or exc.strerror or exc}"
        ) from None
    try:
        yield partial
        (partial / _PARTIAL_MARK).unlink()
        if out.exists():
            out.rmdir()  # checked empty before
        partial.rename(out)  # a half-merged directory never carries the final name
    except BaseException as exc:
        shutil.rmtree(partial, ignore_errors=True)
        reason = disk_fault(exc)
        if reason is None:
            raise
        raise DiskError(
            f"could not write the merged model to {out}: {reason} (it needs about {format_bytes(needed)}); "
            "nothing was written and the job's result is intact; free space and run the same command again"
        ) from None


def _remove_abandoned_merges(out: Path) -> None:
    """Temporary directories that merges into ``out`` left when killed: ours (marked) and dead."""
    import psutil

    for path in out.parent.glob(f".{out.name}.partial-*"):
        try:
            pid = int((path / _PARTIAL_MARK).read_text())
        except (OSError, ValueError):
            continue  # not marked as ours: not ours to delete
        if not psutil.pid_exists(pid) or pid == os.getpid():
            shutil.rmtree(path, ignore_errors=True)


def _merged_bytes(resolved, save_dtype: torch.dtype | None) -> int:
    """The merged model's size on disk: the base's weights, in the precision they are saved in."""
    on_disk = sum(f.stat().st_size for f in resolved.weights_dir.glob("*.safetensors"))
    if save_dtype is None:
        return on_disk
    return on_disk * save_dtype.itemsize // model_dtype_on_disk(resolved).itemsize


def merge_result(
    job_dir: Path, out: Path, base: str | None = None, save_dtype: str = "auto"
) -> tuple[Path, dict]:
    """Merge a job's sparse increment or LoRA adapter into its base model: ``out`` is a Hugging Face
    model directory. The base is the model the job was trained from (or ``base``), and must be
    byte-identical to it: the result records the sha256 of the base's weights."""
    kind, path = find_result(job_dir)
    return (merge_delta if kind == "delta" else merge_adapter)(path, out, base, save_dtype)


def merge_delta(path: Path, out: Path, base: str | None, save_dtype: str) -> tuple[Path, dict]:
    from lowmem_ft.delta import merge_into_files, read_delta
    from lowmem_ft.precision import DTYPES

    delta = read_delta(path)
    _check_out(out, save_dtype)
    resolved, _ = check_base(delta.meta, base, "delta")  # (merged file by file: no model code runs)
    with _writing_merged(out, _merged_bytes(resolved, DTYPES.get(save_dtype))) as partial:
        merge_into_files(delta, resolved.weights_dir, partial, DTYPES.get(save_dtype))
    return out, delta.meta


def merge_adapter(path: Path, out: Path, base: str | None, save_dtype: str) -> tuple[Path, dict]:
    """peft's merge: the base loaded in the precision it is saved in, W += (α/r)·BA in fp32 and
    rounded once. A QLoRA adapter is merged into the original weights, not the NF4 ones."""

    from lowmem_ft.models import load_model, load_tokenizer
    from lowmem_ft.models.loading import merge_lora_adapter
    from lowmem_ft.precision import DTYPES

    meta = read_json_object(path / ADAPTER_META, "LoRA adapter's lowmem-ft record")
    _check_out(out, save_dtype)
    resolved, trusted = check_base(meta, base, "adapter")
    dtype = DTYPES.get(save_dtype) or model_dtype_on_disk(resolved)
    merged = merge_lora_adapter(load_model(resolved, dtype, trust_remote_code=trusted), path)
    with _writing_merged(out, _merged_bytes(resolved, DTYPES.get(save_dtype))) as partial:
        save_hf_model(
            merged, load_tokenizer(resolved, trust_remote_code=trusted), partial, dtype, resolved.weights_dir
        )
    return out, meta
