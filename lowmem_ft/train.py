"""The training recipe: setup → loop → save, top to bottom.

    lowmem-ft run tiny examples/python-qa.jsonl          # the CLI calls run(config)

Everything that can fail because of the user's input (flags, model, data) is checked in `setup`
*before* the job directory is created, so a bad invocation leaves nothing behind. The loop never
branches on the method's name: methods plug in through the hooks of `lowmem_ft.methods.Method`.
"""

from __future__ import annotations

import contextlib
import math
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lowmem_ft.config import DTYPES, RunConfig
from lowmem_ft.data import (
    Batcher,
    Example,
    TokenStats,
    eval_batches,
    pack_examples,
    read_jsonl,
    split_eval,
    tokenize_records,
)
from lowmem_ft.errors import UserError
from lowmem_ft.hardware import PeakMemory, format_bytes
from lowmem_ft.jobs import Job, write_json_atomic
from lowmem_ft.methods import Method, build_method
from lowmem_ft.models import ResolvedModel, load_model, load_tokenizer, resolve_model
from lowmem_ft.planner import Plan, build_plan
from lowmem_ft.planner.shapes import UnsupportedModel

IGNORE = -100


class RunInterrupted(Exception):
    """Ctrl-C or SIGTERM during training: the job directory has been marked 'interrupted'."""

    def __init__(self, job: Job):
        super().__init__(
            f"interrupted at step {job.record.get('step', 0)}: {job.dir} is marked 'interrupted'"
        )
        self.job = job


@dataclass
class Data:
    train: list[Example]
    eval: list[Example]
    format: str
    stats: TokenStats
    skipped_lines: int

    def summary(self) -> dict:
        return {
            "format": self.format,
            "train_examples": len(self.train),
            "eval_examples": len(self.eval),
            "skipped_bad_lines": self.skipped_lines,
            **{f"tokenize_{k}": v for k, v in asdict(self.stats).items()},
        }


@dataclass
class Setup:
    config: RunConfig
    plan: Plan | None
    resolved: ResolvedModel
    tokenizer: object
    data: Data
    model: torch.nn.Module
    model_params: int  # as loaded, before a method re-stores any weights (a quantised base)
    method: Method
    device: torch.device
    compute_dtype: torch.dtype
    batcher: Batcher
    max_steps: int


# -- setup ----------------------------------------------------------------------------------------
def load_data(config: RunConfig, tokenizer) -> Data:
    records, fmt, skipped = read_jsonl(config.data, config.format, config.skip_bad_lines)
    examples, stats = tokenize_records(records, fmt, tokenizer, config.seq_len)
    if config.eval_data is not None:
        # The evaluation file is detected on its own (it may be in another format than the training file).
        eval_records, eval_fmt, eval_skipped = read_jsonl(
            config.eval_data, config.format, config.skip_bad_lines
        )
        eval_examples, _ = tokenize_records(eval_records, eval_fmt, tokenizer, config.seq_len)
        train_examples, skipped = examples, skipped + eval_skipped
    else:
        train_examples, eval_examples = split_eval(examples, config.eval_fraction, config.seed)
    if config.pack:  # pack after the split, so no evaluation example leaks into a training row
        train_examples = pack_examples(train_examples, config.seq_len)
    if not train_examples:
        raise UserError(f"{config.data}: no training examples left after tokenization; check --seq-len")
    return Data(train_examples, eval_examples, fmt, stats, skipped)


def plan_run(config: RunConfig, resolved: ResolvedModel) -> Plan | None:
    """Plan this run with the same planner as `lowmem-ft plan`, and adopt what the user left open.

    Options the user gave win; the plan says whether they fit. A plan that does not fit stops the
    run here, before anything is loaded or written.
    """
    device = config.resolved_device()
    dtype_name = {v: k for k, v in DTYPES.items()}[config.compute_dtype()]
    try:
        result = build_plan(
            resolved.name,
            config=resolved.config.to_dict(),
            method=config.method,
            gpu_mem=config.gpu_mem if device.type == "cuda" else None,
            cpu_mem=config.cpu_mem,
            gpu=None if device.type == "cuda" else "none",
            seq_len=config.seq_len,
            batch_size=config.batch_size,
            micro_batch_size=config.micro_batch_size,
            gradient_checkpointing=config.gradient_checkpointing,
            dtype=dtype_name,
            units_per_group=config.units_per_group,
            state_policy=config.state_policy,
            groups=config.groups,
            sparsity=config.sparsity,
            base_quant=config.base_quant,
            targets=config.targets,
            selection_batches=config.selection_batches if config.method == "sift" else 1,
        )
    except UnsupportedModel as exc:
        print(f"plan       none: {exc}; micro-batch and checkpointing default to 4 and off")
        if config.groups:
            config.units_per_group = -(-(resolved.config.num_hidden_layers + 2) // config.groups)
        config.micro_batch_size = config.micro_batch_size or min(4, config.batch_size)
        config.gradient_checkpointing = bool(config.gradient_checkpointing)
        return None
    plan = result.plan
    if not plan.fits:
        raise UserError(
            f"{resolved.name} with --method {config.method} does not fit this machine: {plan.shortfall} "
            f"(`lowmem-ft plan {config.model} --method {config.method}` shows the breakdown)"
        )
    if plan.settings.get("streamed_units"):
        raise UserError(
            f"{resolved.name} with --method {config.method} fits this machine only by streaming "
            f"{plan.settings['streamed_units']} units from host memory, which lowmem-ft cannot do yet; "
            "use a GPU with more free memory or a shorter --seq-len "
            f"(`lowmem-ft plan {config.model} --method {config.method}` shows the breakdown)"
        )
    config.micro_batch_size = plan.settings["micro_batch_size"]
    config.gradient_checkpointing = plan.settings["gradient_checkpointing"]
    # HiFT's and the sparse methods' choices, when the user left them open
    for option in ("units_per_group", "state_policy", "sparsity", "base_quant", "selection_passes"):
        if option in plan.settings and getattr(config, option) is None:
            setattr(config, option, plan.settings[option])
    return plan


def setup(config: RunConfig) -> Setup:
    config.validate()
    resolved = resolve_model(
        config.model, allow_download=config.allow_download, trust_remote_code=config.trust_remote_code
    )
    plan = plan_run(config, resolved)
    tokenizer = load_tokenizer(resolved, trust_remote_code=config.trust_remote_code)
    data = load_data(config, tokenizer)

    torch.manual_seed(config.seed)
    device, compute_dtype = config.resolved_device(), config.compute_dtype()
    method = build_method(config.method)
    model = load_model(resolved, method.weight_dtype(config), trust_remote_code=config.trust_remote_code)
    model_params = sum(p.numel() for p in model.parameters())
    method.place(model, config, device)
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    model.config.use_cache = False  # the KV cache is for generation; in training it only costs memory
    method.setup(model, config)

    batcher = Batcher(
        data.train, config.batch_size, config.micro_batch_size, tokenizer.pad_token_id, config.seed
    )
    max_steps = config.max_steps or max(1, math.ceil(config.epochs * batcher.steps_per_epoch))
    return Setup(
        config, plan, resolved, tokenizer, data, model, model_params, method, device, compute_dtype, batcher,
        max_steps,
    )  # fmt: skip


def enable_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward instead of storing them: activation
    memory drops from every intermediate of every layer to one hidden state per layer."""
    kwargs = {"use_reentrant": False}  # the reentrant variant breaks when inputs need no grad
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# -- pieces of the loop ---------------------------------------------------------------------------
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
    return torch.autocast(device.type, dtype=dtype)


def target_count(batch: dict) -> int:
    """Tokens that carry loss in a batch (after the shift), counted on the CPU labels: no device sync."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


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
    return F.cross_entropy(logits, targets.flatten(), ignore_index=IGNORE, reduction="sum")


@torch.no_grad()
def evaluate(s: Setup) -> float | None:
    """Mean loss per target token over the evaluation set."""
    if not s.data.eval:
        return None
    s.model.eval()
    total, count = 0.0, 0
    for batch in eval_batches(s.data.eval, s.config.micro_batch_size, s.tokenizer.pad_token_id):
        total += loss_sum(s.model, batch, s.device, s.compute_dtype).item()
        count += target_count(batch)
    s.model.train()
    return total / max(count, 1)


def default_out_dir(config: RunConfig, model_name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{model_name}-{config.method}-{stamp}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def print_header(s: Setup, job: Job) -> None:
    d = s.data
    print(f"model      {s.resolved.name} ({s.resolved.source}), {s.model_params:,} parameters")
    print(f"method     {s.method.name}: {s.method.summary}; {s.method.describe_trainable()}")
    print(
        f"data       {s.config.data} ({d.format}): {len(d.train)} train / {len(d.eval)} eval examples, "
        f"{d.stats.target_tokens:,} target tokens"
        + (f", {d.stats.truncated} truncated to {s.config.seq_len} tokens" if d.stats.truncated else "")
        + (f", {d.stats.dropped_no_target} dropped (no response left)" if d.stats.dropped_no_target else "")
        + (f", {d.skipped_lines} bad lines skipped" if d.skipped_lines else "")
    )
    accumulation = math.ceil(s.config.batch_size / s.config.micro_batch_size)
    print(
        f"training   {s.max_steps} steps of {s.config.batch_size} examples "
        f"({accumulation} × micro-batch {s.config.micro_batch_size}), "
        f"lr {s.config.lr:g} {s.config.schedule}, "
        f"{s.device.type} {str(s.compute_dtype).removeprefix('torch.')}"
        + (", activation checkpointing" if s.config.gradient_checkpointing else "")
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
        print(f"plan       peak ≈ {format_bytes(peak)} of {format_bytes(budget)} {where}{chosen} (plan.json)")
    print(f"job        {job.dir}")


# -- the recipe -----------------------------------------------------------------------------------
def run(config: RunConfig, show_progress: bool = True) -> Job:
    s = setup(config)  # raises UserError on bad input, before anything is written
    out_dir = config.out or default_out_dir(config, s.resolved.name)
    job = Job.create(
        out_dir,
        config.to_json(),
        max_steps=s.max_steps,
        model_source=s.resolved.source,
        hub_id=s.resolved.hub_id,
        data=s.data.summary(),
        trainable_parameters=s.method.trainable_count(),
    )
    if s.plan is not None:
        write_json_atomic(job.dir / "plan.json", s.plan.to_json())
    print_header(s, job)
    try:
        train(s, job, show_progress)
    except KeyboardInterrupt:
        job.update(status="interrupted")
        raise RunInterrupted(job) from None
    except Exception as exc:
        (job.dir / "error.log").write_text(traceback.format_exc())
        job.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    return job


def train(s: Setup, job: Job, show_progress: bool) -> None:
    config, model, method = s.config, s.model, s.method
    # fp16 overflows without loss scaling; bf16 and fp32 need none (the scaler is then a no-op).
    scaler = torch.amp.GradScaler(s.device.type, enabled=s.compute_dtype == torch.float16)
    memory = PeakMemory(s.device)

    first_eval = evaluate(s)
    if first_eval is not None:
        job.log(step=0, eval_loss=first_eval)
        job.update(eval_loss_start=first_eval, eval_loss=first_eval)

    model.train()
    select_entries(s)
    bar = tqdm(total=s.max_steps, desc="training", unit="step", disable=not show_progress, dynamic_ncols=True)
    loss = float("nan")
    for step in range(s.max_steps):
        started = time.perf_counter()
        method.begin_step(step)
        lr = lr_at(step, s.max_steps, config)
        for group in method.optimizer.param_groups:
            group["lr"] = lr

        micro_batches = s.batcher.next_step()
        # Normalise by the target tokens of the whole step (see loss_sum), counted before backward.
        n_targets = max(1, sum(target_count(mb) for mb in micro_batches))
        step_loss, step_tokens = 0.0, 0
        for mb in micro_batches:
            total = loss_sum(model, mb, s.device, s.compute_dtype)
            scaler.scale(total / n_targets).backward()
            step_loss += total.item()  # a CPU-GPU sync per micro-batch; cheap next to the step
            step_tokens += int(mb["attention_mask"].sum())

        method.reduce_gradients()
        scaler.unscale_(method.optimizer)
        grad_norm = None
        if config.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(method.trainable_parameters(), config.grad_clip))
        scaler.step(method.optimizer)
        scaler.update()
        method.optimizer.zero_grad(set_to_none=True)  # free the gradients now, before the next forward
        method.end_step(step)

        loss = step_loss / n_targets
        elapsed = time.perf_counter() - started
        peak = memory.sample()
        tokens_per_s = step_tokens / elapsed
        job.log(
            step=step + 1,
            loss=loss,
            lr=lr,
            grad_norm=grad_norm,
            tokens_per_s=tokens_per_s,
            peak_mem_bytes=peak,
        )
        postfix = {"loss": f"{loss:.3f}", "tok_s": f"{tokens_per_s:,.0f}", "peak": format_bytes(peak)}
        bar.set_postfix({**postfix, **method.progress()}, refresh=False)
        bar.update(1)

        is_last = step + 1 == s.max_steps
        if config.eval_every and (step + 1) % config.eval_every == 0 and not is_last:
            eval_loss = evaluate(s)
            if eval_loss is not None:
                job.log(step=step + 1, eval_loss=eval_loss)
                bar.write(f"step {step + 1}: eval loss {eval_loss:.4f}")
                job.update(eval_loss=eval_loss)
        job.update(step=step + 1, last_loss=loss)
    bar.close()

    final_eval = evaluate(s)
    if final_eval is not None:
        job.log(step=s.max_steps, eval_loss=final_eval)
    save_dtype = DTYPES.get(config.save_dtype) or model_dtype_on_disk(s.resolved)
    out = method.export(model, s.tokenizer, job.dir, save_dtype, s.resolved)
    job.update(
        status="done", eval_loss=final_eval, last_loss=loss, output=str(out), peak_mem_bytes=memory.sample()
    )

    if final_eval is not None and first_eval is not None:
        change = 100 * (final_eval - first_eval) / first_eval
        print(f"eval loss  {first_eval:.4f} → {final_eval:.4f} ({change:+.1f}%)")
    if out.is_file():  # a delta: small, and merged into a full model on request
        print(f"saved      {out} ({format_bytes(out.stat().st_size)})")
        print(f"           a full model: lowmem-ft export {job.dir} --merge --out DIR")
    else:
        print(f"saved      {out}")


def select_entries(s: Setup) -> None:
    """Let a method that chooses its trainable entries from data (SIFT) look at its selection
    window: micro-batches drawn with their own seed, so the training order is the same as any
    other method's. Their gradients choose; they are never applied."""
    n = s.method.selection_batches(s.config)
    if not n:
        return
    started = time.perf_counter()
    micro = s.config.micro_batch_size
    draw = Batcher(s.data.train, micro, micro, s.tokenizer.pad_token_id, s.config.seed + 1)
    window = [draw.next_step()[0] for _ in range(n)]
    n_targets = max(1, sum(target_count(mb) for mb in window))
    scaler = torch.amp.GradScaler(s.device.type, enabled=s.compute_dtype == torch.float16)

    def backward(batch: dict) -> None:
        # Scaled like a training step; fp16 needs loss scaling so small gradients do not vanish.
        scaler.scale(loss_sum(s.model, batch, s.device, s.compute_dtype) / n_targets).backward()

    summary = s.method.select(window, backward)
    print(f"selection  {summary} ({time.perf_counter() - started:.1f}s)")


def model_dtype_on_disk(resolved: ResolvedModel) -> torch.dtype:
    """The dtype the base model was distributed in; exports default to it (bf16 for most 7B models)."""
    dtype = getattr(resolved.config, "dtype", None) or getattr(resolved.config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32
