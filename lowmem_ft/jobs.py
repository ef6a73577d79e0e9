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

import fcntl
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from lowmem_ft.errors import UserError

STATUSES = ("running", "interrupted", "failed", "done")


def write_json_atomic(path: Path, data: dict) -> None:
    """Write to a temporary file, fsync, then rename: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


class JobLock:
    """One process per job directory, enforced with flock on ``JOB/lock``.

    The kernel releases an flock when its process dies, however it dies, so a lock left by a
    killed process is simply free: the next ``run``/``resume`` takes it over and says whose it was.
    The file holds the holder's pid and start time, for messages and for ``lowmem-ft jobs``.
    """

    def __init__(self, directory: Path):
        self.path = directory / "lock"
        self._fd: int | None = None
        self.stale_holder: dict | None = None  # the killed process whose lock was taken over

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = read_lock(self.path.parent) or {}
            pid = holder.get("pid", "?")
            raise UserError(
                f"{self.path.parent} is being run by process {pid}; wait for it to finish, or stop it "
                f"(kill {pid}) and run `lowmem-ft resume {self.path.parent}`"
            ) from None
        self.stale_holder = read_lock(self.path.parent)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "started": _process_start(os.getpid())}).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # an empty lock file: nobody holds it, nobody was killed
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def read_lock(directory: Path) -> dict | None:
    """The pid and start time written by the process that holds (or held) the job's lock."""
    try:
        return json.loads((directory / "lock").read_text()) or None
    except (OSError, ValueError):
        return None


def lock_is_held(directory: Path) -> bool:
    """Whether a live process holds the job's lock (pid alive *and* the same process start time,
    so a recycled pid does not count)."""
    holder = read_lock(directory)
    if not holder:
        return False
    started = _process_start(holder.get("pid"))
    return started is not None and abs(started - holder.get("started", 0)) < 1.0


def _process_start(pid: int | None) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time() if pid else None
    except (psutil.Error, ValueError):
        return None


class Job:
    """A job directory being written by this process."""

    def __init__(self, directory: Path, record: dict):
        self.dir = directory
        self.record = record
        self.lock = JobLock(directory)

    @classmethod
    def open(cls, directory: Path) -> Job:
        """An existing job directory, to resume."""
        try:
            record = json.loads((directory / "job.json").read_text())
        except FileNotFoundError:
            what = "no such directory" if not directory.exists() else "no job.json, so not a job directory"
            raise UserError(f"{directory}: {what}; `lowmem-ft jobs` lists the jobs under runs/") from None
        except (OSError, ValueError) as exc:
            raise UserError(f"{directory}/job.json cannot be read ({exc})") from None
        return cls(directory, record)

    @classmethod
    def create(cls, directory: Path, config: dict, **fields) -> Job:
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
        job.lock.acquire()
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

    def log(self, **metrics) -> None:
        """Append one line to metrics.jsonl and flush it, so a killed run keeps what it logged."""
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")

    def metrics_bytes(self) -> int:
        """Size of metrics.jsonl: a checkpoint records it, and a resume cuts the file back to it."""
        return self.metrics_path.stat().st_size if self.metrics_path.exists() else 0

    def truncate_metrics(self, size: int) -> None:
        """Forget the lines logged after a checkpoint; the resumed run logs those steps again."""
        if self.metrics_path.exists():
            with open(self.metrics_path, "r+b") as f:
                f.truncate(size)


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
    config = record.get("config", {})
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


def list_jobs(root: Path) -> list[JobInfo]:
    """Jobs directly under ``root`` (and ``root`` itself if it is a job), oldest first."""
    candidates = [root] + (sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else [])
    jobs = [info for info in map(read_job, candidates) if info is not None]
    return sorted(jobs, key=lambda j: j.updated)
