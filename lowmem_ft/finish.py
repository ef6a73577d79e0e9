"""The end of a run: the method's result written to the job directory (safely, on a disk that may
be full; with several ranks, rank 0 writes) and the lines that say how training went."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from lowmem_ft.distributed.sharded import is_sharded
from lowmem_ft.errors import DiskError, disk_fault
from lowmem_ft.files import free_bytes
from lowmem_ft.jobs import Job
from lowmem_ft.models.saving import save_hf_model
from lowmem_ft.prepare import Setup
from lowmem_ft.sizes import format_bytes
from lowmem_ft.train_state import Progress

log = logging.getLogger(__name__)  # the CLI shows it (cli.report_to_console)


def export_result(s: Setup, job: Job, save_dtype: torch.dtype) -> Path:
    """The method's result in the job directory. On a disk that cannot take it: refused before
    writing when it clearly will not fit, else what was written is removed; either way one line
    saying what is intact and how to finish (`resume` exports again). With several ranks rank 0
    writes, and tells the others what became of it: every rank then ends the same way."""
    needed = s.model_params * save_dtype.itemsize if s.method.exports_full_model else 0
    free = free_bytes(job.dir)
    before = set(job.dir.iterdir())

    def refused(reason: str) -> DiskError:
        last = job.record.get("last_checkpoint")
        intact = f"checkpoint {Path(last['dir']).name} is intact" if last else "no checkpoint was written"
        return DiskError(
            f"could not write the result to {job.dir}: {reason}; training is finished and its "
            f"{intact}; free space and run `lowmem-ft resume {job.dir}` to write it"
        )

    if free is not None and needed > free:
        raise refused(f"it needs {format_bytes(needed)} and {format_bytes(free)} is free")
    gathered = gather_full_weights(s) if s.group.several and is_sharded(s.model) else None
    outcome = None  # rank 0's: ("written", path) or ("refused", why)
    if s.group.main:
        try:
            if gathered is not None:
                written = save_hf_model(
                    s.model, s.tokenizer, job.dir / "model", save_dtype, s.resolved.weights_dir, gathered
                )
            else:
                written = s.method.export(s.model, s.tokenizer, job.dir, save_dtype, s.resolved)
            outcome = ("written", str(written))
        except Exception as exc:
            reason = disk_fault(exc)
            if reason is None:
                raise
            for path in set(job.dir.iterdir()) - before:  # the half-written result, only ours
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            outcome = ("refused", reason)
    what, detail = s.group.broadcast(outcome)
    if what == "refused":
        raise refused(detail) from None
    return Path(detail)


def gather_full_weights(s: Setup) -> dict[str, torch.Tensor]:
    """A sharded model's full weights, gathered to rank 0 (every rank takes part), one tensor at a
    time into host memory."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(s.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # Gathered, tied weights (a head tied to the embedding) are two copies: keep the first name
    # of each, as the model's own state dict saves them.
    first: dict[int, str] = {}
    for name, param in s.model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(param), name) != name:
            full.pop(name, None)
    return full


def report_how_it_went(s: Setup, job: Job, progress: Progress, final_eval: float | None, out: Path) -> None:
    """The run's last lines: how the evaluation loss moved, the steps skipped, where the result is."""
    first_eval = progress.eval_loss_start
    if final_eval is not None and first_eval is not None:
        change = 100 * (final_eval - first_eval) / first_eval
        log.info(f"eval loss  {first_eval:.4f} → {final_eval:.4f} ({change:+.1f}%)")
    if skipped := progress.skipped_steps:
        log.info(f"skipped    {len(skipped)} step{'s' * (len(skipped) > 1)} with a NaN/Inf loss: {skipped}")
    if not s.method.exports_full_model:  # a delta or an adapter: small, merged into a full model on request
        size = out.stat().st_size if out.is_file() else sum(f.stat().st_size for f in out.iterdir())
        log.info(f"saved      {out} ({format_bytes(size)})")
        log.info(f"           a full model: lowmem-ft export {job.dir} --merge --out DIR")
    else:
        log.info(f"saved      {out}")
