"""What every reader shares: the record type, and the checks a parsed record must pass whatever file it
came from (a JSONL line, an item of a .json list, a Parquet row, a row of a saved dataset)."""

from __future__ import annotations

from typing import NamedTuple

from lowmem_ft.data.formats import FORMAT_NAMES, detect_format, json_type, unknown_shape_reason, validate
from lowmem_ft.errors import DataError

# No record may hold more text than this: a training example is cut to --seq-len tokens (a few
# thousand), and a record of tens of MB makes the tokenizer's own buffers run to gigabytes. JSONL
# checks it as bytes per line, before parsing; the other containers as characters per record.
MAX_RECORD_BYTES = 4 << 20


class Record(NamedTuple):  # a named tuple: made a million times for a large file, it is made fastest
    line: int  # 1-based: the line in a JSONL file, or the record's number in a .json list, Parquet or dataset
    data: dict
    path: str = ""  # the file it came from, so later stages (tokenizing) can report where it is too
    unit: str = "line"  # what `line` counts: "line" or "record"

    @property
    def location(self) -> str:
        return location(self.path, self.line, self.unit)


def location(path, number: int, unit: str) -> str:
    """Where a record is, as messages write it: ``data.jsonl:7`` or ``data.json: record 7``."""
    return f"{path}:{number}" if unit == "line" else f"{path}: record {number}"


def check_format_name(fmt: str, path) -> None:
    if fmt != "auto" and fmt not in FORMAT_NAMES:
        raise DataError(f"{path}: unknown format {fmt!r}; use one of auto, {', '.join(FORMAT_NAMES)}")


class RecordError(Exception):
    """A problem with one record; the reader adds where it is and the checker raises it or counts it."""


class RecordChecker:
    """Turns parsed records into Records of one format, across all the files of the data.

    In "auto" mode the first valid record fixes the format and every other record must match it; a
    forced format must match every record. With `skip_bad`, record-level problems are counted instead
    of raised; problems with a file as a whole always raise (the readers raise those themselves).
    """

    def __init__(self, fmt: str, skip_bad: bool):
        self.forced = None if fmt == "auto" else fmt
        self.format = self.forced
        self.skip_bad = skip_bad
        self.skipped = 0
        self.skipped_units: set[str] = set()
        self._fixed_by: Record | None = None  # the record that fixed the format in auto mode

    def record(
        self, data: object, path, number: int, unit: str, surrogates: bool = True, checked: bool = False
    ) -> Record:
        """`data` as a Record if it is a valid record of the data's format; RecordError says why not.
        ``surrogates`` False: the reader knows its text holds no lone surrogate (see content_problem).
        ``checked``: the reader knows it has none of content_problem's problems at all."""
        if not checked and (reason := content_problem(data, surrogates)) is not None:
            raise RecordError(reason)
        if not isinstance(data, dict):
            what = "line" if unit == "line" else "record"
            raise RecordError(
                f'JSON is {json_type(data)}, not an object; each {what} must be one {{"...": ...}} object'
            )
        detected = detect_format(data, self.forced)
        if detected is None:
            raise RecordError(unknown_shape_reason(data))
        if self.format is not None and detected != self.format:
            raise RecordError(self._mismatch(detected, str(path), unit))
        if reason := validate(data, detected):
            raise RecordError(reason)
        record = Record(line=number, data=data, path=str(path), unit=unit)
        if self.format is None:
            self.format, self._fixed_by = detected, record
        return record

    def bad(self, error: RecordError, path, number: int, unit: str) -> None:
        """A record failed: raise its one-line error, or count it when skipping bad records."""
        if not self.skip_bad:
            raise DataError(f"{location(path, number, unit)}: {error}") from None
        self.skipped += 1
        self.skipped_units.add(unit)

    def finish(self, records: list[Record], path) -> tuple[list[Record], str, int]:
        """The readers' return value: (records, format, bad records skipped); an error if none is left."""
        if not records:
            noun = ("line" if self.skipped_units <= {"line"} else "record") + "s" * (self.skipped != 1)
            raise DataError(
                f"{path}: no valid records ({self.skipped} bad {noun} skipped); "
                "run without --skip-bad-lines to see what is wrong with the first one"
            )
        return records, self.format, self.skipped

    def _mismatch(self, detected: str, path: str, unit: str) -> str:
        if self.forced is not None:
            return (
                f"{unit} is {detected} format but --format {self.forced} was given; "
                f"every {unit} must be {self.forced} format"
            )
        first = self._fixed_by
        if first.path == path:
            return (
                f"{unit} is {detected} format but the file is {self.format} (detected from {first.unit} "
                f"{first.line}); use one format per file"
            )
        # A directory of files is one data set: the first file's format holds for all of them.
        return (
            f"{unit} is {detected} format but the data is {self.format} (detected from {first.location}); "
            "use one format in all the files"
        )


class DuplicateKeyObject(dict):
    """A JSON object in which a key appeared twice. The parser keeps going (so the other records of a
    .json list are still read) and the record check refuses the record, naming the key."""

    made = 0  # how many were made: a reader that compares it before and after a parse knows

    def __init__(self, pairs: list[tuple[str, object]], key: str):
        super().__init__(pairs)
        self.duplicate = key
        DuplicateKeyObject.made += 1


def json_object(pairs: list[tuple[str, object]]) -> dict:
    """``object_pairs_hook`` for json: marks a key given twice (json keeps the last one without a word)."""
    data = dict(pairs)
    if len(data) < len(pairs):
        seen: set[str] = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
        return DuplicateKeyObject(pairs, duplicate)
    return data


def content_problem(data: object, surrogates: bool = True) -> str | None:
    """What no later stage can take in a record, wherever it came from: a key given twice, a lone
    UTF-16 surrogate (not text: the tokenizer cannot take it), or more text than a record may hold.
    ``surrogates`` False skips looking for surrogates, for a reader that knows there are none (a JSON
    line can only hold one as a \\uD800-style escape, and most lines have no such escape at all)."""
    if _plainly_fine(data, surrogates):
        return None
    size = 0
    for where, value in _walk(data):
        if isinstance(value, DuplicateKeyObject):
            return f"key {value.duplicate!r} appears twice in one object; keep one of them"
        if isinstance(value, str):
            size += len(value)
            if not value.isascii() and not utf8_encodable(value):
                return (
                    f"{where} holds a lone UTF-16 surrogate (an escape like \\ud800 with no pair), which "
                    "is not text; fix or remove it"
                )
    if size > MAX_RECORD_BYTES:
        return (
            f"the record holds {size / 2**20:.1f} M characters of text, more than the "
            f"{MAX_RECORD_BYTES >> 20} M a record may hold; split it into several records"
        )
    return None


def _plainly_fine(data: object, surrogates: bool) -> bool:
    """Whether ``data`` has none of the problems ``content_problem`` names, checked without working
    out where each value is: every record pays for this check, only a bad one for the other."""
    size = 0
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            size += len(value)
            if surrogates and not value.isascii() and not utf8_encodable(value):
                return False
        elif isinstance(value, dict):
            if isinstance(value, DuplicateKeyObject):
                return False
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return size <= MAX_RECORD_BYTES


def _walk(data):
    """``data`` and every value nested in it, in document order, each with where it is. Iterative, so
    a record nested as deep as the JSON parser allows cannot overflow the stack here."""
    stack = [("the record", data)]
    while stack:
        where, value = stack.pop()
        yield where, value
        if isinstance(value, dict):
            stack.extend(reversed([(repr(key), item) for key, item in value.items()]))
        elif isinstance(value, list):
            stack.extend(reversed([(f"item {i}", item) for i, item in enumerate(value)]))


def utf8_encodable(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8: text decoded from bytes that were not (a file name,
    a JSON string with a lone surrogate escape) holds lone surrogates, which cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
