"""Run the lowmem-ft CLI with a fault injected, as a separate process (tests/test_resume.py).

    python tests/fault_runner.py FAULT -- run tiny data.jsonl --out JOB ...

or ``run(FAULT, ARGS, STDERR_FILE)`` in a process of its own (tests/processes.py).

FAULT is one of:
    none                    run normally
    kill-in-write:N         SIGKILL this process while it writes its N-th checkpoint file (a torn
                            write: the file is cut to half its bytes first)
    kill-after-write:N      SIGKILL right after the N-th checkpoint file write (between files)

The faults live here, in the tests, not in the package: they wrap the two functions through which
checkpoint files reach the disk.
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> None:
    fault, args = sys.argv[1], sys.argv[sys.argv.index("--") + 1 :]
    run(fault, args)


def run(fault: str, args: list[str], stderr: str | None = None) -> None:
    """The CLI with ``fault`` installed, in this process; ``stderr``: a file its output goes to
    (standard output is dropped), for a process forked from tests/processes.py."""
    if stderr is not None:
        with open(os.devnull, "w") as null, open(stderr, "w") as err:
            os.dup2(null.fileno(), 1)
            os.dup2(err.fileno(), 2)
    if fault != "none":
        kind, n = fault.split(":")
        install(kind, int(n))
    from lowmem_ft.cli import main as cli

    cli(args)


def install(kind: str, n: int) -> None:
    import lowmem_ft.checkpoint as checkpoint

    calls = 0

    def faulty(write):
        def wrapped(path, contents) -> None:
            nonlocal calls
            calls += 1
            write(path, contents)
            if calls != n:
                return
            if kind == "kill-in-write":
                os.truncate(path, os.path.getsize(path) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

        return wrapped

    checkpoint._write_file = faulty(checkpoint._write_file)
    checkpoint._write_tensors = faulty(checkpoint._write_tensors)


if __name__ == "__main__":
    main()
