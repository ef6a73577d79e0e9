"""`lowmem-ft resume`: continue a job from its newest valid checkpoint, as if it had never stopped.

The job's own settings are used, the method's included (even those the planner chose for the
first machine: they are part of the result); only how a step is cut into micro-batches and
whether activations are recomputed are planned again for this machine. What a checkpoint holds
and how it is put back is train_state.capture / train_state.restore; the format is checkpoint.py.
"""

from __future__ import annotations

import json
import logging
import os
import time
from functools import partial
from pathlib import Path

from lowmem_ft.checkpoint import SHARDS, Restored, latest_checkpoint, list_checkpoints, remove_partial
from lowmem_ft.config import RunConfig
from lowmem_ft.console import print_header
from lowmem_ft.data.cache import DIRECTORY as KEPT_DATA
from lowmem_ft.devices import device_problem
from lowmem_ft.distributed.group import ONE, Group
from lowmem_ft.distributed.ranks import SHARDED_METHODS, Ranks
from lowmem_ft.errors import UserError
from lowmem_ft.files import write_json_atomic
from lowmem_ft.jobs import FollowerJob, Job, record_failure
from lowmem_ft.prepare import Setup, setup
from lowmem_ft.registry import kept_on_resume
from lowmem_ft.run_data import data_digests
from lowmem_ft.train import execute

log = logging.getLogger(__name__)  # the CLI shows it (cli.report_to_console)


def resume(job_dir: Path, overrides: dict | None = None, show_progress: bool = True) -> Job | None:
    """Continue a job from its newest valid checkpoint (or from step 0 if it has none), planned
    again for this machine. ``overrides``: options that do not change the result (memory budgets,
    micro-batch, checkpoint policy, the number of ranks). A job of several ranks starts them
    (distributed/launch.py), each of which comes back here, and returns None when they end."""
    overrides = overrides or {}
    ranks = Ranks.from_env()
    if not ranks.several:
        record = Job.open(job_dir).record
        nproc = overrides.get("nproc") or record["config"].get("nproc", 1)
        if nproc > 1:
            from lowmem_ft.distributed.launch import launch

            _refuse_done(job_dir, record)
            _refuse_one_process_checkpoint(job_dir, record["config"]["method"])
            payload = {"job": str(job_dir.resolve()), "overrides": overrides}
            launch(
                "resume",
                payload,
                nproc,
                show_progress,
                job_dir,
                partial(record_failure, job_dir, since=time.time()),
            )
            return None
    group = ONE
    if ranks.several:
        group = Group.join(
            RunConfig.from_json(Job.open(job_dir).record["config"], job_dir / "job.json").resolved_device()
        )
    try:
        return _resume(job_dir, overrides, show_progress, group)
    finally:
        group.leave()


def _result_in(job_dir: Path, record: dict) -> Path | None:
    """Where the job's result is now: a run writes it in the job directory, which may have been
    moved or copied since (job.json holds the path it was written to)."""
    return job_dir / Path(record["output"]).name if record.get("output") else None


def _refuse_done(job_dir: Path, record: dict) -> None:
    """A finished job is not trained again. Its result, if gone since (deleted, or lost with a disk),
    is written again from the checkpoint of its last step, which resume continues from as from any."""
    if record.get("status") != "done":
        return
    result = _result_in(job_dir, record)
    if result is None or result.exists():
        raise UserError(
            f"{job_dir} is done (step {record.get('step')}/{record.get('max_steps')}); "
            f"its result is {result}; there is nothing to resume"
        )
    if not list_checkpoints(job_dir):
        raise UserError(
            f"{job_dir} is done, but its result {result} is gone and no checkpoint is left to write it "
            "from; start the job again with `lowmem-ft run`"
        )


def _refuse_one_process_checkpoint(job_dir: Path, method: str) -> None:
    """Before any rank starts: ranks that shard the model (full, hift) cannot read one process's
    checkpoint, whose weights are whole (train_state.restore says so too, but in the ranks, after
    the job has been taken)."""
    checkpoints = list_checkpoints(job_dir)
    newest = checkpoints[0] if checkpoints else None  # (what resume continues from, if it verifies)
    if method in SHARDED_METHODS and newest is not None and not (newest / SHARDS).is_dir():
        raise UserError(
            f"{newest} was written by one process, and only one can resume from it; resume "
            f"with --nproc 1 (a checkpoint of several ranks resumes on any number)"
        )


def _resume(job_dir: Path, overrides: dict, show_progress: bool, group: Group) -> Job:
    if not group.main:  # rank 0 checks and takes the job; the others follow it
        group.barrier()
        job = FollowerJob.open(job_dir)
        s, restored = _prepare_resume(job, overrides, False, group)
        return execute(s, job, restored, False)
    job = Job.open(job_dir)
    record = job.record
    _refuse_done(job_dir, record)
    result_gone = record.get("status") == "done"  # (and a checkpoint to write it from: _refuse_done)
    job.lock.acquire()  # refuses a job that a live process is running
    try:
        remove_partial(job.dir)  # (before the other ranks look for checkpoints)
        group.barrier()
        s, restored = _prepare_resume(job, overrides, show_progress, group)
    except BaseException:
        job.lock.release()
        raise
    print_header(s, job)
    if result_gone:
        log.info(f"result     {_result_in(job_dir, record)} is gone: written again from the last checkpoint")
    if restored is None:
        log.info("resume     no valid checkpoint: starting over from step 0 with the job's settings")
    else:
        log.info(f"resume     from {restored.path.name} (step {restored.step}/{s.max_steps})")
    return execute(s, job, restored, show_progress)


def micro_batch_on_resume(requested: RunConfig, record: dict, nproc: int) -> int | None:
    """The micro-batch a resumed job asks for: the one its user gave, or None (the planner chooses).
    After an out-of-memory retry, at most the one that fitted: a bound the job learned, not a
    request, so on more ranks each one's share of the batch bounds it too."""
    micro_batch_size = requested.micro_batch_size
    if record.get("micro_batch_size_after_oom"):  # this job ran out of memory with a larger one
        share = max(1, requested.batch_size // max(1, nproc))
        smaller = min(record["micro_batch_size_after_oom"], share)
        micro_batch_size = min(micro_batch_size or smaller, smaller)
    return micro_batch_size


def checkpointing_on_resume(requested: RunConfig, record: dict) -> bool | None:
    """Activation checkpointing for a resumed job: the user's choice, or None (the planner chooses).
    After an out-of-memory retry, on if the job ran with it: the micro-batch it learned fitted with
    checkpointing, and the planner, given that micro-batch as fixed, would drop it where its
    estimate says the micro-batch fits so (the estimate that just ran out)."""
    if requested.gradient_checkpointing is not None:
        return requested.gradient_checkpointing
    if record.get("micro_batch_size_after_oom") and record.get("config", {}).get("gradient_checkpointing"):
        return True
    return None


def _prepare_resume(
    job: Job, overrides: dict, show_progress: bool = False, group: Group = ONE
) -> tuple[Setup, Restored | None]:
    record = job.record
    if job.lock.stale_holder:
        log.info(f"lock       taken over from process {job.lock.stale_holder.get('pid')}, which is gone")
    requested = RunConfig.from_json(record.get("requested") or record["config"], job.dir / "job.json")
    try:  # (what this machine has, and the data files, are checked once the overrides are in)
        requested.validate(data_files=False, count_gpus=False, device=False)
    except UserError as error:  # its advice names options that resume does not take
        raise UserError(
            f"this job was started with settings this lowmem-ft refuses: {error}; resume keeps a job's "
            "settings, so start a new job with `lowmem-ft run`"
        ) from None
    if (problem := device_problem(requested.device)) is not None:  # (its advice: a --device to give)
        raise UserError(
            f"{problem.split('; ')[0]} (this job was started with it, and resume keeps a job's device); "
            "resume it on a machine that has it"
        )
    # What the method trains and how is part of the result, so the job's choices are kept, even
    # those the planner made for the first machine; so is the precision (HiFT keeps bf16 weights
    # on a GPU). Only how a step is cut into micro-batches and whether activations are recomputed
    # are planned again.
    planned = record["config"]
    RunConfig.from_json(planned, job.dir / "job.json")  # (its values' types checked, as the request's)
    kept = {key: planned.get(key) for key in kept_on_resume(requested.method)}
    if "groups" in requested.method_options.names():  # HiFT: units_per_group, kept, says it
        kept["groups"] = None
    nproc = overrides.get("nproc") or (group.ranks.size if group.several else requested.nproc)
    micro_batch_size = micro_batch_on_resume(requested, record, nproc)
    changes = {
        "out": job.dir, **kept,
        "dtype": record.get("compute_dtype", requested.dtype), "micro_batch_size": micro_batch_size,
        "gradient_checkpointing": checkpointing_on_resume(requested, record),
    }  # fmt: skip
    if "max_eval_examples" not in (record.get("requested") or record["config"]):
        changes["max_eval_examples"] = 0  # a job from before the cap evaluates on all it held out, as it did
    changes.update({key: value for key, value in overrides.items() if value is not None})
    config = requested.replace(**changes)
    if config.resolved_device().type != record.get("device", "cpu"):
        log.info(
            f"device     the job ran on {record.get('device')}; it continues on {config.resolved_device()}"
        )
    files = (("data_sha256", config.data, "data"), ("eval_data_sha256", config.eval_data, "--eval-data"))
    kept = _kept_data_digests(job, record, files)
    now = kept or data_digests(config)
    for name, path, what in files:  # (a job from before the eval data's digest was kept has none)
        if record.get(name) is not None and now[name] != record[name]:
            raise UserError(
                f"{path} changed since the job started; resuming needs the same {what} "
                "(start a new job to train on the new file)"
            )
    if group.several and config.nproc != group.ranks.size:  # torchrun's count is the count
        config = config.replace(nproc=group.ranks.size)
    # the tokenised data the job kept, if it is still valid
    s = setup(config, show_progress, group, now, kept_data=kept is not None)
    try:
        return _continue(s, job, record, group)
    except BaseException:
        s.data.train.close()  # the records' background encoding ends with the run that needed it
        raise


def _kept_data_digests(job: Job, record: dict, files: tuple) -> dict | None:
    """Where a data file the job was started on is gone (moved, deleted, or on another machine): the
    digests the job recorded, so that the tokenised examples it kept (``JOB/tokenized``, verified
    by their own sha256 when read) are what it resumes on, as they would be with the file in place.
    None when every file is there (they are hashed and compared as usual)."""
    gone = [(path, what) for name, path, what in files if path is not None and not Path(path).exists()]
    if not gone:
        return None
    path, what = gone[0]
    if not (job.dir / KEPT_DATA).is_dir() or record.get("data_sha256") is None:
        raise UserError(
            f"{path} ({what}) is gone, and {job.dir} kept no tokenised examples to resume on; put the "
            f"file back at {path}"
        )
    log.info(f"data       {path} is gone: resuming on the examples the job kept ({job.dir / KEPT_DATA})")
    return {"data_sha256": record["data_sha256"], "eval_data_sha256": record.get("eval_data_sha256")}


def _continue(s: Setup, job: Job, record: dict, group: Group) -> tuple[Setup, Restored | None]:
    """``_prepare_resume`` once the run is set up: checks that it is the job's run, and the job's state."""
    then = record.get("data") or {}
    if "train_records" not in then and then.get("train_examples", len(s.data.train)) != len(s.data.train):
        # Until lazy encoding (data/lazy.py), batches were drawn over the examples left after
        # truncation; now over the records, which differ where a record has nothing to learn.
        raise UserError(
            f"this job was started by an earlier lowmem-ft, which drew its batches over the "
            f"{then['train_examples']} examples left of its {len(s.data.train)} training records; "
            "this one draws them over the records, so it cannot continue on the same batches: "
            "start the job again"
        )
    if then.get("train_records", len(s.data.train)) != len(s.data.train):  # (--pack's rows, before
        # they were cut from whole examples: where the job kept no tokenised data to read them from)
        raise UserError(
            f"this job drew its batches from {then['train_records']:,} training rows, and this "
            f"lowmem-ft makes {len(s.data.train):,} of the same data, so it cannot continue on the same "
            "batches: start the job again"
        )
    if s.max_steps != record.get("max_steps"):
        raise UserError(
            f"this resume would train {s.max_steps} steps, the job was planned for "
            f"{record.get('max_steps')}; resume with the same data and settings"
        )
    if group.main:  # (the other ranks read the job; rank 0 writes it)
        _report_plan_change(job, s)
        s.data.keep_in(job.dir)  # when it was tokenised again (a job from before the cache, or a damaged one)

    restored, skipped = latest_checkpoint(job.dir)
    for name, problem in skipped:
        log.info(f"checkpoint {name} is damaged ({problem}); skipped")
    if restored is None and group.main:
        job.truncate_metrics(0)
    job.record["config"] = s.config.to_json()
    job.update(status="running", pid=os.getpid(), error=None, resumes=record.get("resumes", 0) + 1)
    return s, restored


# Settings worth a note when `run --out JOB` resumes a job with other values on its command line.
NOTED_SETTINGS = ("model", "data", "method", "lr", "batch_size", "max_steps", "epochs", "seed")


def settings_that_differ(job_dir: Path, config: RunConfig) -> list[str]:
    """The flags of ``config`` (a new `run` aimed at an existing job) whose values differ from
    those the job was started with; the job keeps its own."""
    record = job_dir / "job.json"
    saved = RunConfig.from_json(json.loads(record.read_text()).get("requested", {}), record)
    return [
        "--" + key.replace("_", "-")
        for key in NOTED_SETTINGS
        if getattr(saved, key) != getattr(config, key)
        and not (key == "data" and Path(saved.data).resolve() == Path(config.data).resolve())
    ]


def _report_plan_change(job: Job, s: Setup) -> None:
    """Re-planning on another machine may change how a step is cut into micro-batches or whether
    activations are recomputed; neither changes what a step computes beyond summation order."""
    if s.plan is None:
        return
    plan_path = job.dir / "plan.json"
    try:
        previous = json.loads(plan_path.read_text())
    except (OSError, ValueError):
        previous = {}
    before, after = previous.get("settings", {}), s.plan.settings
    changed = [f"{k} {before[k]} → {after[k]}" for k in after if k in before and before[k] != after[k]]
    if changed:
        log.info(
            f"plan       changed for this machine: {', '.join(changed)} (same examples per step; "
            "losses may differ in the last bits from summation order)"
        )
    history = {k: previous[k] for k in ("oom_retries",) if k in previous}
    write_json_atomic(plan_path, {**s.plan.to_json(), **history})
