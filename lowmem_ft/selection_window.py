"""SIFT's selection window, before the first training step: the micro-batches whose gradients choose
the entries that train (drawn with their own seed, so the training order is any other method's)."""

from __future__ import annotations

import logging
import math
import time

import torch

from lowmem_ft.data import Batcher
from lowmem_ft.objective import loss_sum, target_count
from lowmem_ft.phases import phase
from lowmem_ft.prepare import Setup
from lowmem_ft.stop import StopRequest

log = logging.getLogger(__name__)  # the CLI shows it (cli.report_to_console)


def select_entries(s: Setup, stop: StopRequest | None = None) -> bool:
    """Let a method that chooses its trainable entries from data (SIFT) look at its selection
    window: micro-batches drawn with their own seed, so the training order is the same as any
    other method's. Their gradients choose; they are never applied. Returns whether it selected.

    A stop asked for (``stop``) during the window stops it at the next micro-batch, one process:
    nothing of it is kept, and resume selects again, the same entries (a window at 7B is minutes;
    it ran on to its end, and a window longer than the data has no end in sight). Several ranks
    sum their scores at the end and stop together after it."""
    n = s.method.selection_batches()
    if not n:
        return False
    started = time.perf_counter()
    micro = s.config.micro_batch_size
    draw = Batcher(s.data.train, micro, micro, s.tokenizer.pad_token_id, s.config.seed + 1)
    if n > draw.steps_per_epoch:
        log.warning(
            f"warning    --selection-batches {n} is more micro-batches than the training data makes "
            f"({draw.steps_per_epoch} of {micro}): the window sees examples more than once"
        )
    window = [draw.next_step()[0] for _ in range(n)]
    n_targets = max(1, sum(target_count(mb) for mb in window))
    scaler = torch.amp.GradScaler(s.device.type, enabled=s.compute_dtype == torch.float16)
    # With several ranks rank r scores micro-batches r, r + N, ... and the scores are summed over
    # the ranks; a rank with one fewer runs a pass that adds nothing (None), so that every rank runs
    # as many backwards and reaches each sum at the same moment.
    rank, ranks = s.group.ranks.rank, s.group.ranks.size
    share: list[dict | None] = window[rank::ranks]
    share += [None] * (math.ceil(n / ranks) - len(share))

    def backward(batch: dict | None) -> None:
        if stop is not None and stop.signal is not None and not s.group.several:
            raise KeyboardInterrupt  # the job is recorded as interrupted (execute)
        # Scaled like a training step; fp16 needs loss scaling so small gradients do not vanish.
        loss = loss_sum(s.model, window[0] if batch is None else batch, s.device, s.compute_dtype)
        scaler.scale(loss * (0.0 if batch is None else 1.0) / n_targets).backward()

    with phase("selection"):
        summary = s.method.select(share, backward)
    log.info(f"selection  {summary} ({time.perf_counter() - started:.1f}s)")
    return True
