"""What a checkpoint of a run holds (capture / restore: weights, method state, data position,
scaler, random numbers, metrics length) and when one is taken (Checkpoints). Only finite state is
written: a checkpoint is where a stopped run is told to go back to."""

from __future__ import annotations

import contextlib
import logging
import random
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lowmem_ft.checkpoint import (
    SHARDS,
    Restored,
    checkpoint_name,
    checkpoints_dir,
    partial_dir,
    save_checkpoint,
    state_bytes,
    verify_checkpoint,
)
from lowmem_ft.distributed.sharded import is_sharded
from lowmem_ft.errors import UserError
from lowmem_ft.jobs import Job
from lowmem_ft.phases import phase

if TYPE_CHECKING:
    from lowmem_ft.prepare import Setup

log = logging.getLogger(__name__)  # the CLI shows it (cli.report_to_console)


@dataclass
class Progress:
    """What the loop carries from one step to the next; every checkpoint saves it."""

    step: int = 0  # optimizer steps done
    bad_in_a_row: int = 0  # NaN/Inf steps since the last good one
    skipped_steps: list[int] = field(default_factory=list)
    last_loss: float | None = None
    eval_loss_start: float | None = None
    eval_loss: float | None = None


class Checkpoints:
    """When to save (every --save-every steps, every --save-every-minutes, at the end, on a stop
    request) and what: everything `restore` needs to continue exactly."""

    def __init__(self, s: Setup, job: Job, scaler: torch.amp.GradScaler, on_save=lambda: None):
        self.s, self.job, self.scaler = s, job, scaler
        self.on_save = on_save  # after each checkpoint (the recipe may redraw loss.png)
        self.last_time = time.monotonic()
        self.saved_step: int | None = None

    def due(self, step: int) -> bool:
        c = self.s.config
        by_steps = c.save_every > 0 and step % c.save_every == 0
        by_time = c.save_every_minutes > 0 and time.monotonic() - self.last_time >= 60 * c.save_every_minutes
        return by_steps or by_time

    def save(self, progress: Progress) -> Path | None:
        if self.saved_step == progress.step:
            return None
        s, group = self.s, self.s.group
        with phase("checkpoint"):
            state = capture(s, progress, self.scaler, self.job)
            # Only finite weights and state make a good checkpoint: one holding NaN/Inf would be
            # named as the place to go back to, and retention would delete the good ones.
            bad = first_non_finite({"weights": state["weights"], "method": state["method"]})
            if group.several and group.any(bad is not None):  # each rank checked its part: all stop
                bad = bad or "another rank's part of the state"
            if bad is not None:
                last = self.job.record.get("last_checkpoint")
                raise UserError(
                    f"after step {progress.step} {bad} holds NaN/Inf values, so no checkpoint was written; "
                    "stopped. "
                    + (f"The last good checkpoint is {last['dir']}. " if last else "")
                    + "Try a lower --lr or --grad-clip, or check the data"
                )
            path = self._write(progress.step, state)
            del state
        self.job.update(
            last_checkpoint={
                "step": progress.step,
                "dir": str(path.relative_to(self.job.dir)),
                "time": time.time(),
            }
        )
        self.last_time, self.saved_step = time.monotonic(), progress.step
        self.on_save()
        return path

    def _write(self, step: int, state: dict) -> Path:
        """One process: the state, as it is. Several ranks: rank 0 writes the checkpoint; a sharded
        model's weights and optimizer state go into it from every rank, through
        torch.distributed.checkpoint, before rank 0 writes the manifest and renames it."""
        s, group, keep = self.s, self.s.group, self.s.config.keep_checkpoints
        if not group.several:
            return save_checkpoint(self.job.dir, step, state, keep)
        final = checkpoints_dir(self.job.dir) / checkpoint_name(step)
        if group.broadcast(group.main and final.is_dir() and verify_checkpoint(final) is None):
            return final  # the same step's state, already safely on disk (after a resume)
        write_shards, shard_bytes = None, 0
        if is_sharded(s.model):
            import torch.distributed.checkpoint as dcp

            state.pop("weights")
            state["method"], sharded = s.method.sharded_state(s.model)
            shard_bytes = state_bytes(sharded)  # (it said only rank 0's small state when a disk filled)

            def write_shards(directory: Path) -> None:
                group.barrier()  # rank 0 has made the (empty) checkpoint directory
                with what_dcp_caught():
                    dcp.save(sharded, checkpoint_id=directory)

        if group.main:
            path = save_checkpoint(self.job.dir, step, state, keep, write_shards, shard_bytes)
        else:
            if write_shards is not None:
                write_shards(partial_dir(self.job.dir, step) / SHARDS)
            path = final
        group.barrier()  # rank 0 has written the manifest: the checkpoint is complete
        return path


@contextlib.contextmanager
def what_dcp_caught() -> Iterator[None]:
    """torch.distributed.checkpoint wraps what a rank raised while it wrote or read its shards (a
    second Ctrl-C's KeyboardInterrupt, a full disk's OSError) in a CheckpointException, a
    BaseException that the recipe's handlers (train.execute) do not know: the command ended in
    tracebacks and left the job "running". The exception itself is raised instead, a
    KeyboardInterrupt before any other, as one process would raise it."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as exc:
        raised = [failure for failure, _ in exc.failures.values()]
        if not raised:
            raise
        interrupt = next((e for e in raised if isinstance(e, KeyboardInterrupt)), None)
        raise (interrupt or raised[0]) from exc


def first_non_finite(tree, name: str = "") -> str | None:
    """The name of the first floating-point tensor in ``tree`` with a NaN or Inf, else None. One
    reduction a tensor: its smallest and largest value are NaN where any value is, and -Inf or Inf
    where one is. (A mask of every value, as isfinite makes, would be the size of a 525M-entry head,
    and made and read a chunk at a time it took four times as long.)"""
    if isinstance(tree, torch.Tensor):
        tree = tree.to_local() if hasattr(tree, "to_local") else tree  # a rank's shard of a DTensor
        if tree.is_floating_point() and tree.numel():
            low, high = torch.aminmax(tree.detach())
            if not bool(torch.isfinite(low) & torch.isfinite(high)):
                return name or "a tensor"
        return None
    if isinstance(tree, dict):
        items = tree.items()
    else:
        items = enumerate(tree) if isinstance(tree, list | tuple) else ()
    for key, value in items:
        if (found := first_non_finite(value, f"{name}.{key}" if name else str(key))) is not None:
            return found
    return None


def capture(s: Setup, progress: Progress, scaler: torch.amp.GradScaler, job: Job) -> dict:
    """The whole training state at the end of optimizer step ``progress.step``."""
    return {
        "progress": asdict(progress),
        "weights": s.method.changed_weights(s.model),
        "method": s.method.state_dict(),
        "data": s.batcher.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": {
            "python": random.getstate(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        "metrics_bytes": job.metrics_bytes(),
    }


def restore(s: Setup, scaler: torch.amp.GradScaler, job: Job, restored: Restored) -> Progress:
    """Put a captured state back into a freshly set-up run; the next step is as if never stopped."""
    state = restored.state
    if "weights" in state:
        if is_sharded(s.model):
            raise UserError(
                f"{restored.path} was written by one process, and only one can resume from it; "
                "resume with --nproc 1 (a checkpoint of several ranks resumes on any number)"
            )
        params, weights = dict(s.model.named_parameters()), state["weights"]
        with torch.no_grad():
            for name in list(weights):
                params[name].copy_(weights.pop(name))  # popped: the host copy goes as soon as it is used
        s.method.load_state_dict(state["method"])
    else:  # a sharded model's: each rank reads its part (any number of ranks: DCP reshards)
        import torch.distributed.checkpoint as dcp

        directory = restored.path / SHARDS

        def read(tree: dict) -> None:
            with warnings.catch_warnings():  # one process reading a sharded checkpoint is what we ask
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                with what_dcp_caught():
                    dcp.load(tree, checkpoint_id=directory)

        s.method.load_sharded_state(s.model, state.get("method", {}), read)
    s.batcher.load_state_dict(state["data"])
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    # the steps after the checkpoint are logged again
    if s.group.main and (warning := job.truncate_metrics(state["metrics_bytes"])):
        log.warning(f"warning    {warning}")
    return Progress(**state["progress"])
