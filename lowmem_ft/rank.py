"""One rank of a job started by `--nproc N` (distributed/launch.py): ``python -m lowmem_ft.rank
run|resume PAYLOAD.json [--quiet]``. It runs what `lowmem-ft run` / `resume` would, as a rank;
only rank 0 prints its progress (the others' output would repeat it N times).

A rank's last words (an error, "interrupted ...") are not printed but written next to the payload
(``rank-K.txt``): the launcher prints those of the rank that ended first, once. Printed here, the
same bad input would be said N times, or not at all when another rank failed first and the agent
stopped rank 0 before it could say it.

A module of the package's top level, not of ``lowmem_ft.cli``: ``python -m`` imports the package
around a module first, and the command line's (Typer and the rest, a third of a second) would run
before this module could say how a stop while starting ends."""

from __future__ import annotations

import os
import signal
import sys

INTERRUPTED = "interrupted before training started; nothing was lost"


def stopped_while_starting(signum, frame) -> None:
    """A stop while the rank is still importing torch (seconds): the agent passing on a Ctrl-C, or
    stopping this rank because another failed. The rank ends at once, leaving the line one process
    says (the launcher says rank 0's), not a traceback of the import it interrupted."""
    try:  # (what it needs may be the very import interrupted, half done: the line is then not left)
        from pathlib import Path

        from lowmem_ft.distributed.launch import last_words_file
        from lowmem_ft.distributed.ranks import Ranks

        last_words_file(Path(sys.argv[2]), Ranks.from_env().rank).write_text(INTERRUPTED)
    except Exception:
        pass
    os._exit(130)


if __name__ == "__main__":  # first, before anything is imported (below); main() then stops as a rank does
    for _stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(_stop, stopped_while_starting)

import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

from torch.distributed.elastic.multiprocessing.errors import record  # noqa: E402

from lowmem_ft.distributed.group import end_rank, lost_a_peer  # noqa: E402
from lowmem_ft.distributed.launch import LAUNCHER_PID, PEER_LOST, last_words_file  # noqa: E402
from lowmem_ft.distributed.ranks import Ranks  # noqa: E402


def end_with_the_launcher() -> None:
    """A rank ends when the process that started it does. The ranks run in sessions of their own,
    out of reach of the terminal and of a scheduler's signal to the launcher's group; a launcher
    killed outright (kill -9, or a signal while it was still starting them) would leave them
    training, or waiting for its store, with nobody to report to. On Linux the kernel tells this
    rank (SIGHUP) when its parent dies, and the rank stops as on SIGTERM: it finishes its step,
    saves it and ends. (The kernel may tell it more than once; one stop is asked for, or the second
    would stop it at once, unsaved.)"""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    def launcher_gone(signum, frame) -> None:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGHUP, launcher_gone)
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGHUP)
    if not launcher_alive():  # it died before the line above
        launcher_gone(None, None)


def launcher_alive() -> bool:
    """Whether the `lowmem-ft` that started this rank is still its parent (a dead one's ranks are
    the init process's)."""
    launcher = os.environ.get(LAUNCHER_PID)
    return launcher is None or os.getppid() == int(launcher)


@record  # a rank's traceback reaches the agent, which reports it
def main(argv: list[str]) -> None:
    from lowmem_ft.cli import report_to_console
    from lowmem_ft.errors import UserError
    from lowmem_ft.stop import RunInterrupted

    end_with_the_launcher()
    command, payload_file = argv[0], Path(argv[1])
    show_progress = "--quiet" not in argv
    payload = json.loads(payload_file.read_text())
    ranks = Ranks.from_env()
    if ranks.main:
        report_to_console()
    else:
        logging.getLogger("lowmem_ft").setLevel(logging.WARNING)

    def leave_word(line: str) -> None:
        if launcher_alive():
            last_words_file(payload_file, ranks.rank).write_text(line)
        else:  # nobody is left to read it: the launcher's scratch directory (the payload) goes
            shutil.rmtree(payload_file.parent, ignore_errors=True)

    stop = StopOnce()
    stop.install()
    ending = (INTERRUPTED, 130)  # the line this rank ends with, and its exit code; None: it trained
    try:
        try:
            if command == "run":
                from lowmem_ft.config import RunConfig
                from lowmem_ft.start import run

                run(RunConfig.from_json(payload["config"]), show_progress=show_progress and ranks.main)
            else:
                from lowmem_ft.resume import resume

                resume(Path(payload["job"]), payload["overrides"], show_progress=show_progress and ranks.main)
            ending = None
        except RunInterrupted as exc:
            ending = (str(exc), 130)
        except UserError as exc:  # the same bad input on every rank
            ending = (f"error: {exc}", exc.exit_code)
        except Exception as exc:  # one line (the job's error.log has rank 0's traceback), not N tracebacks
            first_line = (str(exc).strip().splitlines() or [""])[0]
            # a rank that failed only because another went away says so by its exit code: the
            # launcher then reports the other (its error, or how it was killed), the cause
            code = PEER_LOST if lost_a_peer(exc) else 1
            ending = (f"error: rank {ranks.rank}: {type(exc).__name__}: {first_line}", code)
        stop.leaving = True
    except KeyboardInterrupt:
        # Stopped while setting up (Ctrl-C, or the agent because another rank failed), or while this
        # rank was taking in its own failure: the same bad input fails every rank at about the same
        # moment, and the agent, seeing another end first, stops this one (a traceback here once
        # stood under the command's one line). The launcher says the other rank's line.
        pass
    # From here on no stop raises (StopOnce): the rank is leaving, with the line it chose.
    if ending is not None:
        leave_word(ending[0])
        end_rank(ending[1])
    if not launcher_alive():
        leave_word("")
    end_rank(0)


class StopOnce:
    """A rank's SIGTERM/SIGINT handler outside training (training has its own: it finishes the step
    and saves it). The agent stops every rank with SIGTERM when one fails; the first stop raises
    KeyboardInterrupt, as `lowmem-ft` does on Ctrl-C, and the rank unwinds (a job rank 0 was
    creating is removed, not left half-written). Any later stop, or one arriving once the rank is
    leaving, is ignored: a KeyboardInterrupt raised while the rank writes its last words or exits
    would print a traceback under the command's one line (seen on CI), and a second one could
    escape the clause that takes in the first. A rank that is leaving ends in moments anyway.

    A stop can also arrive while a finalizer runs (an object's ``__del__``, as tqdm's bars have, or a
    weakref callback), where Python cannot raise: it prints "Exception ignored in ..." under the
    command's line, and the rank would go on as if never stopped. ``unraisable`` (installed as
    ``sys.unraisablehook``) takes such a KeyboardInterrupt and asks for the stop again a moment
    later (SIGALRM), once the finalizer has returned, where it can raise (seen on CI)."""

    def __init__(self) -> None:
        self.leaving = False
        self._signal: int | None = None

    def __call__(self, signum, frame) -> None:
        if not self.leaving:
            self.leaving, self._signal = True, signum
            raise KeyboardInterrupt

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM):
            signal.signal(sig, self)
        sys.unraisablehook = self.unraisable

    def unraisable(self, unraisable) -> None:
        if unraisable.exc_type is KeyboardInterrupt and self._signal is not None:
            # (not a signal now: its handler would run here, inside this hook, and be lost again)
            self.leaving, self._signal = False, None
            signal.setitimer(signal.ITIMER_REAL, 0.01)
            return
        sys.__unraisablehook__(unraisable)


if __name__ == "__main__":
    main(sys.argv[1:])
