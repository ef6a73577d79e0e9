"""What training minimises and how fast: the next-token loss summed over the tokens that carry
loss, and the learning rate of each optimizer step. The recipe (train.py) calls them; tests hold
them to transformers' own loss and to the schedule's formula."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from lowmem_ft.config import RunConfig
from lowmem_ft.data.tokenize import IGNORE_INDEX


def lr_at(step: int, max_steps: int, config: RunConfig) -> float:
    """Learning rate of optimizer step ``step``: linear warmup, then cosine/linear decay to min_lr.

    Sized and stepped in optimizer steps of the whole run (not per micro-batch, not per cycle).
    """
    warmup = round(config.warmup_ratio * max_steps)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if config.schedule == "constant":
        return config.lr
    progress = (step - warmup) / max(1, max_steps - warmup)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if config.schedule == "cosine" else 1 - progress
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * shape)


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    # No weight cache: with it, autocast keeps the 16-bit copy of every fp32 weight until the whole
    # forward ends, so activation checkpointing would still hold a copy of every layer's weights at
    # the end of the forward (12 GiB for a 7B model), which the plan does not count. Each weight is
    # cast once per forward either way; without checkpointing the backward keeps the copies anyway.
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)


def target_count(batch: dict) -> int:
    """Tokens that carry loss in a batch (after the shift), counted on the CPU labels: no device sync."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def loss_sum(model, batch: dict, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Sum of next-token cross-entropy over the tokens that carry loss.

    Summing (not averaging) per micro-batch lets the step divide by the number of target tokens of
    the whole optimizer step, so gradient accumulation gives the same gradient as one big batch.
    """
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    with autocast(device, dtype):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    # fp32 for the softmax: in 16 bits the log-probabilities of a 32k-150k vocabulary lose precision.
    logits = logits[:, :-1].flatten(0, 1).float()
    return F.cross_entropy(logits, targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
