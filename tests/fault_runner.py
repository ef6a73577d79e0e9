"""Run the lowmem-ft CLI with a fault injected, as a separate process (tests/test_resume.py).

    python tests/fault_runner.py FAULT -- run tiny data.jsonl --out JOB ...

FAULT is one of:
    none                    run normally
    kill-in-write:N         SIGKILL this process halfway through writing a checkpoint file, at the
                            N-th checkpoint file write of the process (half the bytes are on disk)
    kill-after-write:N      SIGKILL right after the N-th checkpoint file write (between files)

The faults live here, in the tests, not in the package: they replace the one function through
which checkpoint files reach the disk.
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> None:
    fault, args = sys.argv[1], sys.argv[sys.argv.index("--") + 1 :]
    if fault != "none":
        kind, n = fault.split(":")
        install(kind, int(n))
    from lowmem_ft.cli import main as cli

    cli(args)


def install(kind: str, n: int) -> None:
    import lowmem_ft.checkpoint as checkpoint

    original = checkpoint._write_file
    calls = 0

    def faulty_write(path, data: bytes) -> None:
        nonlocal calls
        calls += 1
        if calls == n and kind == "kill-in-write":
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        original(path, data)
        if calls == n and kind == "kill-after-write":
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint._write_file = faulty_write


if __name__ == "__main__":
    main()
