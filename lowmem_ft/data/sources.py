"""Where training data may live: a JSONL file, a .json list of records, a Parquet file, a directory of
such files, or a Hugging Face dataset saved with ``save_to_disk``. One entry point, ``read_records``,
reads any of them into the same checked records with the same one-line errors as ``read_jsonl``.

Parquet and saved datasets need pyarrow and the ``datasets`` library, an optional extra; nothing here
imports them (or torch) until such data is read, so ``data_path_problem`` can run at option checking.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
from pathlib import Path

from lowmem_ft.data.bulk import cycle_collector_paused, progress_bar
from lowmem_ft.data.jsonl import read_lines, where
from lowmem_ft.data.records import Record, RecordChecker, RecordError, check_format_name, json_object
from lowmem_ft.errors import DataError

log = logging.getLogger(__name__)

# What a directory of data files may hold, and how each file is read. Other files (a README, a
# .gitattributes) are left alone, so a dataset repository's folder can be given as it is.
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
NEEDS_DATASETS = 'needs the datasets library: pip install "lowmem-ft[datasets]"'

# Files that are data, but not in a form read here: refused with what would work, rather than read as
# JSONL and reported as "invalid JSON" on line 1. Any other name is read as JSONL, as it always was.
_COMPRESSED = "compressed files are not read; decompress it first"
_TABLE = "{} is not read; convert it to JSONL (pandas: DataFrame.to_json(out, orient='records', lines=True))"
_OTHER_FORMATS = {
    ".csv": _TABLE.format("CSV"),
    ".tsv": _TABLE.format("TSV"),
    ".arrow": "a lone .arrow file is not read; give the directory Dataset.save_to_disk wrote",
    ".xlsx": _TABLE.format("a spreadsheet"),
    ".zip": "archives are not read; unpack it and give the directory",
    ".tar": "archives are not read; unpack it and give the directory",
    **dict.fromkeys((".gz", ".bz2", ".xz", ".zst"), _COMPRESSED),
}


def read_records(
    path: Path, fmt: str = "auto", skip_bad_lines: bool = False, show_progress: bool = False
) -> tuple[list[Record], str, int]:
    """Returns (records, resolved format, number of bad records skipped), like ``read_jsonl``, for
    any data path ``data_path_problem`` accepts. A directory is one data set: its files are read in
    name order and the first valid record fixes the format for all of them. ``show_progress``: a
    progress bar of the bytes read.
    """
    path = Path(path)
    check_format_name(fmt, path)
    checker = RecordChecker(fmt, skip_bad_lines)
    records: list[Record] = []
    sources = _sources(path, say_left_out=True)
    total = sum(f.stat().st_size for f in data_files(path))
    empty = 0  # files of no records, left out
    with progress_bar(total, "reading", "B", show_progress) as bar, cycle_collector_paused():
        for kind, source in sources:
            try:
                records += _READERS[kind](source, checker, bar)
            except _NoRecords:  # a part file of none (Dask and Spark write them): left out
                if len(sources) == 1:
                    raise
                log.info(f"data       {source}: no records; left out")
                empty += 1
    if empty == len(sources):
        raise DataError(f"{path}: none of its files holds a record; it must hold at least one") from None
    return checker.finish(records, path)


class _NoRecords(DataError):
    """A Parquet file or saved dataset of no rows."""


# The first bytes of compressed and archived files: one named data.jsonl is refused as what it is, not
# as "not valid UTF-8" on its first line.
_MAGIC = {
    b"\x1f\x8b": "gzip-" + _COMPRESSED, b"BZh": "bzip2-" + _COMPRESSED, b"\xfd7zXZ\x00": "xz-" + _COMPRESSED,
    b"\x28\xb5\x2f\xfd": "zstd-" + _COMPRESSED, b"PK\x03\x04": _OTHER_FORMATS[".zip"],
}  # fmt: skip


def _packed_inside(path: Path) -> str | None:
    """Why ``path`` cannot be read as it is, by its first bytes (a compressed file or an archive
    whatever its name), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError:
        return None  # (said when it is read)
    return next((reason for magic, reason in _MAGIC.items() if head.startswith(magic)), None)


def data_path_problem(path: Path) -> str | None:
    """What is wrong with ``path`` as training data, in one line, or None if it can be read (its
    records are checked only when read). Reads no data and imports neither torch nor ``datasets``."""
    try:
        _sources(Path(path))
    except DataError as error:
        return str(error)
    return None


def data_files(path: Path) -> list[Path]:
    """The files that make up the data at ``path``, in a fixed order: what to hash to tell whether the
    data changed (``resume`` does)."""
    files = []
    for kind, source in _sources(Path(path)):
        if kind == "dataset":
            files += sorted(p for p in source.rglob("*") if p.is_file())
        else:
            files.append(source)
    return files


def _sources(path: Path, say_left_out: bool = False) -> list[tuple[str, Path]]:
    """What reading ``path`` means, as (reader, path) pairs in read order; a DataError says why ``path``
    cannot be data. Looks at names only, so it is quick however large the data. ``say_left_out``:
    log which files of a directory are not data (once, as the data is read: options are checked,
    and the data hashed, before that)."""
    if not path.exists():
        raise DataError(f"{path}: no such file or directory; check the path")
    if path.is_dir():
        if (dataset := _saved_dataset(path)) is not None:
            sources = [("dataset", dataset)]
        else:
            sources = _directory_files(path, say_left_out)
    elif not path.is_file():  # a FIFO or a device: it may never end, and cannot be hashed for resume
        raise DataError(f"{path}: is not a regular file (a pipe or a device); save the data to a .jsonl file")
    elif (reason := _OTHER_FORMATS.get(path.suffix.lower()) or _packed_inside(path)) is not None:
        raise DataError(f"{path}: {reason}")
    else:
        sources = [(_reader_for(path), path)]
    needs = {"parquet": "pyarrow", "dataset": "datasets"}
    if any(kind in needs and importlib.util.find_spec(needs[kind]) is None for kind, _ in sources):
        raise DataError(f"reading {path} {NEEDS_DATASETS}")
    return sources


def _reader_for(path: Path) -> str:
    suffix = path.suffix.lower()
    return {".json": "json", ".parquet": "parquet"}.get(suffix, "jsonl")


def _saved_dataset(path: Path) -> Path | None:
    """The directory of the Dataset that ``Dataset.save_to_disk`` wrote at ``path``, or None if it is
    not one. A saved DatasetDict holds one such directory per split: the "train" split is read."""
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return path
    if not (path / "dataset_dict.json").is_file():
        return None
    try:
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(
            f"{path}: dataset_dict.json is not what DatasetDict.save_to_disk writes; save the dataset again"
        ) from None
    if "train" not in splits:
        names = ", ".join(map(str, splits)) or "none"
        example = path / str(splits[0]) if splits else path / "NAME"
        raise DataError(
            f'{path}: a saved DatasetDict with no "train" split (splits: {names}); give the directory '
            f"of the split to train on instead, e.g. {example}"
        )
    return path / "train"


def _directory_files(path: Path, say_left_out: bool) -> list[tuple[str, Path]]:
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    files = [p for p in entries if p.suffix.lower() in DATA_SUFFIXES and p.is_file()]
    if files:
        if say_left_out and (ignored := [p.name for p in entries if p not in files]):
            shown = ", ".join(ignored[:3]) + (f" and {len(ignored) - 3} more" if len(ignored) > 3 else "")
            log.info(f"data       {path}: reading {len(files)} data files, leaving out {shown}")
        return [(_reader_for(p), p) for p in files]
    if not entries:
        raise DataError(
            f"{path}: is an empty directory; put the data in it as .jsonl, .json or .parquet files"
        )
    shown = ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries[:3])
    raise DataError(
        f"{path}: no data files in this directory (found {shown}{', ...' if len(entries) > 3 else ''}); "
        "it must hold .jsonl, .json or .parquet files (subdirectories are not read), or be a dataset "
        "saved with Dataset.save_to_disk"
    )


# -- readers: each returns the checked records of one source and counts its bytes on the bar ---------------


def _read_jsonl(path: Path, checker: RecordChecker, bar) -> list[Record]:
    with open(path, "rb") as lines:
        return read_lines(path, lines, checker, bar)


def _read_json(path: Path, checker: RecordChecker, bar) -> list[Record]:
    """A .json file is a list of records, or (as Dataset.to_json and many tools write it) JSONL."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # utf-8-sig drops the byte-order mark some editors write
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not valid UTF-8 (byte {error.start + 1}); save the file as UTF-8") from None
    if not text.lstrip().startswith("["):
        if (whole := _one_object(text)) is not None:
            keys = ", ".join(map(str, list(whole)[:5]))
            raise DataError(
                f"{path}: holds one JSON object (keys: {keys}), not a list of records; a .json file must "
                "hold a list, [{...}, {...}], or one record per line"
            )
        return read_lines(path, io.BytesIO(raw), checker, bar)
    bar.update(len(raw))
    try:
        # Objects with a key given twice are marked by json_object and refused record by record.
        items = json.loads(text, object_pairs_hook=json_object)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}:{error.lineno}: invalid JSON ({where(error)}); a .json file "
            "must hold one list of records, [{...}, {...}], or one record per line"
        ) from None
    except RecursionError:
        raise DataError(
            f"{path}: JSON nested too deeply to read (about 1,000 levels or more); flatten the records"
        ) from None
    except ValueError:  # the one other error json raises: an integer of more than 4,300 digits
        raise DataError(f"{path}: a number has more than 4,300 digits; write it as a string") from None
    if not items:
        raise DataError(f"{path}: the list of records is empty; it must hold at least one record")
    return _check_rows(path, items, checker)


def _one_object(text: str) -> dict | None:
    """The object ``text`` holds if it is one JSON object written over several lines (pretty-printed,
    or a list wrapped in an object as {"data": [...]}); JSONL is one object per line."""
    if "\n" not in text.strip():
        return None
    try:
        whole = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return whole if isinstance(whole, dict) else None


def _read_parquet(path: Path, checker: RecordChecker, bar) -> list[Record]:
    import pyarrow
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as error:
        raise DataError(
            f"{path}: cannot be read as Parquet ({error}); check that the file is whole"
        ) from None
    bar.update(path.stat().st_size)
    return _check_rows(path, [_without_nulls(row) for row in rows], checker)


def _read_dataset(path: Path, checker: RecordChecker, bar) -> list[Record]:
    import datasets

    if path.name == "train" and (path.parent / "dataset_dict.json").is_file():
        log.info(f"data       {path.parent} is a saved DatasetDict; reading its train split")
    try:
        dataset = datasets.load_from_disk(str(path))
    except IndexError:  # (datasets' own failure on a saved dataset of no rows: it has no data file)
        if not list(path.glob("*.arrow")):
            raise _NoRecords(f"{path}: the saved dataset has no records; it must hold at least one") from None
        raise
    except (OSError, ValueError, KeyError) as error:
        raise DataError(f"{path}: cannot be read as a saved dataset ({error}); save it again") from None
    bar.update(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()))
    return _check_rows(path, [_without_nulls(row) for row in dataset.to_list()], checker)


_READERS = {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet, "dataset": _read_dataset}


def _check_rows(path: Path, rows: list, checker: RecordChecker) -> list[Record]:
    if not rows:  # (said as an empty .json list is; not "no valid records" after skipping none)
        raise _NoRecords(f"{path}: holds no records; it must hold at least one record")
    records = []
    for number, row in enumerate(rows, start=1):
        try:
            records.append(checker.record(row, path, number, "record"))
        except RecordError as error:
            checker.bad(error, path, number, "record")
    return records


def _without_nulls(value):
    """A row from Arrow with its null fields left out. Arrow gives every row every column (and every
    struct every field) of the table, null where the row had none: a chat message would come back
    with "tool_calls": null, an alpaca record with "input": null. Left out, they read as they were
    written."""
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value
