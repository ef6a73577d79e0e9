"""The job directory: everything one run writes, and the listing of jobs under a root.

    runs/<name>/
      job.json        resolved configuration, status, progress, versions (rewritten atomically)
      metrics.jsonl   one JSON object per line: training steps and evaluations
      plan.json       the plan the run follows (updated if it changes: a resume, an out-of-memory retry)
      checkpoints/    step-NNNNNN/ directories (checkpoint.py), the newest --keep-checkpoints of them
      lock            pid of the process running the job (held with flock while it runs)
      model/          the fine-tuned model in Hugging Face format (when the method exports one)
      error.log       the traceback, if the run failed on something that was not the user's input

Statuses: ``running``, ``interrupted`` (Ctrl-C / SIGTERM, or killed: a ``running`` job whose lock
no live process holds), ``failed`` (with ``error``), ``done``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from lowmem_ft.errors import UserError, disk_fault
from lowmem_ft.files import read_json_object, write_json_atomic
from lowmem_ft.job_lock import JobLock, lock_is_held


def software_versions() -> dict[str, str]:
    import tokenizers
    import torch
    import transformers

    import lowmem_ft

    return {
        "lowmem_ft": lowmem_ft.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "cuda": torch.version.cuda or "none",
    }


def record_failure(directory: Path, error: str, since: float) -> None:
    """Record ``error`` as why the job in ``directory`` failed, where ranks started at ``since``
    (time.time()) took it: job.json written since then, saying the job runs or failed, and no live
    process holding it. Ranks refused before they took it (another process runs it, the data
    changed) leave it as it was, and so does this."""
    record = directory / "job.json"
    with contextlib.suppress(UserError, OSError, ValueError):
        if record.stat().st_mtime < since or lock_is_held(directory):
            return
        job = Job.open(directory)
        if job.record.get("status") in ("running", "failed"):
            job.update_if_possible(status="failed", error=error)


class Job:
    """A job directory being written by this process."""

    def __init__(self, directory: Path, record: dict):
        self.dir = directory
        self.record = record
        self.lock = JobLock(directory)
        self.logs: list = []  # copies of metrics.jsonl that --log asks for (metric_logs.open_logs)

    @classmethod
    def open(cls, directory: Path) -> Job:
        """An existing job directory, to resume."""
        if not (directory / "job.json").is_file():
            if directory.name == "job.json" and directory.is_file():
                raise UserError(f"{directory}: give the job's directory, {directory.parent}")
            what = (
                "no such directory"
                if not directory.exists()
                else "a file, not a job directory"
                if directory.is_file()
                else "no job.json, so not a job directory"
            )
            raise UserError(f"{directory}: {what}; `lowmem-ft jobs` lists the jobs under runs/")
        record = read_json_object(directory / "job.json", "job record")
        if not isinstance(record.get("config"), dict):
            raise UserError(
                f"{directory / 'job.json'}: has no job configuration, so it was not written by lowmem-ft "
                "or has been damaged; start a new job with `lowmem-ft run`"
            )
        return cls(directory, record)

    @classmethod
    def create(cls, directory: Path, config: dict, lock: JobLock | None = None, **fields) -> Job:
        """A new job in ``directory``, under ``lock`` if it was claimed already (claim_new_job)."""
        directory.mkdir(parents=True, exist_ok=True)
        now = time.time()
        record = {
            "status": "running",
            "created": now,
            "updated": now,
            "pid": os.getpid(),
            "step": 0,
            "config": config,
            "versions": software_versions(),
            **fields,
        }
        job = cls(directory, record)
        if lock is None:
            job.lock.acquire()
        else:
            job.lock = lock
        job.save()
        return job

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.jsonl"

    def update(self, **fields) -> None:
        self.record.update(fields, updated=time.time())
        self.save()

    def save(self) -> None:
        write_json_atomic(self.dir / "job.json", self.record)

    def update_if_possible(self, **fields) -> None:
        """Record how the job ended, unless the disk refuses (full, read-only): the error that ended
        it is what the user must see, and the job.json already there stays whole."""
        try:
            self.update(**fields)
        except OSError as exc:
            if disk_fault(exc) is None:
                raise

    def log(self, **metrics) -> None:
        """Append one line to metrics.jsonl and flush it, so a killed run keeps what it logged."""
        start = self.metrics_bytes()
        try:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        except OSError:  # a full disk: no torn line is left for a resume to trip on
            with contextlib.suppress(OSError):
                os.truncate(self.metrics_path, start)
            raise
        for copy in self.logs:
            copy.write(metrics)

    def close_logs(self) -> None:
        for copy in self.logs:
            copy.close()
        self.logs = []

    def metrics_bytes(self) -> int:
        """Size of metrics.jsonl: a checkpoint records it, and a resume cuts the file back to it."""
        return self.metrics_path.stat().st_size if self.metrics_path.exists() else 0

    def truncate_metrics(self, size: int) -> str | None:
        """Forget the lines logged after a checkpoint (the resumed run logs those steps again): cut
        the file back to ``size``, never extend it. A file shorter than that has lost lines (or was
        edited): it is kept, cut back to its last whole line, and the warning is returned."""
        if not self.metrics_path.exists():
            if size == 0:
                return None
            return f"{self.metrics_path} is missing; the steps before the checkpoint are not in it"
        with open(self.metrics_path, "r+b") as f:
            found = f.seek(0, os.SEEK_END)
            if found >= size:
                f.truncate(size)
                return None
            f.seek(0)
            whole = f.read().rfind(b"\n") + 1  # a torn last line would run into the next one
            f.truncate(whole)
        return (
            f"{self.metrics_path} holds {found:,} bytes, fewer than the {size:,} its checkpoint recorded: "
            "lines logged before the checkpoint are missing; new steps are appended after what is there"
        )


class FollowerJob(Job):
    """The job as the ranks other than 0 see it (--nproc): rank 0 writes the record, the metrics
    and the lock; the others read the record and write nothing of it."""

    @classmethod
    def open(cls, directory: Path) -> FollowerJob:
        job = super().open(directory)
        job.lock = _NoLock()
        return job

    def update(self, **fields) -> None:
        self.record.update(fields)

    def save(self) -> None:
        pass

    def log(self, **metrics) -> None:
        pass


class _NoLock:
    stale_holder = None

    def acquire(self, new_job: bool = False) -> None:
        pass

    def release(self) -> None:
        pass


@dataclass
class JobInfo:
    path: Path
    status: str
    step: int
    max_steps: int | None
    loss: float | None
    eval_loss: float | None
    method: str
    model: str
    error: str | None
    updated: float
    checkpoint_step: int | None

    def to_json(self) -> dict:
        return {**self.__dict__, "path": str(self.path)}


def read_job(directory: Path) -> JobInfo | None:
    """Summarise one job directory, or None if it holds no readable job.json."""
    try:
        record = json.loads((directory / "job.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        return None  # not a job record (`resume` says so)
    config = record["config"]
    status = record.get("status", "unknown")
    # A "running" job whose process is gone was killed without a chance to say so.
    if status == "running" and not lock_is_held(directory):
        status = "interrupted"
    return JobInfo(
        path=directory,
        status=status,
        step=record.get("step", 0),
        max_steps=record.get("max_steps"),
        loss=record.get("last_loss"),
        eval_loss=record.get("eval_loss"),
        method=config.get("method", "?"),
        model=config.get("model", "?"),
        error=record.get("error"),
        updated=record.get("updated", 0.0),
        checkpoint_step=(record.get("last_checkpoint") or {}).get("step"),
    )


def list_jobs(root: Path) -> tuple[list[JobInfo], list[Path]]:
    """Jobs directly under ``root`` (and ``root`` itself if it is a job), oldest first; and the
    directories holding a job.json that is not a readable job record (damaged), to be said."""
    candidates = [root] + (sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else [])
    jobs, damaged = [], []
    for directory in candidates:
        info = read_job(directory)
        if info is not None:
            jobs.append(info)
            continue
        try:
            if (directory / "job.json").exists():
                damaged.append(directory)
        except OSError:  # a folder this user may not look into (mode 000): said, like a damaged one
            damaged.append(directory)
    return sorted(jobs, key=lambda j: j.updated), damaged
