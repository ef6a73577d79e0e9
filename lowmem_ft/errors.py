"""Errors that reach the user as one line, never as a traceback."""

import errno


class UserError(Exception):
    """Something the user can fix: bad input, a missing model, an impossible budget.

    The CLI prints ``error: <message>`` and exits with ``exit_code``. The message says what is
    wrong and, where possible, what would work.
    """

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class DataError(UserError):
    """A problem with a data file; the message starts with ``file:line:``."""


class DiskError(UserError):
    """A write failed because the disk is full or not writable. The message says what could not be
    written, what is intact and what to do; exit code 4, so scripts can tell it from bad input (2)
    and from a plan that does not fit (`plan` exits 3)."""

    exit_code = 4


# errno values that mean "this disk will not take the write", as OSError and as the Rust I/O errors
# of safetensors and tokenizers report them ("... (os error 28)").
_DISK_FAULTS = {28: "the disk is full", 122: "the disk quota is exceeded", 30: "the file system is read-only"}


def disk_fault(exc: BaseException) -> str | None:
    """What is wrong with the disk, if ``exc`` is a write that failed on a full or read-only disk;
    None for anything else. safetensors raises its own SafetensorError, not OSError, for these."""
    import re

    if isinstance(exc, OSError) and exc.errno in _DISK_FAULTS:
        return _DISK_FAULTS[exc.errno]
    found = re.search(r"os error (\d+)", str(exc)) if type(exc).__name__ == "SafetensorError" else None
    return _DISK_FAULTS.get(int(found.group(1))) if found else None


def cannot_write_where_asked(exc: OSError, what: str, instead: str) -> UserError:
    """The error for a place the user named (--out, --plot, a job to resume) that refused a first,
    empty write: DiskError (exit 4) for a full disk or quota, as every write of the tool reports
    it; a plain UserError (exit 2) for a read-only file system or a missing right, which are the
    place chosen, not a disk that filled up. The line: "WHAT (what the system said); INSTEAD"."""
    fault = disk_fault(exc)
    full = fault is not None and exc.errno != errno.EROFS
    return (DiskError if full else UserError)(f"{what} ({fault or exc.strerror or exc}); {instead}")
