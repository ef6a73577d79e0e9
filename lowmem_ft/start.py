"""`lowmem-ft run`: a new job. The --out directory is claimed first, everything the user can get
wrong is checked (prepare.setup) before the job is written, then the recipe runs (train.execute).
resume.py is the other way in."""

from __future__ import annotations

import time
from datetime import date, datetime
from functools import partial
from pathlib import Path

from lowmem_ft.config import RunConfig
from lowmem_ft.console import print_header
from lowmem_ft.data.cache import DIRECTORY as KEPT_DATA
from lowmem_ft.distributed.group import ONE, Group
from lowmem_ft.distributed.ranks import Ranks
from lowmem_ft.errors import DiskError, disk_fault
from lowmem_ft.files import free_bytes, write_json_atomic
from lowmem_ft.job_lock import abandon_new_job, claim_new_job
from lowmem_ft.jobs import FollowerJob, Job, record_failure
from lowmem_ft.models import resolve_model
from lowmem_ft.precision import dtype_name
from lowmem_ft.prepare import setup
from lowmem_ft.train import execute


def default_out_dir(config: RunConfig, model_name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{model_name}-{config.method}-{stamp}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def run(config: RunConfig, show_progress: bool = True) -> Job | None:
    """A new job: plan, load, train, checkpoint, export. With --nproc N, this process starts N ranks
    (distributed/launch.py) that each come back here, as a rank, and returns None when they end."""
    ranks = Ranks.from_env()
    if config.chat_date is None:  # the job's first day: what chat templates write, on resume too
        config = config.replace(chat_date=date.today().isoformat())
    if config.nproc > 1 and not ranks.several:
        from lowmem_ft.distributed.launch import launch

        config.validate()  # one line for a mistake, before N ranks would each say it
        if config.out is None:  # chosen here: this process says, and records, how the job ended
            resolved = resolve_model(
                config.model, allow_download=config.allow_download, trust_remote_code=config.trust_remote_code
            )
            name = resolved.name
            config = config.replace(out=default_out_dir(config, name))
        payload = {"config": portable(config.to_json())}
        launch(
            "run",
            payload,
            config.nproc,
            show_progress,
            config.out,
            partial(record_failure, config.out, since=time.time()),
        )
        return None
    if ranks.several and config.nproc != ranks.size:  # started by torchrun: its count is the count
        config = config.replace(nproc=ranks.size)
    group = Group.join(config.resolved_device()) if ranks.several else ONE
    try:
        return _run(config, show_progress, group)
    finally:
        group.leave()


def _run(config: RunConfig, show_progress: bool, group: Group) -> Job:
    requested = portable(config.to_json())  # before the planner fills in what the user left open
    if not group.main:  # rank 0 creates the job; the others set up the same run and follow it
        s = setup(config, False, group)
        job = FollowerJob.open(Path(group.broadcast(None)))
        return execute(s, job, None, False)
    # --out is claimed first: of two runs given the same one, exactly one goes on.
    lock = claim_new_job(config.out) if config.out else None
    s = None
    try:
        s = setup(config, show_progress, group)  # raises UserError on bad input, before anything is written
        out_dir = config.out or default_out_dir(config, s.resolved.name)
        _check_disk_holds_a_checkpoint(s, out_dir)  # (several ranks: their shards' sum, on this disk)
        lock = lock or claim_new_job(out_dir)
        job = Job.create(
            out_dir,
            s.config.to_json(),
            lock=lock,
            requested=requested,
            compute_dtype=dtype_name(s.compute_dtype),
            device=s.device.type,
            max_steps=s.max_steps,
            model_source=s.resolved.source,
            hub_id=s.resolved.hub_id,
            data=s.data.summary(),
            **s.data.digests(config),
            trainable_parameters=s.method.trainable_count(),
        )
        if s.plan is not None:
            write_json_atomic(job.dir / "plan.json", s.plan.to_json())
        s.data.keep_in(job.dir)  # for resume: the data is not read and tokenised again
        print_header(s, job)
    except BaseException as exc:
        if s is not None:
            s.data.train.close()  # the records' background encoding ends with the run that needed it
        if lock is not None:
            abandon_new_job(lock, directories=(KEPT_DATA,))  # a job that never started leaves nothing behind
        if (reason := disk_fault(exc)) is not None:
            where = config.out or "runs/"
            raise DiskError(
                f"could not create the job in {where}: {reason}; nothing was left behind; free space "
                "or choose another --out"
            ) from None
        raise
    group.broadcast(str(job.dir))  # the other ranks follow this job
    return execute(s, job, None, show_progress)


def _check_disk_holds_a_checkpoint(s, out_dir: Path) -> None:
    """Refuse, before step 1, a job whose disk cannot hold one checkpoint: the weights it changes and
    the optimizer state of everything that trains (``Method.checkpoint_bytes``). Otherwise every step
    until the first checkpoint is trained for nothing, and `resume` trains them again."""
    from lowmem_ft.sizes import format_bytes

    least = s.method.checkpoint_bytes(s.model)
    free = free_bytes(out_dir)
    if free is not None and free < least:
        raise DiskError(
            f"{out_dir}: its disk has {format_bytes(free)} free and a checkpoint of this run holds at "
            f"least {format_bytes(least)} (the weights it changes and their optimizer state); free "
            "space or choose another --out"
        )


def portable(config_json: dict) -> dict:
    """The configuration with paths made absolute, so `resume` works from any directory."""
    out = dict(config_json)
    for key in ("data", "eval_data", "out"):
        if out.get(key):
            out[key] = str(Path(out[key]).resolve())
    if Path(out["model"]).exists():  # a local model directory, not an alias or hub id
        out["model"] = str(Path(out["model"]).resolve())
    return out
