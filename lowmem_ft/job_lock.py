"""Who runs a job: one process per job directory, held with flock on ``JOB/lock``, and the claim
of a new job's directory made under that lock (so that of two runs given the same ``--out`` exactly
one goes on), undone if the job never starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path

from lowmem_ft.errors import UserError, cannot_write_where_asked
from lowmem_ft.files import fsync


class JobLock:
    """One process per job directory, enforced with flock on ``JOB/lock``.

    The kernel releases an flock when its process dies, however it dies, so a lock left by a
    killed process is simply free: the next ``run``/``resume`` takes it over and says whose it was.
    The file holds the holder's pid and start time, for messages and for ``lowmem-ft jobs``.
    """

    def __init__(self, directory: Path):
        self.path = directory / "lock"
        self._fd: int | None = None
        self.created: list[Path] = []  # a new job's: the directories claiming it made, deepest first
        self.stale_holder: dict | None = None  # the killed process whose lock was taken over

    def acquire(self, new_job: bool = False) -> None:
        """Take the lock, or say who holds it. ``new_job``: the directory must also hold nothing but
        the lock once it is ours (checked under the lock, so two runs given the same ``--out`` cannot
        both find it free)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # (a read-only mount, no right to write there, a full disk)
            if new_job:
                what, instead = f"cannot write in --out {self.path.parent}", "give a path you can write to"
            else:
                what, instead = f"cannot write in the job {self.path.parent}", "copy it somewhere writable"
            raise cannot_write_where_asked(exc, what, instead) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = read_lock(self.path.parent) or {}
            pid = holder.get("pid", "?")
            if new_job:
                raise UserError(
                    f"--out {self.path.parent} is taken by another run (process {pid}); choose a new --out"
                ) from None
            raise UserError(_being_run_by(self.path.parent, pid)) from None
        if new_job:
            try:
                check_new_job_directory(self.path.parent)  # another run may have made it a job meanwhile
                # A run that gave the directory up removed the lock file we locked: lock the new one.
                if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                    raise FileNotFoundError
            except FileNotFoundError:
                os.close(fd)
                self.path.parent.mkdir(parents=True, exist_ok=True)
                return self.acquire(new_job=True)
            except UserError:
                os.close(fd)
                raise
        self.stale_holder = read_lock(self.path.parent)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "started": _process_start(os.getpid())}).encode(), 0)
        fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # an empty lock file: nobody holds it, nobody was killed
            os.close(self._fd)  # closing releases the flock
            self._fd = None


# What a new job writes before it starts training: all it may remove if it never starts.
_NEW_JOB_FILES = ("job.json", "job.json.tmp", "plan.json", "plan.json.tmp", "lock")


def check_new_job_directory(out: Path) -> None:
    """``out`` can hold a new job: it does not exist, or holds nothing (a ``lock`` alone is what a
    run killed while creating its job leaves; nobody holds it, or taking it would have failed)."""
    if not out.exists():
        return
    if (out / "job.json").exists():
        raise UserError(
            f"--out {out} holds a job; continue it with `lowmem-ft resume {out}`, or choose a new --out"
        )
    if not out.is_dir() or any(p.name != "lock" for p in out.iterdir()):
        raise UserError(f"--out {out} already exists and is not empty; choose a new directory or remove it")


def claim_new_job(directory: Path) -> JobLock:
    """Make ``directory`` this process's new job before anything slow happens (loading, tokenising),
    so that of two runs given the same ``--out`` exactly one goes on; the other is told who holds it.
    Undo with ``abandon_new_job`` if the job is never started."""
    check_new_job_directory(directory)
    created = [d for d in [directory, *directory.absolute().parents] if not d.exists()]
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        what = f"cannot create --out {directory}"
        raise cannot_write_where_asked(exc, what, "give a path you can write to") from None
    lock = JobLock(directory)
    lock.created = created
    lock.acquire(new_job=True)  # refused: the directory is another run's now, left as it is
    return lock


def abandon_new_job(lock: JobLock, directories: tuple[str, ...] = ()) -> None:
    """A new job that never started (bad input, Ctrl-C, a full disk during setup): remove what it
    wrote (its record, plan and lock, and the ``directories`` it made in it, such as its kept data),
    and the directory if it made it; nothing else is touched."""
    lock.release()
    directory = lock.path.parent
    for name in _NEW_JOB_FILES:
        (directory / name).unlink(missing_ok=True)
    for name in directories:
        shutil.rmtree(directory / name, ignore_errors=True)
    for made in lock.created:  # only if empty: anything else in them is not ours to delete
        with contextlib.suppress(OSError):
            made.rmdir()


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
    return bool(holder) and _alive_as_recorded(holder)


def _alive_as_recorded(holder: dict) -> bool:
    started = _process_start(holder.get("pid"))
    return started is not None and abs(started - holder.get("started", 0)) < 1.0


def being_run(directory: Path) -> str | None:
    """The line that says which live process runs the job, or None when none does."""
    holder = read_lock(directory)  # (read once: the holder may let go in the meantime)
    if not holder or not _alive_as_recorded(holder):
        return None
    return _being_run_by(directory, holder.get("pid", "?"))


def _being_run_by(directory: Path, pid) -> str:
    return (
        f"{directory} is being run by process {pid}; wait for it to finish, or stop it (kill {pid}) and "
        f"run `lowmem-ft resume {directory}`"
    )


def _process_start(pid: int | None) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time() if pid else None
    except (psutil.Error, ValueError):
        return None
