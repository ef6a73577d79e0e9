"""Checkpoints on disk: a nested training state ↔ a directory that is either complete or ignored.

    JOB/checkpoints/step-000040/
      state.json                   the state's structure and every non-tensor value (JSON)
      tensors-00000.safetensors    its tensors, in shards of at most SHARD_BYTES
      shards/                      several ranks with a sharded model: each rank's part of the
                                   weights and optimizer state (torch.distributed.checkpoint)
      manifest.json                step, and the size and sha256 of every file above; written last

Nothing here needs pickle to load: tensors go through safetensors, everything else through JSON
(tuples, dtypes and dicts with non-string keys, such as optimizer states, are tagged so they come
back as they were).

Writing is atomic: the files go to ``checkpoints/.partial-step-000040``, each is fsynced, the
manifest comes last, and only then is the directory renamed to ``step-000040`` (and the parent
fsynced). A process killed at any point leaves either the previous checkpoints untouched plus a
partial directory (removed on the next start), or a complete new one. On reading, a checkpoint
whose files do not match the manifest's sizes and checksums is skipped for the one before it.

Memory: tensors that are not already plain host tensors (GPU weights, views) are copied to the
host one shard at a time, so writing a 7B model's state needs at most one shard of extra host
memory, not a second copy of the state. Each shard is read back once to compute its checksum, so
the checksum vouches for the bytes on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lowmem_ft.errors import DiskError, disk_fault
from lowmem_ft.files import free_bytes, fsync, fsync_path, readable_as_umask_allows, sha256_of
from lowmem_ft.sizes import format_bytes

FORMAT = 1
SHARD_BYTES = 1 << 30
CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
STATE = "state.json"
SHARDS = "shards"  # several ranks: each one's part of the weights and optimizer state (DCP)
_PARTIAL = ".partial-"


class CheckpointWriteError(DiskError):
    """Writing a checkpoint failed (disk full, read-only, permissions); the previous checkpoints are
    intact. Exit code 3, as every write the disk refused."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoints_dir(job_dir: Path) -> Path:
    return job_dir / CHECKPOINTS


def list_checkpoints(job_dir: Path) -> list[Path]:
    """Checkpoint directories (complete or not), newest step first."""
    root = checkpoints_dir(job_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")]
    return sorted(found, key=lambda p: p.name, reverse=True)


# -- encoding: nested state -> (JSON tree, tensors) -------------------------------------------------
def _encode(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot put a {type(obj).__name__} into a checkpoint")


def _decode(tree, tensor):
    if isinstance(tree, list):
        return [_decode(v, tensor) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tensor__" in tree:
        return tensor(tree["__tensor__"])
    if "__dtype__" in tree:
        return getattr(torch, tree["__dtype__"])
    if "__tuple__" in tree:
        return tuple(_decode(v, tensor) for v in tree["__tuple__"])
    if "__items__" in tree:
        return {_decode(k, tensor): _decode(v, tensor) for k, v in tree["__items__"]}
    return {k: _decode(v, tensor) for k, v in tree.items()}


def _shards(tensors: dict[str, torch.Tensor]) -> list[list[str]]:
    """Tensor keys in order, cut into shards of at most SHARD_BYTES (a bigger tensor gets its own)."""
    shards, current, size = [], [], 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    return shards + ([current] if current else [])


# -- writing ------------------------------------------------------------------------------------------
def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` and fsync it: after this returns, the bytes are on disk."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        fsync(f.fileno())


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write one safetensors shard and fsync it. (safetensors writes straight from the tensors'
    memory, several times faster than serialising to bytes in Python first.)"""
    save_file(tensors, path)
    readable_as_umask_allows(path)  # (as the checkpoint's JSON files are)
    fsync_path(path)


def partial_dir(job_dir: Path, step: int) -> Path:
    """Where checkpoint ``step`` is written before it is complete."""
    return checkpoints_dir(job_dir) / f"{_PARTIAL}{checkpoint_name(step)}"


def save_checkpoint(
    job_dir: Path,
    step: int,
    state: dict,
    keep: int,
    write_shards: Callable[[Path], None] | None = None,
    shard_bytes: int = 0,
) -> Path:
    """Write ``state`` as checkpoint ``step`` atomically; keep the ``keep`` newest checkpoints.
    ``write_shards(directory)``: with several ranks, writes their shards (SHARDS, through
    torch.distributed.checkpoint) into the checkpoint before its manifest, which lists them too;
    ``shard_bytes``: the size of those shards, every rank's, for the free-space check and messages.

    Raises CheckpointWriteError (with the previous checkpoints intact) if the disk is full or
    not writable.
    """
    root = checkpoints_dir(job_dir)
    final = root / checkpoint_name(step)
    partial = partial_dir(job_dir, step)
    if final.is_dir() and verify_checkpoint(final) is None:
        return final  # the same step's state, already safely on disk

    def refused(reason: str, disk: bool = True) -> CheckpointWriteError:
        """``disk``: the disk is full (or read-only); otherwise something in the way (a file where
        a folder should be), which freeing space would not mend."""
        previous = next((p.name for p in list_checkpoints(job_dir) if verify_checkpoint(p) is None), None)
        mend = "free space" if disk else f"move what is in the way in {root}"
        return CheckpointWriteError(
            f"could not write checkpoint {final.name} to {root}: {reason}; "
            + (f"the previous checkpoint {previous} is intact" if previous else "there is no earlier one")
            + f"; {mend} and run `lowmem-ft resume {job_dir}`"
        )

    needed, free = state_bytes(state) + shard_bytes, free_bytes(root)
    if free is not None and needed > free:  # refused before a byte is written
        raise refused(f"it needs {format_bytes(needed)} and {format_bytes(free)} is free")
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        files = _write_contents(partial, state)
        if write_shards is not None:
            write_shards(partial / SHARDS)
            files |= _listed(partial, partial / SHARDS)
        manifest = {"format": FORMAT, "step": step, "created": time.time(), "files": files}
        _write_file(partial / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
        fsync_path(partial)
        if final.exists():  # damaged (it failed verification): replace it
            shutil.rmtree(final)
        os.rename(partial, final)
        fsync_path(root)
    except Exception as exc:
        shutil.rmtree(partial, ignore_errors=True)
        # safetensors reports a full disk as its own SafetensorError, not as OSError
        reason = disk_fault(exc) or (exc.strerror if isinstance(exc, OSError) else None)
        if reason is None:
            raise
        if disk_fault(exc) == "the disk is full":
            reason += f" (the checkpoint needs about {format_bytes(needed)})"
        raise refused(reason, disk=disk_fault(exc) is not None) from exc
    _apply_retention(job_dir, keep, newest=final)
    return final


def state_bytes(state) -> int:
    """Bytes the tensors of ``state`` take on disk (the JSON beside them is small); a sharded
    tensor (DTensor) counts whole, every rank's shard."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(state_bytes(v) for v in state)
    return 0


def _write_contents(directory: Path, state: dict) -> dict[str, dict]:
    """Write state.json and the tensor shards into ``directory``; return their sizes and checksums."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors)
    files, where = {}, {}
    for i, keys in enumerate(_shards(tensors)):
        name = f"tensors-{i:05d}.safetensors"
        shard, storages = {}, set()
        for key in keys:
            t = _host_tensor(tensors[key])
            storage = t.untyped_storage().data_ptr()
            if storage in storages and t.numel():  # the same tensor under two names (tied weights)
                t = t.clone()
            storages.add(t.untyped_storage().data_ptr())
            shard[key] = t
        _write_tensors(directory / name, shard)
        del shard
        # Hashed from the file: what the checksum vouches for is what reached the disk.
        files[name] = {"bytes": (directory / name).stat().st_size, "sha256": sha256_of([directory / name])}
        where.update(dict.fromkeys(keys, name))
    data = (json.dumps({"state": tree, "tensors": where}) + "\n").encode()
    _write_file(directory / STATE, data)
    files[STATE] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return files


def _listed(directory: Path, under: Path) -> dict[str, dict]:
    """Sizes and checksums of the files under ``under``, named relative to ``directory``."""
    return {
        str(file.relative_to(directory)): {"bytes": file.stat().st_size, "sha256": sha256_of([file])}
        for file in sorted(under.rglob("*"))
        if file.is_file()
    }


def _host_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the host, owning all of its storage, as safetensors requires (views and tied
    weights share storage). Host tensors that already do are written as they are; everything
    else is copied, one shard at a time."""
    t = t.detach()
    owns_storage = t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    if t.device.type == "cpu" and t.is_contiguous() and owns_storage:
        return t
    return t.to("cpu", copy=True).contiguous()


def _apply_retention(job_dir: Path, keep: int, newest: Path) -> None:
    """Delete all but the ``keep`` newest checkpoints; the one just written is never deleted."""
    for path in list_checkpoints(job_dir)[max(1, keep) :]:
        if path != newest:
            shutil.rmtree(path, ignore_errors=True)


def remove_partial(job_dir: Path) -> None:
    """Remove what a process killed during a checkpoint write left behind."""
    root = checkpoints_dir(job_dir)
    if root.is_dir():
        for path in root.glob(f"{_PARTIAL}*"):
            shutil.rmtree(path, ignore_errors=True)


# -- reading ------------------------------------------------------------------------------------------
def verify_checkpoint(path: Path) -> str | None:
    """None if every file matches the manifest, else what is wrong (one phrase)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return "no manifest (the write did not finish)"
    except (OSError, ValueError, KeyError, TypeError):
        return "unreadable manifest"
    if manifest.get("format") != FORMAT:
        return f"format {manifest.get('format')}, this lowmem-ft reads format {FORMAT}"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {expected['bytes']}"
        if sha256_of([file]) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def load_checkpoint(path: Path) -> dict:
    """The state saved in a (verified) checkpoint directory; tensors are on the CPU."""
    saved = json.loads((path / STATE).read_text())
    handles = {}

    def tensor(key: str) -> torch.Tensor:
        name = saved["tensors"][key]
        if name not in handles:
            handles[name] = safe_open(path / name, framework="pt")
        return handles[name].get_tensor(key)

    return _decode(saved["state"], tensor)


@dataclass
class Restored:
    path: Path
    step: int
    state: dict


def latest_checkpoint(job_dir: Path) -> tuple[Restored | None, list[tuple[str, str]]]:
    """The newest checkpoint that verifies (None if none does), and the newer ones skipped because
    they did not: (name, what is wrong)."""
    skipped = []
    for path in list_checkpoints(job_dir):
        problem = verify_checkpoint(path)
        if problem is None:
            step = int(json.loads((path / MANIFEST).read_text())["step"])
            return Restored(path, step, load_checkpoint(path)), skipped
        skipped.append((path.name, problem))
    return None, skipped
