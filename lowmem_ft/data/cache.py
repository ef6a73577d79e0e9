"""The tokenised data of a job, kept in the job directory so that `resume` does not read and tokenise
the data again (minutes for a million records):

    JOB/tokenized/examples.safetensors   the training and evaluation examples (ExampleTable's arrays;
                                         training: one per record, empty where nothing is left to learn)
    JOB/tokenized/examples.json          what they were made from (the key), what the run reports
                                         about them, and the sha256 of every array

They are used only if the key matches: the data's sha256, the tokenizer's, and every setting that
changes the examples (the caller, run_data.load_data, makes the key). A cache that was made otherwise,
or that cannot be read or does not verify, is left alone with a log line, and the data is tokenised
again. The arrays are written first and the index last, each atomically, so a job stopped in the
middle of writing has no index, or the old one, which the new arrays' sha256 no longer match.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from lowmem_ft.data.tokenize import ExampleTable
from lowmem_ft.errors import disk_fault
from lowmem_ft.files import free_bytes, fsync_path, readable_as_umask_allows, write_json_atomic
from lowmem_ft.sizes import format_bytes

log = logging.getLogger(__name__)  # the CLI shows it (cli.report_to_console)

DIRECTORY = "tokenized"
ARRAYS = "examples.safetensors"
INDEX = "examples.json"
VERSION = 2  # of this layout; a cache of another version is made again (1: train held kept examples only)
_FIELDS = ("input_ids", "trained", "starts")


def tokenizer_sha256(tokenizer) -> str | None:
    """A digest of what decides how text becomes tokens and labels: the fast tokenizer's whole
    definition (vocabulary, merges, normaliser, added tokens), its chat template and special tokens.
    None for a tokenizer with no such definition (a slow, Python-only one): its data is not cached."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    parts = [
        type(tokenizer).__name__,
        backend.to_str(),
        getattr(tokenizer, "chat_template", None),
        tokenizer.special_tokens_map,  # bos, eos, unk, pad: a chat template may write them
        # and the extra ones (transformers 5's name; 4.x called them additional)
        getattr(tokenizer, "extra_special_tokens", None)
        or getattr(tokenizer, "additional_special_tokens", None),
        getattr(tokenizer, "split_special_tokens", None),
    ]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def write_cache(job_dir: Path, key: dict, tables: dict[str, ExampleTable], summary: dict) -> None:
    """Keep ``tables`` (by name) in ``job_dir`` with ``key`` and ``summary``. A disk that will not take
    them costs only the cache: one log line, and the run goes on."""
    directory = Path(job_dir) / DIRECTORY
    arrays = {f"{name}.{field}": getattr(table, field) for name, table in tables.items() for field in _FIELDS}
    size = sum(array.nbytes for array in arrays.values())
    free = free_bytes(job_dir)
    if free is not None and size > free:
        log.info(
            f"data       the tokenised data ({format_bytes(size)}) is not kept in {directory}: "
            f"{format_bytes(free)} free; resume will tokenise again"
        )
        return
    index = {
        "version": VERSION,
        "key": key,
        "summary": summary,
        "sha256": {name: _sha256(array) for name, array in arrays.items()},
    }
    tmp = directory / (ARRAYS + ".tmp")
    try:
        from safetensors.numpy import save_file

        directory.mkdir(exist_ok=True)
        (directory / INDEX).unlink(missing_ok=True)  # no moment with an index for other arrays
        save_file(arrays, str(tmp))
        readable_as_umask_allows(tmp)
        fsync_path(tmp)
        os.replace(tmp, directory / ARRAYS)
        write_json_atomic(directory / INDEX, index)
    except BaseException as exc:  # (a Ctrl-C as well: hundreds of MB are not left in the job)
        with contextlib.suppress(OSError):  # (none to remove where the folder is not one)
            tmp.unlink(missing_ok=True)
        reason = disk_fault(exc) or (exc.strerror if isinstance(exc, OSError) else None)
        if reason is None:
            raise
        if directory.exists() and not directory.is_dir():
            reason = "a file of that name is in the way"
        log.info(
            f"data       could not keep the tokenised data in {directory}: {reason}; "
            "resume will tokenise again"
        )


def read_cache(job_dir: Path, key: dict) -> tuple[dict[str, ExampleTable], dict] | None:
    """The tables and summary kept in ``job_dir`` for ``key``, or None (with a log line saying why
    if there is a cache that is not used)."""
    directory = Path(job_dir) / DIRECTORY
    if not (directory / INDEX).is_file():
        return None  # none kept: a new job, or one from before caching, or one stopped while writing it
    try:
        index = json.loads((directory / INDEX).read_text(encoding="utf-8"))
        if index.get("version") != VERSION:
            log.info(f"data       the tokenised data in {directory} is of another layout; tokenising again")
            return None
        saved = index.get("key", {})
        if changed := [name for name in key if saved.get(name) != key[name]]:
            log.info(
                f"data       the tokenised data in {directory} was made with another {', '.join(changed)}; "
                "tokenising again"
            )
            return None
        from safetensors.numpy import load_file

        arrays = load_file(str(directory / ARRAYS))
        if set(arrays) != set(index["sha256"]):
            raise ValueError(f"it holds {sorted(arrays)}, its index names {sorted(index['sha256'])}")
        for name, array in arrays.items():
            if _sha256(array) != index["sha256"][name]:
                raise ValueError(f"{name} does not match its sha256")
        names = {name.split(".")[0] for name in arrays}
        tables = {name: ExampleTable(*(arrays[f"{name}.{field}"] for field in _FIELDS)) for name in names}
        return tables, index["summary"]
    except Exception as exc:  # any damage at all: the data can always be tokenised again
        log.info(f"data       the tokenised data in {directory} cannot be used ({exc}); tokenising again")
        return None


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).view(np.uint8).data).hexdigest()
