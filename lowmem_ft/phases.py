"""The phases of a training step, named where the recipe runs them.

Two things need to know which phase is running: an out-of-memory error, which should say where it
happened and what would fit (the micro-batch retry helps only in the forward/backward), and the
memory trace (lowmem_ft/looptrace.py), which reports the phase of each plan's peak.

    with phase("optimizer step"):
        method.optimizer.step()

An out-of-memory error inside becomes ``OutOfMemoryIn`` (still a ``torch.OutOfMemoryError``, so
handlers of that keep working) carrying the innermost phase's name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# What to do when a phase runs out of memory; {job} is the job directory, {smaller} a smaller
# --gpu-mem than the plan used. Forward/backward has its own retry (train.accumulate_gradients).
ADVICE = {
    "setup": "free the GPU (another process?) or pass a smaller --gpu-mem so the planner leaves room",
    "selection": "resume with a smaller budget so the planner scores in more passes: "
    "`lowmem-ft resume {job} --gpu-mem {smaller}`",
    "begin step": "resume with a smaller budget (smaller groups, or optimizer state in 8 bits): "
    "`lowmem-ft resume {job} --gpu-mem {smaller}`",
    "forward/backward": "resume with --micro-batch-size 1 or a smaller budget: "
    "`lowmem-ft resume {job} --gpu-mem {smaller}`",
    # (the retry halves the micro-batch down to 1; past that only a plan that keeps less will do)
    "forward/backward, micro-batch 1": "even micro-batch 1 does not fit; resume with a smaller budget, "
    "so that the planner keeps less on the GPU (or says what would fit): "
    "`lowmem-ft resume {job} --gpu-mem {smaller}`",
    "gradients": "resume with a smaller budget: `lowmem-ft resume {job} --gpu-mem {smaller}`",
    "optimizer step": "resume with a smaller budget: `lowmem-ft resume {job} --gpu-mem {smaller}`",
    "end step": "resume with a smaller budget: `lowmem-ft resume {job} --gpu-mem {smaller}`",
    "evaluation": "resume with a smaller --micro-batch-size (evaluation uses the training micro-batch): "
    "`lowmem-ft resume {job} --micro-batch-size 1`",
    "checkpoint": "resume with a smaller budget: `lowmem-ft resume {job} --gpu-mem {smaller}`",
}

_running: list[str] = []


class OutOfMemoryIn(torch.OutOfMemoryError):
    """Out of memory in a named phase."""

    def __init__(self, phase_name: str, detail: str = ""):
        super().__init__(f"out of memory in {phase_name}: {detail}")
        self.phase = phase_name


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    _running.append(name)
    try:
        yield
    except OutOfMemoryIn:
        raise  # an inner phase has named it already
    except torch.OutOfMemoryError as exc:
        # Only the first line: the allocator's message is long, and the traceback (which would pin
        # the step's tensors) is dropped.
        raise OutOfMemoryIn(name, str(exc).splitlines()[0] if str(exc) else "") from None
    finally:
        _running.pop()


def current_phase() -> str:
    """The innermost phase running now ("setup" outside the loop)."""
    return _running[-1] if _running else "setup"
