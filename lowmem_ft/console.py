"""What a run says on the terminal before its first step, and the one line an out-of-memory error
becomes."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from lowmem_ft.jobs import Job
from lowmem_ft.phases import ADVICE, OutOfMemoryIn
from lowmem_ft.sizes import format_bytes

if TYPE_CHECKING:
    from lowmem_ft.prepare import Setup

log = logging.getLogger(__name__)  # the CLI shows it (cli.report_to_console)


def _end_of_sequence_mismatch(s: Setup) -> str | None:
    """Training ends each example with the tokenizer's end-of-sequence token, and transformers'
    generate stops at the ones the model's generation config names: where they differ, the fine-tuned
    model runs on past where it learned to stop."""
    taught = s.tokenizer.eos_token_id
    config = getattr(s.model, "generation_config", None)
    stops = getattr(config, "eos_token_id", None)
    stops = [stops] if isinstance(stops, int) else list(stops or [])
    if taught is None or not stops or taught in stops:
        return None
    return (
        f"examples end with the tokenizer's end-of-sequence token {taught}, and the model's generation "
        f"config stops at {', '.join(map(str, stops))}: generation will not stop where training taught; "
        "make eos_token_id agree (config.json, generation_config.json)"
    )


def print_header(s: Setup, job: Job) -> None:
    d = s.data
    log.info(f"model      {s.resolved.name} ({s.resolved.source}), {s.model_params:,} parameters")
    if (mismatch := _end_of_sequence_mismatch(s)) is not None:
        log.warning(f"warning    {mismatch}")
    log.info(f"method     {s.method.name}: {s.method.summary}; {s.method.describe_trainable()}")
    log.info(
        f"data       {s.config.data} ({d.format}): {d.describe(s.config)}"
        + (f", {d.skipped_lines} bad line{'s' * (d.skipped_lines != 1)} skipped" if d.skipped_lines else "")
    )
    for warning in d.warnings(s.config):
        log.warning(f"warning    {warning}")
    context = getattr(s.resolved.config, "max_position_embeddings", None)
    if isinstance(context, int) and s.config.seq_len > context:
        log.warning(
            f"warning    --seq-len {s.config.seq_len} is longer than {s.resolved.name}'s context "
            f"({context} positions, max_position_embeddings): it never saw positions beyond it; "
            f"--seq-len {context} stays within it"
        )
    for unused in s.config.unused_options():
        log.warning(f"warning    {unused}")
    if s.config.gpu_mem is not None and s.device.type != "cuda":  # (the planner plans host memory alone)
        log.warning(
            f"warning    --gpu-mem {s.config.gpu_mem} is a GPU's budget, and this run trains on the "
            f"{s.device.type.upper()}: it plans for host memory (--cpu-mem sets that budget)"
        )
    ranks = s.group.ranks.size
    per_rank = s.config.batch_size // ranks  # (one process: the whole batch)
    micro = min(s.config.micro_batch_size, per_rank)
    log.info(
        f"training   {s.max_steps} step{'s' if s.max_steps != 1 else ''} of {s.config.batch_size} examples "
        + (f"({ranks} ranks × " if ranks > 1 else "(")
        + f"{math.ceil(per_rank / micro)} × micro-batch {micro}), "
        f"lr {s.config.lr:g}"
        + (" (the default for this method and size)" if s.lr_is_default else "")
        + f" {s.config.schedule}, "
        f"{s.device.type} {str(s.compute_dtype).removeprefix('torch.')}"
        + (", activation checkpointing" if s.config.gradient_checkpointing else "")
    )
    streamer = getattr(s.method, "streamer", None)
    if streamer is not None:
        log.info(
            f"streaming  {len(streamer.host)} of {s.resolved.config.num_hidden_layers} decoder layers from "
            f"host memory ({format_bytes(streamer.host_bytes())}) through {len(streamer.buffers)} buffers "
            f"of {format_bytes(streamer.device_bytes() / len(streamer.buffers))}"
            + (" (--stream)" if s.config.streams_every_layer else "")
        )
    if s.plan is not None:
        where = "GPU" if s.plan.device == "cuda" else "host"
        peak = s.plan.gpu_peak_bytes if s.plan.device == "cuda" else s.plan.host_peak_bytes
        budget = s.plan.gpu_budget_bytes if s.plan.device == "cuda" else s.plan.host_budget_bytes
        shown_elsewhere = {
            "micro_batch_size",
            "gradient_checkpointing",
            "gradient_accumulation",
            "batch_size",
        }
        chosen = "".join(f", {k}={v}" for k, v in s.plan.settings.items() if k not in shown_elsewhere)
        log.info(
            f"plan       peak ≈ {format_bytes(peak)} of {format_bytes(budget)} {where}{chosen} (plan.json)"
        )
    log.info(f"job        {job.dir}")
    c = s.config
    every = [f"every {c.save_every} steps"] if c.save_every else []
    every += [f"every {c.save_every_minutes:g} min"] if c.save_every_minutes else []
    log.info(
        f"checkpoint {', '.join(every + ['at the end and on Ctrl-C'])}; the newest {c.keep_checkpoints} "
        f"kept in {job.dir / 'checkpoints'}"
    )


def out_of_memory_message(s: Setup, job: Job, exc: OutOfMemoryIn) -> str:
    budget = s.plan.gpu_budget_bytes if s.plan is not None and s.plan.device == "cuda" else 0
    smaller = format_bytes(0.9 * budget).replace(" ", "") if budget else "SIZE"
    last = job.record.get("last_checkpoint")
    where = f"from {last['dir']}" if last else "from the start (no checkpoint was saved yet)"
    advice = ADVICE[exc.phase]
    if exc.phase == "forward/backward" and s.config.micro_batch_size <= 1:
        advice = ADVICE["forward/backward, micro-batch 1"]
    return (
        f"out of GPU memory in {exc.phase} at step {job.record.get('step', 0) + 1}; the job can continue "
        f"{where}: {advice.format(job=job.dir, smaller=smaller)}"
    )
