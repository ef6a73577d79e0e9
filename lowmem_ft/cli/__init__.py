"""The command line: parse, call, print. Nothing here decides how training works.

lowmem-ft run tiny examples/python-qa.jsonl
lowmem-ft jobs

The commands are in training.py (run, resume, plan), show.py (export, methods, jobs) and
generate.py (generate); the options several of them share in options.py.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

import typer

import lowmem_ft
from lowmem_ft.cli import generate, show, training
from lowmem_ft.errors import DiskError, UserError, disk_fault

app = typer.Typer(
    name="lowmem-ft",
    help="Fine-tune 7B-class language models on one GPU that cannot hold them the usual way.",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lowmem-ft {lowmem_ft.__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Fine-tune 7B-class language models on one GPU that cannot hold them the usual way."""
    if ctx.invoked_subcommand is None:  # bare `lowmem-ft`: show the help, which is not an error
        typer.echo(ctx.get_help())


app.command(epilog=training.RUN_EPILOG)(training.run)
app.command(epilog=training.RESUME_EPILOG)(training.resume)
app.command(epilog=training.PLAN_EPILOG)(training.plan)
app.command(epilog=show.EXPORT_EPILOG)(show.export)
app.command(epilog=generate.GENERATE_EPILOG)(generate.generate)
app.command()(show.methods)
app.command(epilog=show.JOBS_EPILOG)(show.jobs)


class _Console(logging.Handler):
    """The library's reports (the ``lowmem_ft`` logger) as lines on standard output, whichever
    stream is standard output when they are written (tests capture it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            typer.echo(self.format(record))
        except Exception:
            self.handleError(record)


class _MayGoUnread:
    """Standard output or error while a command runs. When the reader of the pipe it writes to has
    gone (`lowmem-ft run ... | head`, `2>&1 | head`), what is written from then on goes nowhere and
    the command goes on: a run whose lines nobody reads still finishes (it failed with
    BrokenPipeError at the progress bar's next refresh, or the next evaluation's line)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as error:
            self._gone(error)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as error:
            self._gone(error)

    def _gone(self, error: OSError) -> None:
        """The stream's descriptor onto /dev/null: its later writes, and its flush at exit, succeed.
        For a pipe whose reader has gone, or a descriptor closed before the command started
        (`2>&-`); any other error (a full disk under `> log`) is raised."""
        if error.errno not in (errno.EPIPE, errno.EBADF):
            raise error
        with contextlib.suppress(OSError, ValueError):  # (no descriptor: a test's captured stream)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)

    def __getattr__(self, name: str):  # encoding, isatty, fileno, buffer: the stream's own
        return getattr(self._stream, name)


@contextlib.contextmanager
def _output_that_may_go_unread():
    saved = sys.stdout, sys.stderr  # (None where the descriptor was closed: `>&-`, left as it is)
    sys.stdout, sys.stderr = (_MayGoUnread(stream) if stream is not None else None for stream in saved)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


def report_to_console() -> None:
    """Show the library's INFO and WARNING lines (once, however often it is called)."""
    logger = logging.getLogger("lowmem_ft")
    if not any(isinstance(handler, _Console) for handler in logger.handlers):
        logger.addHandler(_Console())
    logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point: every error the user can fix is one line on stderr and a non-zero exit code."""
    from lowmem_ft.distributed.ranks import Ranks

    code = _command(argv)
    if Ranks.from_env().several:  # a rank torchrun started: ended as the launcher's ranks are
        from lowmem_ft.distributed.group import end_rank

        end_rank(code)
    sys.exit(code)


def _kept_by_resume(exc, ctx) -> str | None:
    """For an option of `run` given to `resume` (``--lr``), what resume does with it, rather than
    "no such option"."""
    option = getattr(exc, "option_name", None)
    run = ctx.parent.command.commands.get("run") if ctx is not None and ctx.parent is not None else None
    if ctx is None or ctx.info_name != "resume" or option is None or run is None:
        return None
    if not any(option in param.opts for param in run.params):
        return None
    return (
        f"{option} is a setting of the job, which resume keeps as it was; to train with another, "
        "start a new job with `lowmem-ft run`"
    )


# typer's own words for a value that is not a number (pydantic's), and ours
_NOT_A_NUMBER = {
    "Input should be a valid integer": "is not a whole number",
    "Input should be a valid number": "is not a number",
}


def _not_a_number(exc, args: list[str]) -> str | None:
    """``--max-steps x``: "'x' is not a whole number", with the value as given, rather than
    typer's "Input should be a valid integer, unable to parse string as an integer"."""
    param, message = getattr(exc, "param", None), getattr(exc, "message", "")
    said = next((ours for theirs, ours in _NOT_A_NUMBER.items() if message.startswith(theirs)), None)
    if param is None or said is None or not param.opts:
        return None
    given = None
    for i, arg in enumerate(args):  # the last value given counts, as click takes it
        name, equals, value = arg.partition("=")
        if name in param.opts and (equals or i + 1 < len(args)):
            given = value if equals else args[i + 1]
    return None if given is None else f"{param.opts[0]} {given!r} {said}"


def _keep_traceback() -> Path | None:
    """The traceback of the exception being handled, in a file of the temporary directory (a job
    keeps its own in its error.log; a failure outside a job, in `generate` or `export`, had none)."""
    import tempfile
    import traceback

    try:
        handle, name = tempfile.mkstemp(prefix="lowmem-ft-error-", suffix=".log")
        with os.fdopen(handle, "w") as out:
            out.write(traceback.format_exc())
    except OSError:
        return None
    return Path(name)


def _unexpected(exc: Exception) -> int:
    """A bug or a failure during training: one line, the traceback in a file."""
    typer.echo(f"error: {type(exc).__name__}: {exc}", err=True)
    kept = getattr(exc, "traceback_file", None) or _keep_traceback()
    if kept is not None:
        typer.echo(f"the traceback is in {kept} (please include it if you report this)", err=True)
    return 1


# Errors of a path the user gave (or its folder) that the user can mend: said as what they are.
_PATH_ERRORS = {
    errno.EACCES,
    errno.EPERM,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.ELOOP,
    errno.EROFS,
    errno.ENAMETOOLONG,
}


def _path_problem(exc: OSError) -> str | None:
    """One line for an OSError about a path the user can mend (permissions, a file where a folder
    should be, a read-only file system), or None for any other."""
    if exc.errno not in _PATH_ERRORS or not exc.filename:
        return None
    return (
        f"{exc.filename}: {(exc.strerror or str(exc)).lower()}; check the path and its folders' permissions"
    )


# Options whose empty value means something: an empty prompt generates from the start of a text.
_MAY_BE_EMPTY = ("--prompt", "-p")


def _empty_argument(args: list[str]) -> str | None:
    """What an empty argument ("") was given for, in one line, or None. To pathlib an empty path is
    the current folder: `run tiny ""` read every file there, and `--eval-data ""` evaluated on the
    training file among them."""
    for i, arg in enumerate(args):
        before = args[i - 1] if i else ""
        if arg == "" and before not in _MAY_BE_EMPTY:
            if before.startswith("-"):
                return f"{before} was given an empty value; give one (see --help)"
            return 'an argument is empty (""); give a path, a name or a value in its place (see --help)'
        if arg.startswith("--") and arg.endswith("=") and arg[:-1] not in _MAY_BE_EMPTY:
            return f"{arg[:-1]} was given an empty value; give one (see --help)"
    return None


def _command_path(args: list[str]) -> str:
    """``lowmem-ft COMMAND`` for the command ``args`` name (a usage error that click raises before
    the command's context exists: an option's missing value), or ``lowmem-ft``."""
    names = {command.name or command.callback.__name__ for command in app.registered_commands}
    return f"lowmem-ft {args[0]}" if args and args[0] in names else "lowmem-ft"


def _command(argv: list[str] | None) -> int:
    """Run the command; its exit code."""
    from lowmem_ft.distributed.ranks import Ranks
    from lowmem_ft.hardware import configure_cuda_allocator

    configure_cuda_allocator()  # before anything initialises CUDA: the allocator reads it once
    report_to_console()
    if not Ranks.from_env().main:  # a rank torchrun started: rank 0 says it (the others would repeat it)
        logging.getLogger("lowmem_ft").setLevel(logging.WARNING)
    # SIGTERM (kill, a scheduler stopping us) is treated like Ctrl-C: the job records 'interrupted'.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # (__main__ had its own, for the imports)
    args = sys.argv[1:] if argv is None else argv
    try:
        empty = _empty_argument(args)
        if empty is not None:
            raise UserError(empty)
        # Without standalone mode, typer returns (not raises) the code of `typer.Exit`.
        with _output_that_may_go_unread():
            code = app(args=argv, prog_name="lowmem-ft", standalone_mode=False)
    except UserError as exc:
        if str(exc):  # (empty: said already, by the rank that failed)
            typer.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except typer.TyperException as exc:  # usage errors: unknown option, bad value, missing argument
        ctx = getattr(exc, "ctx", None)
        hint = f"; see '{ctx.command_path if ctx is not None else _command_path(args)} --help'"
        said = _kept_by_resume(exc, ctx) or _not_a_number(exc, args) or exc.format_message().rstrip(".")
        typer.echo(f"error: {said}{hint}", err=True)
        return getattr(exc, "exit_code", 2)
    except OSError as exc:
        fault = disk_fault(exc)
        if fault is not None and exc.errno != errno.EROFS:  # (writes the tool does not wrap itself)
            where = f"{exc.filename}: " if exc.filename else ""
            typer.echo(f"error: {where}{fault}; free space and run the command again", err=True)
            return DiskError.exit_code
        problem = _path_problem(exc)
        if problem is None:
            return _unexpected(exc)
        typer.echo(f"error: {problem}", err=True)
        return 2
    except RuntimeError as exc:
        if not str(exc).startswith("Symlink loop"):  # (pathlib's resolve(): a link that points to itself)
            return _unexpected(exc)
        typer.echo(f"error: {exc}; mend the link", err=True)
        return 2
    except Exception as exc:
        return _unexpected(exc)
    if code == 130:  # a Ctrl-C that no command took in itself: typer ends it without a word
        typer.echo("interrupted", err=True)
    return code if isinstance(code, int) else 0
