"""The training recipe: setup → loop → save, top to bottom.

    lowmem-ft run tiny examples/python-qa.jsonl   # the CLI calls start.run(config), which calls execute

Everything that can fail because of the user's input (flags, model, data) is checked in `setup`
(prepare.py) *before* the job directory is written, so a bad invocation leaves nothing behind. The
loop never branches on the method's name: methods plug in through the hooks of
`lowmem_ft.methods.Method`. What a checkpoint holds is train_state.py; stopping on Ctrl-C/SIGTERM,
stop.py; what the run prints before its first step, console.py; writing the result at the end, finish.py;
the loss and the learning-rate schedule, objective.py.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import time
import traceback
from dataclasses import dataclass

import torch
from tqdm import tqdm

from lowmem_ft.checkpoint import Restored
from lowmem_ft.console import out_of_memory_message
from lowmem_ft.data import eval_batches
from lowmem_ft.data.bulk import bar_size, no_stderr, progress_bar
from lowmem_ft.distributed.sharded import full_value, is_sharded, reshard
from lowmem_ft.errors import DiskError, UserError, disk_fault
from lowmem_ft.files import write_json_atomic
from lowmem_ft.finish import export_result, report_how_it_went
from lowmem_ft.hardware import PeakMemory
from lowmem_ft.jobs import Job
from lowmem_ft.metric_logs import open_logs
from lowmem_ft.models.saving import model_dtype_on_disk
from lowmem_ft.objective import loss_sum, lr_at, target_count
from lowmem_ft.phases import OutOfMemoryIn, phase
from lowmem_ft.pictures import LossPicture
from lowmem_ft.precision import DTYPES
from lowmem_ft.prepare import Setup
from lowmem_ft.selection_window import select_entries
from lowmem_ft.sizes import format_bytes
from lowmem_ft.stop import RunInterrupted, StopRequest
from lowmem_ft.train_state import Checkpoints, Progress, restore

log = logging.getLogger(__name__)  # the CLI shows it (cli.report_to_console)


# -- pieces of the loop ---------------------------------------------------------------------------
# no_grad, not inference_mode: tensors a method makes during evaluation (streamed layers' buffers,
# HiFT's groups) may take part in a backward later, which inference tensors cannot.
@torch.no_grad()
def evaluate(s: Setup, show_progress: bool = False) -> float | None:
    """Mean loss per target token over the evaluation set (at most --max-eval-examples examples).

    It runs micro-batch by micro-batch, of the size training uses (the planned one, or the smaller
    one an out-of-memory retry chose), with no gradients and no activations kept for a backward: it
    needs less memory than a training step, never more.
    """
    if not s.data.eval:
        return None
    s.model.eval()
    total, count = 0.0, 0
    micro = s.config.micro_batch_size
    batches = lambda: eval_batches(s.data.eval, micro, s.tokenizer.pad_token_id)  # noqa: E731
    # With several ranks, rank r evaluates batches r, r + N, ...; every rank runs as many forwards
    # (a sharded model gathers its weights in each), the short ones an extra that is not counted.
    rank, ranks = s.group.ranks.rank, s.group.ranks.size
    n_batches = math.ceil(len(s.data.eval) / micro)
    turns, done = math.ceil(n_batches / ranks), 0
    bar = progress_bar(turns, "evaluation", "batch", show_progress, unit_scale=False)
    with phase("evaluation"), bar:
        for batch in itertools.islice(batches(), rank, None, ranks):
            total += loss_sum(s.model, batch, s.device, s.compute_dtype).item()
            count += target_count(batch)
            done += 1
            bar.update(1)
        for _ in range(turns - done):
            loss_sum(s.model, next(batches()), s.device, s.compute_dtype)
    # FSDP keeps the root's weights gathered after a forward, for the backward that would follow;
    # none does here: shard them again (the whole model's outer weights on every rank otherwise).
    reshard(s.model)
    s.model.train()
    return s.group.sum(total) / max(s.group.sum(count), 1)


def execute(s: Setup, job: Job, restored: Restored | None, show_progress: bool) -> Job:
    """Train and record how it ended in job.json; the lock is released however it ends."""
    try:
        train(s, job, show_progress, restored)
    except RunInterrupted:
        raise
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, the last checkpoint stays valid
        job.update_if_possible(status="interrupted")
        raise RunInterrupted(job) from None
    except UserError as exc:  # diverged, disk full: one line
        job.update_if_possible(status="failed", error=str(exc))
        raise
    except OutOfMemoryIn as exc:  # the last checkpoint is intact: say where, and what would fit
        message = out_of_memory_message(s, job, exc)
        job.update_if_possible(status="failed", error=message, out_of_memory_in=exc.phase)
        raise UserError(message) from None
    except Exception as exc:
        reason = disk_fault(exc)
        if reason is not None:  # a write this recipe does not wrap itself
            kept = (
                "its last checkpoint is intact"
                if job.record.get("last_checkpoint")
                else "no checkpoint was saved yet (resume starts from the beginning)"
            )
            message = (
                f"could not write to {job.dir}: {reason}; {kept}; "
                f"free space and run `lowmem-ft resume {job.dir}`"
            )
            job.update_if_possible(status="failed", error=message)
            raise DiskError(message) from None
        with contextlib.suppress(OSError):
            name = "error.log" if s.group.main else f"error-rank{s.group.ranks.rank}.log"
            (job.dir / name).write_text(traceback.format_exc())
            exc.traceback_file = job.dir / name  # (the command line names it)
        job.update_if_possible(status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        job.close_logs()
        job.lock.release()
        # Records still being encoded in the background are no longer needed; last, as it waits
        # for the chunk being encoded (a second Ctrl-C then leaves the logs and the lock done).
        s.data.train.close()
    return job


def train(s: Setup, job: Job, show_progress: bool, restored: Restored | None = None) -> None:
    config, model, method = s.config, s.model, s.method
    # fp16 overflows without loss scaling; bf16 and fp32 need none (the scaler is then a no-op).
    scaler = torch.amp.GradScaler(s.device.type, enabled=s.compute_dtype == torch.float16)
    memory = PeakMemory(s.device)
    picture = LossPicture(
        job.dir, f"{job.dir.name}: {s.resolved.name}, --method {s.method.name}", enabled=s.group.main
    )
    checkpoints = Checkpoints(s, job, scaler, on_save=picture.at_checkpoint)

    announce = ("SIGINT", "SIGTERM") if not s.group.several else ("SIGINT",) if s.group.main else ()
    with StopRequest(announce) as stop:
        if restored is not None:
            progress = restore(s, scaler, job, restored)
            restored.state.clear()  # what restore did not take over would otherwise stay in host memory
        else:
            progress = Progress()
        # (after restore, which cut metrics.jsonl back to the checkpoint: the steps after it come again)
        if s.group.main:
            job.logs = open_logs(job.dir, config.log, first_step=progress.step + 1 if restored else 0)
        if restored is None:
            progress.eval_loss_start = progress.eval_loss = evaluate(s, show_progress)
            if progress.eval_loss is not None:
                job.log(step=0, eval_loss=progress.eval_loss)
                job.update(eval_loss_start=progress.eval_loss, eval_loss=progress.eval_loss)
        model.train()
        if select_entries(s, stop):
            checkpoints.save(progress)  # a long selection is not repeated after a stop
        bar = tqdm(
            total=s.max_steps, initial=progress.step, desc="training", unit="step",
            disable=not show_progress or no_stderr(), **bar_size(),
        )  # fmt: skip
        if not s.group.main:  # what rank 0 says (evaluations, retries), the others would repeat
            bar.write = lambda *args, **kwargs: None
        # (several ranks stop together, at the end of the same step, whichever one got the signal)
        while progress.step < s.max_steps and not s.group.any(stop.signal is not None):
            step = progress.step
            started = time.perf_counter()
            result = train_step(s, job, step, scaler, bar)
            progress.step = step + 1
            if not result.skipped:
                progress.bad_in_a_row, progress.last_loss = 0, result.loss
            elapsed = time.perf_counter() - started
            peak = memory.sample()
            tokens_per_s = result.tokens / elapsed
            skipped = {"skipped": result.skipped} if result.skipped else {}
            job.log(
                step=step + 1, loss=result.loss, lr=result.lr, grad_norm=result.grad_norm,
                tokens_per_s=tokens_per_s, peak_mem_bytes=peak, **skipped,
            )  # fmt: skip
            postfix = {
                "loss": f"{result.loss:.3f}",
                "tok_s": f"{tokens_per_s:,.0f}",
                "peak": format_bytes(peak),
            }
            bar.set_postfix({**postfix, **method.progress()}, refresh=False)
            bar.update(1)
            if s.group.main:  # a large data set's counts, and its examples kept for resume
                s.data.report_when_encoded(job, bar.write, config)

            is_last = progress.step == s.max_steps
            if config.eval_every and progress.step % config.eval_every == 0 and not is_last:
                eval_loss = evaluate(s, show_progress)
                if eval_loss is not None:
                    job.log(step=progress.step, eval_loss=eval_loss)
                    bar.write(f"step {progress.step}: eval loss {eval_loss:.4f}")
                    progress.eval_loss = eval_loss
            job.update(step=progress.step, last_loss=progress.last_loss, eval_loss=progress.eval_loss)
            if result.skipped:
                _count_bad_step(s, job, progress, result, bar)  # raises after --max-bad-steps in a row
            if is_last or s.group.any(checkpoints.due(progress.step)):  # (one clock decides)
                checkpoints.save(progress)
        bar.close()
        # A stop request, on this rank or another; also one that came during the last step, which
        # the loop's test no longer asks about: the final evaluation and export (minutes for a 7B
        # model) are left to resume, as the user asked, not run after it.
        if progress.step < s.max_steps or s.group.any(stop.signal is not None):
            checkpoints.save(progress)
            job.update(status="interrupted", stopped_by=stop.signal or "a signal to another rank")
            picture.catch_up()  # up to the step it stopped at
            raise RunInterrupted(job)

    final_eval = evaluate(s, show_progress)
    if final_eval is not None:
        job.log(step=s.max_steps, eval_loss=final_eval)
    picture.draw()
    save_dtype = DTYPES.get(config.save_dtype) or model_dtype_on_disk(s.resolved)
    out = export_result(s, job, save_dtype)
    job.update(
        status="done", eval_loss=final_eval, last_loss=progress.last_loss, output=str(out),
        peak_mem_bytes=memory.sample(), skipped_steps=progress.skipped_steps,
    )  # fmt: skip

    report_how_it_went(s, job, progress, final_eval, out)


@dataclass
class StepResult:
    loss: float
    lr: float
    grad_norm: float | None
    tokens: int
    skipped: str | None = None  # why the update was not applied


def train_step(s: Setup, job: Job, step: int, scaler: torch.amp.GradScaler, bar) -> StepResult:
    """One optimizer step: forward/backward over its micro-batches, then the update.

    The update is skipped (and the gradients dropped) if the loss or the gradient norm is NaN/Inf;
    the weights and optimizer state then stay as they were. With fp16 the scaler does this for
    overflowing gradients itself, which is routine there and not counted.
    """
    config, method = s.config, s.method
    with phase("begin step"):
        method.begin_step(step)
    lr = lr_at(step, s.max_steps, config)
    for group in method.optimizer.param_groups:
        group["lr"] = lr

    step_loss, n_targets, tokens = accumulate_gradients(s, job, step, scaler, bar)
    loss = step_loss / n_targets
    # A skipped step calls no end_step: there was no update to finish (HiFT would round its fp32
    # masters to bf16 again, with fresh noise, and move weights that did not train).
    if not math.isfinite(loss):
        drop_gradients(s)
        return StepResult(loss, lr, None, tokens, skipped="loss")

    with phase("gradients"):
        method.reduce_gradients()
        scaler.unscale_(method.optimizer)
        params = method.trainable_parameters()
        # (full_value: over sharded gradients the norm is a DTensor of the whole model's norm)
        if config.grad_clip > 0:
            grad_norm = full_value(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
        else:
            grad_norm = full_value(
                torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            )
    if not math.isfinite(grad_norm) and not scaler.is_enabled():
        drop_gradients(s)
        return StepResult(loss, lr, grad_norm, tokens, skipped="gradient")
    with phase("optimizer step"):
        scaler.step(method.optimizer)
        scaler.update()
        method.optimizer.zero_grad(set_to_none=True)  # free the gradients now, before the next forward
    with phase("end step"):
        method.end_step(step)
    return StepResult(loss, lr, grad_norm if config.grad_clip > 0 else None, tokens)


def accumulate_gradients(s: Setup, job: Job, step: int, scaler, bar) -> tuple[float, int, int]:
    """Forward and backward over the step's micro-batches; returns the summed loss, the number of
    target tokens it is summed over, and the tokens processed.

    Out of GPU memory in the middle, the step starts again with half the micro-batch and twice the
    accumulation, on the same examples: the gradient is the same, the memory smaller. The new
    micro-batch is kept for the rest of the run, and recorded in the job and its plan.

    Several ranks retry together: whether any ran out is agreed after the micro-batches. That works
    for the data-parallel methods, whose forward and backward hold no collective (their gradients
    are summed after). FSDP2 gathers and reduces inside them: a rank that ran out has left the
    others waiting in a collective it will never join, so the job stops there (the OOM's one-line
    message, and resume loses nothing; a smaller --micro-batch-size on resume fits).
    """
    data_position = s.batcher.state_dict()
    while True:
        micro_batches = s.batcher.next_step()  # (with several ranks, this rank's slice of the step)
        # Normalise by the target tokens of the whole step (see loss_sum), counted before backward
        # (over every rank's slice: the gradients the ranks sum are then the one-process gradient).
        n_targets = max(1, int(s.group.sum(sum(target_count(mb) for mb in micro_batches))))
        step_loss, tokens, out_of_memory = 0.0, 0, False
        try:
            with phase("forward/backward"):
                for mb in micro_batches:
                    total = loss_sum(s.model, mb, s.device, s.compute_dtype)
                    scaler.scale(total / n_targets).backward()
                    step_loss += total.item()  # a CPU-GPU sync per micro-batch; cheap next to the step
                    tokens += int(mb["attention_mask"].sum())
        except torch.OutOfMemoryError:
            if s.group.several and is_sharded(s.model):
                raise
            out_of_memory = True  # handled below, so the traceback does not pin tensors in memory
        if s.group.several and not is_sharded(s.model):  # (sharded ranks raised above)
            out_of_memory = s.group.any(out_of_memory)
        if not out_of_memory:
            return s.group.sum(step_loss), n_targets, int(s.group.sum(tokens))
        total = None
        drop_gradients(s)
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
        old = s.config.micro_batch_size
        if old <= 1:  # (said, with what would fit, where the job records how it ended: execute)
            raise OutOfMemoryIn("forward/backward", "even with micro-batch 1")
        new = old // 2
        # A new resolved run, recorded in the job (below), not an edit of the old one.
        s.config = s.config.replace(micro_batch_size=new)
        s.batcher.micro_batch_size = new
        s.batcher.load_state_dict(data_position)
        accumulation = math.ceil(s.config.batch_size // s.group.ranks.size / new)  # (each rank's)
        bar.write(
            f"step {step + 1}: out of GPU memory with micro-batch {old}; retrying with micro-batch {new} "
            f"({accumulation} accumulation steps, the same {s.config.batch_size} examples per step)"
        )
        _record_micro_batch_change(s, job, step, old, new, accumulation)


def _record_micro_batch_change(s: Setup, job: Job, step: int, old: int, new: int, accumulation: int) -> None:
    changes = job.record.get("oom_retries", []) + [{"step": step + 1, "micro_batch_size": [old, new]}]
    job.record["config"]["micro_batch_size"] = new
    job.update(micro_batch_size_after_oom=new, oom_retries=changes)
    plan_path = job.dir / "plan.json"
    if plan_path.exists() and s.group.main:  # (rank 0 writes the job)
        plan = json.loads(plan_path.read_text())
        for view in ("settings", "execution"):  # (a job from before the typed view has settings only)
            if view in plan:
                plan[view].update(micro_batch_size=new, gradient_accumulation=accumulation)
        plan["oom_retries"] = changes
        write_json_atomic(plan_path, plan)


def drop_gradients(s: Setup) -> None:
    s.method.optimizer.zero_grad(set_to_none=True)
    s.model.zero_grad(set_to_none=True)


def _count_bad_step(s: Setup, job: Job, progress: Progress, result: StepResult, bar) -> None:
    progress.bad_in_a_row += 1
    progress.skipped_steps.append(progress.step)
    what = f"loss {result.loss}" if result.skipped == "loss" else f"gradient norm {result.grad_norm}"
    limit = s.config.max_bad_steps
    bar.write(
        f"step {progress.step}: {what}; update skipped ({progress.bad_in_a_row} in a row of {limit} allowed)"
    )
    if progress.bad_in_a_row >= limit:
        last = job.record.get("last_checkpoint")
        first = progress.step - progress.bad_in_a_row + 1
        raise UserError(
            f"the loss or gradient was NaN/Inf for {limit} steps in a row (steps {first}-{progress.step}); "
            "stopped. "
            + (f"The last good checkpoint is {last['dir']}. " if last else "")
            + "Try a lower --lr or check the data, or allow more with --max-bad-steps"
        )
