"""Read a JSONL data file into validated records, with one-line ``file:line:`` errors for every problem."""

from __future__ import annotations

import json
from pathlib import Path

from lowmem_ft.data.records import (
    MAX_RECORD_BYTES,
    Record,
    RecordChecker,
    RecordError,
    check_format_name,
    json_object,
)
from lowmem_ft.errors import DataError

# One record per line, and no line longer than this (records.py says why).
MAX_LINE_BYTES = MAX_RECORD_BYTES


def read_jsonl(path: Path, fmt: str = "auto", skip_bad_lines: bool = False) -> tuple[list[Record], str, int]:
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
    return checker.finish(read_lines(path, path.read_bytes(), checker), path)


def read_lines(path: Path, raw: bytes, checker: RecordChecker) -> list[Record]:
    """The records of JSONL text ``raw`` (the bytes of ``path``), checked by ``checker``."""
    if not raw.strip():
        what = "file is empty" if not raw else "file has only blank lines"
        raise DataError(f"{path}: {what}; expected one JSON object per line")
    records: list[Record] = []
    for number, line_bytes in enumerate(raw.split(b"\n"), start=1):
        if not line_bytes.strip():
            continue
        try:
            if len(line_bytes) > MAX_LINE_BYTES:
                raise RecordError(
                    f"the line is {len(line_bytes) / 2**20:.1f} MiB, more than the "
                    f"{MAX_LINE_BYTES >> 20} MiB a record may be; split it into several records"
                )
            records.append(checker.record(_parse_line(line_bytes, number == 1), path, number, "line"))
        except RecordError as error:
            checker.bad(error, path, number, "line")
    return records


def _parse_line(line_bytes: bytes, first: bool) -> object:
    try:
        # utf-8-sig on line 1 drops the byte-order mark some Windows editors write.
        text = line_bytes.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as error:
        raise RecordError(
            f"not valid UTF-8 (byte {error.start + 1} of the line); save the file as UTF-8"
        ) from None
    try:
        return json.loads(text, object_pairs_hook=json_object)
    except json.JSONDecodeError as error:
        raise RecordError(
            f"invalid JSON ({error.msg} at column {error.colno}); each line must be one JSON object"
        ) from None
    except RecursionError:
        raise RecordError("JSON nested too deeply to read (about 1,000 levels or more)") from None
    except ValueError as error:  # an integer of more than 4,300 digits
        if "integer string conversion" in str(error):
            raise RecordError("a number has more than 4,300 digits; write it as a string") from None
        raise RecordError(str(error)) from None
