"""Stopping a run cleanly: Ctrl-C or SIGTERM ends the current step, saves a checkpoint and marks the
job interrupted (a second Ctrl-C stops at once)."""

from __future__ import annotations

import signal
import sys
import threading

from lowmem_ft.jobs import Job


class RunInterrupted(Exception):
    """Ctrl-C or SIGTERM during training: the job directory has been marked 'interrupted'."""

    def __init__(self, job: Job):
        last = job.record.get("last_checkpoint")
        saved = f"the last checkpoint is {last['dir']}" if last else "no checkpoint was saved yet"
        super().__init__(
            f"interrupted at step {job.record.get('step', 0)}; {saved}; "
            f"continue with `lowmem-ft resume {job.dir}`"
        )
        self.job = job


class StopRequest:
    """The first SIGINT/SIGTERM asks the loop to finish its step, save and stop; the second stops
    at once (KeyboardInterrupt), leaving the last checkpoint as it was.

    ``announce``: the signals whose arrival is said at once. One rank of several says SIGINT only
    (rank 0; the user's Ctrl-C): the SIGTERM a rank gets comes from torchrun's agent, which also sends
    it when another rank failed, and the launcher then says what happened, once."""

    def __init__(self, announce: tuple[str, ...] = ("SIGINT", "SIGTERM")):
        self.signal: str | None = None
        self.announce = announce
        self._previous: dict = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = {
                sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)
            }
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        if self.signal not in self.announce:
            return
        # print, not logging: logging takes a lock that the interrupted code may be holding
        print(
            f"\n{self.signal}: finishing this step and saving a checkpoint (press Ctrl-C again to stop now)",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
