"""The ranks of a job as torch.distributed sees them. With one rank every call is a no-op, so the
recipe reads the same with one process or several.

Every rank must make the same collective calls in the same order, so whatever decides whether a
collective happens (stop now? checkpoint now?) is agreed on first (``any``): a Ctrl-C that reaches
one rank a moment before the others, or a checkpoint timer that fires on one clock and not on
another, must not leave one rank in a collective the others never enter.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from lowmem_ft.distributed.ranks import Ranks

# A rank that stops answering (hung, not dead: a dead one is seen at once) fails the others'
# collectives after this, and the launcher stops the job; the last checkpoint is intact.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("LOWMEM_FT_COLLECTIVE_TIMEOUT", "600")))
LONG_WAIT = datetime.timedelta(hours=3)  # Group.wait_long: a rank's turn to load a model


class Group:
    def __init__(self, ranks: Ranks, device: torch.device = torch.device("cpu")):
        self.ranks, self.device = ranks, device
        self._mesh = None
        self._patient = None  # wait_long's group

    @classmethod
    def join(cls, device: torch.device) -> Group:
        """This process's group: the ranks torchrun started (gloo on CPU, NCCL on GPUs, one GPU per
        rank: cuda:LOCAL_RANK), or a group of one."""
        ranks = Ranks.from_env()
        if not ranks.several:
            return cls(ranks, device)
        if device.type == "cuda":
            device = torch.device("cuda", ranks.local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
        return cls(ranks, device)

    @property
    def several(self) -> bool:
        return self.ranks.several

    @property
    def main(self) -> bool:
        return self.ranks.main

    def sum(self, value: float) -> float:
        """``value`` summed over the ranks (in float64: counts of target tokens stay exact)."""
        if not self.several:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return float(total.item())

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank: what all ranks then do together."""
        return self.sum(float(bool(flag))) > 0

    def sum_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Sum ``tensors`` over the ranks, in place, in one collective (flattened: one message
        instead of one per tensor)."""
        if not self.several or not tensors:
            return
        if len(tensors) == 1 and tensors[0].is_contiguous():  # in place: no copy of a large one
            dist.all_reduce(tensors[0])
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a picklable object)."""
        if not self.several:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.several:
            dist.barrier()

    def wait_long(self) -> None:
        """A barrier that waits up to ``LONG_WAIT`` where the others give up after the collective
        timeout (minutes): for ranks that wait while others load a model, which may take long from
        a slow disk. Through a CPU (gloo) group of its own, made on first use."""
        if not self.several:
            return
        if self._patient is None:
            self._patient = dist.new_group(backend="gloo", timeout=LONG_WAIT)
        dist.barrier(group=self._patient)

    def device_mesh(self):
        """A 1-D mesh of all ranks, for FSDP2's ``fully_shard`` (made once)."""
        from torch.distributed.device_mesh import init_device_mesh

        if self._mesh is None:
            self._mesh = init_device_mesh(self.device.type, (self.ranks.size,))
        return self._mesh

    def leave(self) -> None:
        if self.several and dist.is_initialized():
            dist.destroy_process_group()


def lost_a_peer(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective (or the rendezvous store) failing because another rank went
    away, dead or silent: what the others see when one rank fails, not a failure of their own.
    NCCL and the store raise torch's DistError; gloo a RuntimeError from its transport."""
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and "gloo/transport" in str(exc)


def end_rank(code: int) -> NoReturn:
    """End this rank's process with ``code`` without the interpreter's teardown. A rank's job has
    been left (``Group.leave``) and everything it writes is written and closed by now; what the
    teardown would add is destroying the process group's C++ objects in whatever order the
    collector reaches them, which can abort a rank that had ended cleanly (seen on gloo: SIGABRT,
    "terminate called without an active exception", from a background thread during teardown).
    The agent would then report the rank killed, not its exit code, and the launcher say so
    instead of the job's own line."""
    for stream in (sys.stdout, sys.stderr):
        # closed, or a broken pipe: nothing more can be said there
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    logging.shutdown()  # flushes and closes the job's log files
    os._exit(code)


ONE = Group(Ranks())
