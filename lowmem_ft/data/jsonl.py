"""Read a JSONL data file into validated records, with one-line ``file:line:`` errors for every problem."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lowmem_ft.data.formats import FORMAT_NAMES, detect_format, json_type, unknown_shape_reason, validate
from lowmem_ft.errors import DataError

# One record per line, and no line longer than this: a training example is cut to --seq-len tokens
# (a few thousand), and a line of tens of MB makes the tokenizer's own buffers run to gigabytes.
MAX_LINE_BYTES = 4 << 20


@dataclass(frozen=True)
class Record:
    line: int  # 1-based line number in the file
    data: dict
    path: str = ""  # the file it came from, so later stages (tokenizing) can report file:line too


def read_jsonl(path: Path, fmt: str = "auto", skip_bad_lines: bool = False) -> tuple[list[Record], str, int]:
    """Returns (records, resolved format, number of bad lines skipped).

    In "auto" mode the first valid line fixes the format and every other line must match it; a forced
    `fmt` must match every line. With `skip_bad_lines`, line-level problems are counted instead of
    raised; problems with the file as a whole always raise.
    """
    path = Path(path)
    if fmt != "auto" and fmt not in FORMAT_NAMES:
        raise DataError(f"{path}: unknown format {fmt!r}; use one of auto, {', '.join(FORMAT_NAMES)}")
    if not path.exists():
        raise DataError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise DataError(f"{path}: is a directory; give a .jsonl file")
    if not path.is_file():  # a FIFO or a device: it may never end, and cannot be hashed for resume
        raise DataError(f"{path}: is not a regular file (a pipe or a device); save the data to a .jsonl file")
    raw = path.read_bytes()
    if not raw.strip():
        what = "file is empty" if not raw else "file has only blank lines"
        raise DataError(f"{path}: {what}; expected one JSON object per line")

    records: list[Record] = []
    resolved = None if fmt == "auto" else fmt
    resolved_from = 0  # the line that fixed the format in auto mode
    skipped = 0
    for number, line_bytes in enumerate(raw.split(b"\n"), start=1):
        if not line_bytes.strip():
            continue
        try:
            if len(line_bytes) > MAX_LINE_BYTES:
                raise _LineError(
                    f"the line is {len(line_bytes) / 2**20:.1f} MiB, more than the "
                    f"{MAX_LINE_BYTES >> 20} MiB a record may be; split it into several records"
                )
            data, detected = _parse_line(line_bytes, number == 1, resolved, fmt, resolved_from)
        except _LineError as error:
            if not skip_bad_lines:
                raise DataError(f"{path}:{number}: {error}") from None
            skipped += 1
            continue
        if resolved is None:
            resolved, resolved_from = detected, number
        records.append(Record(line=number, data=data, path=str(path)))

    if not records:
        raise DataError(
            f"{path}: no valid records ({skipped} bad lines skipped); "
            "run without --skip-bad-lines to see what is wrong with the first one"
        )
    return records, resolved, skipped


class _LineError(Exception):
    """A problem with one line; read_jsonl adds the location and decides whether to raise or skip."""


def _parse_line(
    line_bytes: bytes, first: bool, resolved: str | None, forced: str, resolved_from: int
) -> tuple[dict, str]:
    try:
        # utf-8-sig on line 1 drops the byte-order mark some Windows editors write.
        text = line_bytes.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as error:
        raise _LineError(
            f"not valid UTF-8 (byte {error.start + 1} of the line); save the file as UTF-8"
        ) from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as error:
        raise _LineError(
            f"invalid JSON ({error.msg} at column {error.colno}); each line must be one JSON object"
        ) from None
    except RecursionError:
        raise _LineError("JSON nested too deeply to read (about 1,000 levels or more)") from None
    except ValueError as error:  # a duplicate key (below), or an integer of more than 4,300 digits
        if "integer string conversion" in str(error):
            raise _LineError("a number has more than 4,300 digits; write it as a string") from None
        raise _LineError(str(error)) from None
    if (where := _lone_surrogate(data)) is not None:
        raise _LineError(
            f"{where} holds a lone UTF-16 surrogate (an escape like \\ud800 with no pair), which is not "
            "text; fix or remove it"
        )
    if not isinstance(data, dict):
        raise _LineError(
            f'JSON is {json_type(data)}, not an object; each line must be one {{"...": ...}} object'
        )

    detected = detect_format(data)
    if detected is None:
        raise _LineError(unknown_shape_reason(data))
    if resolved is not None and detected != resolved:
        if forced == "auto":
            raise _LineError(
                f"line is {detected} format but the file is {resolved} (detected from line {resolved_from}); "
                "use one format per file"
            )
        raise _LineError(
            f"line is {detected} format but --format {forced} was given; every line must be {forced} format"
        )
    reason = validate(data, detected)
    if reason:
        raise _LineError(reason)
    return data, detected


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object; a key given twice is refused (json keeps the last one without a word)."""
    data = dict(pairs)
    if len(data) < len(pairs):
        seen: set[str] = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"key {duplicate!r} appears twice in one object; keep one of them")
    return data


def _lone_surrogate(value, where: str = "the record") -> str | None:
    """Where in ``value`` a string holds an unpaired surrogate (the tokenizer cannot take it)."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((f"item {i}", v) for i, v in enumerate(value))
    else:
        return None
    for key, item in items:
        if (found := _lone_surrogate(item, f"{key!r}" if isinstance(value, dict) else key)) is not None:
            return found
    return None
