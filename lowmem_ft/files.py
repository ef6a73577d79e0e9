"""Reading and writing files safely: JSON objects a user may have damaged, atomic JSON writes, free
space before a large write, whether a path can be created, and checksums. Torch-free, at the bottom
of the package."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from lowmem_ft.errors import UserError, cannot_write_where_asked

_HASH_CHUNK = 16 << 20
FSYNC = "LOWMEM_FT_FSYNC"


def fsync(fd: int) -> None:
    """``os.fsync(fd)``: the bytes written are on disk when it returns, so a checkpoint, the job's
    record or its kept data survive a power cut or a crash of the machine. ``LOWMEM_FT_FSYNC=0``
    skips it, for tests and throwaway runs on a slow disk: what was written still survives the
    process being killed at any moment (the kernel holds it), which is what resume needs; the
    tests set it (tests/conftest.py), and a checkpoint-heavy test took a fifth less time."""
    if os.environ.get(FSYNC, "1") != "0":
        os.fsync(fd)


def fsync_path(path: Path) -> None:
    """``fsync`` of the file or directory at ``path`` (a directory: the names in it, after a rename)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fsync(fd)
    finally:
        os.close(fd)


def readable_as_umask_allows(*paths: Path) -> None:
    """Give each file at ``paths`` (a directory: its .safetensors files) the mode a plain ``open()``
    would have given it. safetensors 0.8 writes through a temporary file that it creates with mode
    0600 and renames into place (safetensors issue #782), so without this a model, delta or adapter
    saved for a server that runs as another user (vLLM, a container) would be unreadable there,
    beside a config.json that is not."""
    mode = 0o666 & ~_umask()
    for path in paths:
        for file in sorted(path.glob("*.safetensors")) if path.is_dir() else [path]:
            os.chmod(file, mode)


def _umask() -> int:
    """The process's umask, read without setting it (Linux): ``os.umask`` sets it, for a moment,
    for every thread of the process (one of them may be writing a file)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
        return umask


def sha256_of(paths: Iterable[Path]) -> str:
    """sha256 (hex) of the bytes of ``paths``, one after the other, read 16 MiB at a time."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: dict) -> None:
    """Write to a temporary file, fsync, then rename: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # the file it replaces is whole; the half-written one goes
        raise


def read_json_object(path, what: str) -> dict:
    """The JSON object in ``path`` (``what`` names it in messages, e.g. "model config"); a file that
    cannot be read, is not UTF-8 JSON, or holds something other than an object is one UserError
    naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; a {what} is a UTF-8 JSON file") from None
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); a {what} is a JSON object") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: holds a JSON {type(data).__name__}, not the JSON object a {what} is")
    return data


def check_can_create(out: Path, flag: str) -> None:
    """Refuse, in one line naming ``flag``, an ``out`` that could not be created: the nearest of its
    parents that exists (the others would be made) is a file, or this process cannot write in it.
    Found out by writing there (an empty file, removed at once), before any long work: root passes
    any permission test, and ACLs and read-only mounts answer only to a write
    (``errors.cannot_write_where_asked``: exit 2, or 4 for a full disk)."""
    place = Path(out).parent
    while not place.exists() and place != place.parent:
        place = place.parent
    if not place.is_dir():
        raise UserError(f"{flag} {out}: {place} is a file, not a directory")
    probe = place / f".{Path(out).name}.lowmem-ft-probe-{os.getpid()}"
    try:
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as exc:
        what = f"{flag} {out}: cannot write under {place}"
        raise cannot_write_where_asked(exc, what, "give a path you can write to") from None


def free_bytes(path) -> int | None:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None
