"""Read a JSONL data file into validated records, with one-line ``file:line:`` errors for every problem."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from lowmem_ft.data.bulk import cycle_collector_paused, progress_bar
from lowmem_ft.data.records import (
    MAX_RECORD_BYTES,
    DuplicateKeyObject,
    Record,
    RecordChecker,
    RecordError,
    check_format_name,
    json_object,
)
from lowmem_ft.errors import DataError

# One record per line, and no line longer than this (records.py says why).
MAX_LINE_BYTES = MAX_RECORD_BYTES

# Made once: json.loads(text, object_pairs_hook=...) builds a new decoder for every line.
_DECODER = json.JSONDecoder(object_pairs_hook=json_object)

# Lines between two updates of the progress bar: an update per line would cost more than the line.
_PROGRESS_EVERY = 4096


def read_jsonl(
    path: Path, fmt: str = "auto", skip_bad_lines: bool = False, show_progress: bool = False
) -> tuple[list[Record], str, int]:
    """Returns (records, resolved format, number of bad lines skipped).

    In "auto" mode the first valid line fixes the format and every other line must match it; a forced
    `fmt` must match every line. With `skip_bad_lines`, line-level problems are counted instead of
    raised; problems with the file as a whole always raise. ``read_records`` reads the other
    containers (a .json list, Parquet, a directory, a saved dataset).
    """
    path = Path(path)
    check_format_name(fmt, path)
    if not path.exists():
        raise DataError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise DataError(f"{path}: is a directory; give a .jsonl file")
    if not path.is_file():  # a FIFO or a device: it may never end, and cannot be hashed for resume
        raise DataError(f"{path}: is not a regular file (a pipe or a device); save the data to a .jsonl file")
    checker = RecordChecker(fmt, skip_bad_lines)
    bar = progress_bar(path.stat().st_size, "reading", "B", show_progress)
    with open(path, "rb") as lines, bar, cycle_collector_paused():
        return checker.finish(read_lines(path, lines, checker, bar), path)


def read_lines(path: Path, lines: Iterable[bytes], checker: RecordChecker, bar) -> list[Record]:
    """The records of the JSONL ``lines`` of ``path`` (each with its newline, as iterating a file in
    binary mode gives them, so the file is never held whole), checked by ``checker``; ``bar``, a
    progress bar, counts the bytes read."""
    records: list[Record] = []
    read = unreported = 0
    blank = True  # no line but blank ones so far
    for number, line_bytes in enumerate(lines, start=1):
        read += len(line_bytes)
        if number % _PROGRESS_EVERY == 0:
            bar.update(read - unreported)
            unreported = read
        if line_bytes.startswith(_BOM):  # some editors write one first; `cat` of two such files, mid-file
            line_bytes = line_bytes[len(_BOM) :]
        # A record's line starts with "{"; only another line may be blank (strip copies the line).
        if not line_bytes.startswith(b"{") and not line_bytes.strip():
            continue
        blank = False
        try:
            if len(line_bytes) > MAX_LINE_BYTES and len(line_bytes.rstrip(b"\n")) > MAX_LINE_BYTES:
                raise RecordError(
                    f"the line is {len(line_bytes) / 2**20:.1f} MiB, more than the "
                    f"{MAX_LINE_BYTES >> 20} MiB a record may be; split it into several records"
                )
            # A lone surrogate can only be an escape (strict UTF-8 cannot encode one): without "\\ud"
            # in the line, its strings need no search for one.
            surrogates = b"\\ud" in line_bytes or b"\\uD" in line_bytes
            duplicates = DuplicateKeyObject.made
            data = _parse_line(line_bytes)
            # Nothing for content_problem to find (a fifth of the reading time, walking every value)
            # when the line has no such escape and gave no object with a key twice: its text is no
            # longer than the line, which is no longer than a record may be.
            checked = not surrogates and DuplicateKeyObject.made == duplicates
            records.append(checker.record(data, path, number, "line", surrogates, checked))
        except RecordError as error:
            checker.bad(error, path, number, "line")
    bar.update(read - unreported)
    if blank:
        what = "file is empty" if not read else "file has only blank lines"
        raise DataError(f"{path}: {what}; expected one JSON object per line")
    return records


_BOM = b"\xef\xbb\xbf"  # UTF-8's byte-order mark


def _parse_line(line_bytes: bytes) -> object:
    try:
        text = line_bytes.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RecordError(
            f"not valid UTF-8 (byte {error.start + 1} of the line); save the file as UTF-8"
        ) from None
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as error:
        raise RecordError(f"invalid JSON ({where(error)}); each line must be one JSON object") from None
    except RecursionError:
        raise RecordError("JSON nested too deeply to read (about 1,000 levels or more)") from None
    except ValueError as error:  # an integer of more than 4,300 digits
        if "integer string conversion" in str(error):
            raise RecordError("a number has more than 4,300 digits; write it as a string") from None
        raise RecordError(str(error)) from None


def where(error: json.JSONDecodeError) -> str:
    """What json found wrong and at which column ("Unterminated string starting at column 3": its
    message for that one ends in "at" already)."""
    return f"{error.msg.removesuffix(' at')} at column {error.colno}"
