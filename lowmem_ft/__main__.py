"""`lowmem-ft` and `python -m lowmem_ft`. A Ctrl-C (or SIGTERM) while the command line is still being
imported (torch, transformers, Typer: a second or two) ends it with one line and exit code 130, not
a traceback of the import it interrupted; nothing has been done by then."""

import os
import signal
import sys


def main() -> None:
    def stopped_while_starting(signum, frame) -> None:
        print("interrupted while starting; nothing was done", file=sys.stderr, flush=True)
        os._exit(130)

    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, stopped_while_starting)
    from lowmem_ft.cli import main as run_command  # (it takes the signals over: cli._command)

    try:
        run_command()  # (it exits: SystemExit)
    finally:
        # The command has ended, and said how: a signal in the moment the interpreter takes to shut
        # down would otherwise end it by that signal, as if killed (a scheduler would record a job
        # that is done as killed).
        for stop in (signal.SIGINT, signal.SIGTERM):
            signal.signal(stop, signal.SIG_IGN)


if __name__ == "__main__":
    main()
