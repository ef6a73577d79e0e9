"""Shared by the scripts in bench/: put a script's results into a Markdown file, in its own section.

Each script owns one section of the file, delimited by ``<!-- KEY:start -->`` and ``<!-- KEY:end -->``.
Writing replaces only that block, so several scripts share one file (docs/benchmarks.md) and a
re-run replaces its old numbers instead of adding a second copy.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

TITLE = "# Benchmarks"
PREAMBLE = "Every number here was measured by a script in bench/ on the machine named in its section."
REPO = Path(__file__).resolve().parent.parent

_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def markers(key: str) -> tuple[str, str]:
    """The start and end marker lines of section ``key``."""
    if not _KEY.fullmatch(key):
        raise ValueError(f"section key {key!r}: use letters, digits, '.', '_' and '-'")
    return f"<!-- {key}:start -->", f"<!-- {key}:end -->"


def write_section(path: Path, key: str, markdown: str) -> None:
    """Replace the block between the markers of ``key`` in ``path`` with ``markdown``.

    The file is created (with the benchmarks title and preamble) if it is missing or empty; the
    section is appended if the file has no markers for ``key``. Everything outside the block is
    kept byte for byte. A file with a start marker but no end marker (or two sections of the same
    key) is an error rather than a guess, so that a hand edit gone wrong is never overwritten.
    """
    start, end = markers(key)
    block = f"{start}\n{markdown.strip()}\n{end}"
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if not text.strip():
        text = f"{TITLE}\n\n{PREAMBLE}\n"

    starts, ends = text.count(start), text.count(end)
    if starts == ends == 0:
        new = text.rstrip("\n") + "\n\n" + block + "\n"
    elif starts == ends == 1 and text.index(start) < text.index(end):
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        new = before + block + after
    else:
        raise ValueError(
            f"{path}: expected one {start!r} followed by one {end!r}, found {starts} and {ends}; "
            "fix the file by hand"
        )

    # Write beside the file and rename: an interrupted run never leaves a half-written page.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(path)


def command_line(argv: list[str] | None = None) -> str:
    """The command that ran this script, as someone would type it from the repository root."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve()
    if script.is_relative_to(REPO):
        argv[0] = script.relative_to(REPO).as_posix()
    return shlex.join(["python", *argv])
