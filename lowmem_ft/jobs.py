"""The job directory: everything one run writes, and the listing of jobs under a root.

    runs/<name>/
      job.json        resolved configuration, status, progress, versions (rewritten atomically)
      metrics.jsonl   one JSON object per line: training steps and evaluations
      model/          the fine-tuned model in Hugging Face format (when the method exports one)
      error.log       the traceback, if the run failed on something that was not the user's input

Statuses: ``running``, ``interrupted`` (Ctrl-C / SIGTERM), ``failed`` (with ``error``), ``done``.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

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


class Job:
    """A job directory being written by this process."""

    def __init__(self, directory: Path, record: dict):
        self.dir = directory
        self.record = record

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
    if status == "running" and not _pid_alive(record.get("pid")):
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
    )


def list_jobs(root: Path) -> list[JobInfo]:
    """Jobs directly under ``root`` (and ``root`` itself if it is a job), oldest first."""
    candidates = [root] + (sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else [])
    jobs = [info for info in map(read_job, candidates) if info is not None]
    return sorted(jobs, key=lambda j: j.updated)


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    import psutil

    return psutil.pid_exists(pid)
