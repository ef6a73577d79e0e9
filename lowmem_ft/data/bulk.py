"""What work over a whole data set needs: a million records take minutes to read and tokenise.

``progress_bar``: tqdm on stderr, shown unless the run is quiet (``-q``), like the training bar, and
only for work that takes more than a moment; it is cleared when done, so the run's own lines stay
together. ``bar_size``: how large every bar of the tool is. ``cycle_collector_paused``: Python's
cycle collector held off while records are made and tokenised.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys


def progress_bar(total: int, desc: str, unit: str, show: bool, unit_scale: bool = True):
    """A tqdm bar (a context manager); ``show`` False gives one that prints nothing. ``unit_scale``:
    counts as 343M rather than 343000000 (small counts then read 3.00)."""
    from tqdm import tqdm  # imported when data is read, not when the command line starts

    return tqdm(
        total=total, desc=desc, unit=unit, unit_scale=unit_scale, leave=False, delay=0.5,
        disable=not show or no_stderr(), **bar_size(),
    )  # fmt: skip


def no_stderr() -> bool:
    """Standard error was closed before the command started (`2>&-`: Python sets it to None), where
    tqdm would fail at its first refresh: the bars are not drawn."""
    return sys.stderr is None


def bar_size() -> dict:
    """tqdm's size options: the terminal's, followed as it is resized; 80 columns where the terminal
    says it has none, and 20 rows where it says it has none (a pseudo-terminal never given a size:
    `docker exec -t`, some CI runners), where tqdm would draw nothing at all."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):  # not a terminal (a pipe, a file): tqdm's own way
        return {"dynamic_ncols": True}
    if size.columns and size.lines:
        return {"dynamic_ncols": True}
    return {"ncols": size.columns or 80, "nrows": size.lines or 20}


@contextlib.contextmanager
def cycle_collector_paused():
    """Python's cycle collector, held off. Each of its full collections walks every live dict and
    list, and with a million records alive (tens of millions of them) and millions more made while
    tokenising, it ran often enough to take a fifth of the time. Reading and tokenising make no
    reference cycles, and it runs again as usual afterwards."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
