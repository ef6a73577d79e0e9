"""Everything before the first step: the options checked, the model resolved and planned for this
machine, data read and tokenised, the model loaded and placed, the method set up. Whatever the
user got wrong fails here, before a job directory exists."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import numpy as np
import torch

from lowmem_ft.config import RunConfig, default_lr
from lowmem_ft.data import Batcher, Example, TokenStats, data_files, pack_examples, read_records
from lowmem_ft.data.cache import read_cache, tokenizer_sha256, write_cache
from lowmem_ft.data.lazy import LazyExamples
from lowmem_ft.data.tokenize import as_table, choose_indices, encode_rendered, render_records, split_indices
from lowmem_ft.distributed.group import ONE, Group
from lowmem_ft.distributed.ranks import SHARDED_METHODS
from lowmem_ft.errors import UserError
from lowmem_ft.files import sha256_of
from lowmem_ft.methods import build_method
from lowmem_ft.methods.base import Method
from lowmem_ft.models import ResolvedModel, count_parameters, load_model, load_tokenizer, resolve_model
from lowmem_ft.planner import Plan, build_plan, planned_as_given
from lowmem_ft.planner.shapes import UnsupportedModel
from lowmem_ft.precision import dtype_name
from lowmem_ft.preflight import check_plan_fits_device
from lowmem_ft.registry import planned_options

log = logging.getLogger(__name__)  # the CLI shows it (cli.report_to_console)


@dataclass
class Data:
    train: LazyExamples  # record i's example (empty: nothing to learn); a plain sequence is taken as encoded
    eval: Sequence[Example]  # what every evaluation runs on: at most --max-eval-examples
    format: str
    eval_stats: TokenStats  # the evaluated examples' counts (the training ones': train.stats)
    skipped_lines: int
    eval_available: int | None = None  # evaluation records --max-eval-examples chose from (None: eval's)
    cache_key: dict | None = None  # what the examples were made from (data/cache.py); None: not kept
    from_cache: bool = False  # read from the job's tokenised data, not from the data files
    keep_dir: Path | None = None  # the job to keep the examples in once every one is encoded
    reported: bool = False  # the background encoding's end was reported

    def __post_init__(self):
        if self.eval_available is None:
            self.eval_available = len(self.eval)
        if not isinstance(self.train, LazyExamples):
            table = as_table(self.train)
            kept = int(np.count_nonzero(table.lengths()))
            self.train = LazyExamples.encoded(table, TokenStats(examples=kept))

    def stats(self) -> TokenStats | None:
        """The counts of every example made, training and evaluation; None while the training
        records are being encoded in the background, until ``report_when_encoded`` says they are
        done (so that what the header and job.json say does not depend on the thread's speed)."""
        if self.train.encoded_in_background and not self.reported:
            return None
        train, evaluated = asdict(self.train.stats), asdict(self.eval_stats)
        return TokenStats(**{name: train[name] + evaluated[name] for name in train})

    def summary(self) -> dict:
        stats = self.stats()
        return {
            "format": self.format,
            "train_records": len(self.train),
            "train_examples": None if stats is None else self.train.stats.examples,  # (None: being encoded)
            "eval_examples": len(self.eval),
            "eval_examples_available": self.eval_available,
            "skipped_bad_lines": self.skipped_lines,
            **({f"tokenize_{k}": v for k, v in asdict(stats).items()} if stats is not None else {}),
        }

    def keep_in(self, job_dir: Path) -> None:
        """Keep the tokenised examples in the job, for `resume` (data/cache.py): now, or once the
        background encoding is done (``report_when_encoded``); already there when they were read
        from it."""
        self.keep_dir = job_dir
        if self.cache_key is None or self.from_cache or self.stats() is None:
            return
        summary = {
            "format": self.format, "train_stats": asdict(self.train.stats),
            "eval_stats": asdict(self.eval_stats), "skipped_lines": self.skipped_lines,
            "eval_available": self.eval_available,
        }  # fmt: skip
        tables = {"train": self.train.table(), "eval": as_table(self.eval)}
        write_cache(job_dir, self.cache_key, tables, summary)

    def describe(self, config: RunConfig) -> str:
        """What the examples are, for the run's data line: the counts of every example made
        (training and evaluation) once they are known."""
        source = "--eval-data" if config.eval_data is not None else "held-out"
        if 0 < config.max_eval_examples < self.eval_available:
            chosen = f"{len(self.eval):,} of {self.eval_available:,} {source} examples (chosen by --seed)"
            evaluated = f"eval {chosen}"
        else:
            evaluated = f"{len(self.eval):,} eval examples"
        stats = self.stats()
        if stats is None:  # (data/lazy.py) report_when_encoded says it when they are done
            return f"{len(self.train):,} train records (encoded as the run trains) / {evaluated}"
        return f"{self.train.stats.examples:,} train / {evaluated}, {stats.describe(config.seq_len)}"

    def warnings(self, config: RunConfig) -> list[str]:
        """What the counts say is likely a mistake, once they are known: most examples dropped (their
        response starts beyond --seq-len), or no evaluation example left."""
        stats, said = self.stats(), []
        if stats is None:
            return said
        longer = f"a larger --seq-len than {config.seq_len} keeps them"
        if stats.dropped_no_target > stats.examples:
            made = stats.examples + stats.dropped_no_target
            said.append(
                f"{stats.dropped_no_target:,} of {made:,} examples dropped: nothing to learn from is left "
                f"within their first {config.seq_len} tokens; {longer}"
            )
        if not self.eval and self.eval_available:
            said.append(
                f"no evaluation: none of the {self.eval_available:,} evaluation examples has anything to "
                f"learn from within its first {config.seq_len} tokens; {longer}"
            )
        return said

    def report_when_encoded(self, job, say, config: RunConfig) -> None:
        """Once the background encoding of the training records is done: what it made, said with
        ``say`` as the header would have said it, and recorded in job.json, and the examples kept
        in the job. Between steps, on rank 0."""
        if self.reported or not self.train.encoded_in_background or not self.train.done:
            return  # (encoded before the first step: the header said it all)
        self.reported = True
        say(f"data       every training record encoded: {self.describe(config)}")
        for warning in self.warnings(config):
            say(f"warning    {warning}")
        job.update(data=self.summary())
        if self.keep_dir is not None:
            self.keep_in(self.keep_dir)


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
    lr_is_default: bool = False  # no --lr: the method's default for the model's size
    group: Group = ONE  # the job's ranks (--nproc); rank 0 writes the job


# -- setup ----------------------------------------------------------------------------------------
def load_data(config: RunConfig, tokenizer, show_progress: bool = False) -> Data:
    """The training and evaluation examples. When ``config.out`` is a job that kept its tokenised
    data (``Data.keep_in``) made from the same data, tokenizer and settings, they are read from there
    (`resume`); otherwise from the data files, with progress bars unless ``show_progress`` is False.

    Every record is read and checked here. The evaluation records are encoded here; so are the
    training records, up to ``ENCODE_FIRST`` of them (or all, with --pack), and more are encoded
    in the background while the run trains (data/lazy.py).
    """
    key = _data_key(config, tokenizer)
    if config.out is not None and key is not None and (kept := read_cache(config.out, key)) is not None:
        tables, summary = kept
        log.info(f"data       tokenised data read from {config.out}; the data files are not read again")
        train = LazyExamples.encoded(tables["train"], TokenStats(**summary["train_stats"]))
        return Data(
            train, tables["eval"], summary["format"], TokenStats(**summary["eval_stats"]),
            summary["skipped_lines"], summary["eval_available"], key, from_cache=True,
        )  # fmt: skip
    records, fmt, skipped = read_records(config.data, config.format, config.skip_bad_lines, show_progress)
    day = date.fromisoformat(config.chat_date) if config.chat_date else None
    rendered = render_records(records, fmt, tokenizer, show_progress, day)
    del records  # a million records are gigabytes of Python objects
    if config.eval_data is not None:
        # The evaluation file is detected on its own (it may be in another format than the training file).
        eval_records, eval_fmt, eval_skipped = read_records(
            config.eval_data, config.format, config.skip_bad_lines, show_progress
        )
        train_rendered, held_out = (
            rendered,
            render_records(eval_records, eval_fmt, tokenizer, show_progress, day),
        )
        skipped += eval_skipped
    else:
        train_indices, eval_indices = split_indices(len(rendered), config.eval_fraction, config.seed)
        train_rendered = [rendered[i] for i in train_indices]
        held_out = [rendered[i] for i in eval_indices]
    del rendered
    # The records left out of evaluation by the cap are neither encoded nor trained on: the cap
    # changes what an evaluation costs, never what the run trains on.
    chosen = choose_indices(len(held_out), config.max_eval_examples, config.seed)
    evaluated = [held_out[i] for i in chosen]
    eval_examples, eval_stats = encode_rendered(evaluated, tokenizer, config.seq_len, show_progress)
    train = LazyExamples(train_rendered, tokenizer, config.seq_len)
    if config.pack:  # packed rows follow the examples in order: every one is needed first
        train = LazyExamples.encoded(pack_examples(train.table(show_progress), config.seq_len), train.stats)
    elif len(train) <= ENCODE_FIRST:
        train.encode_all(show_progress)
    if not train.any_example():
        raise UserError(f"{config.data}: no training examples left after tokenization; check --seq-len")
    train.start()  # the rest, while the model loads and the run trains
    return Data(train, eval_examples, fmt, eval_stats, skipped, len(held_out), key)


def _data_key(config: RunConfig, tokenizer) -> dict | None:
    """Everything the examples depend on: what ``Data.keep_in`` keeps them under."""
    tokenizer_digest = tokenizer_sha256(tokenizer)
    if tokenizer_digest is None:
        return None
    return {
        "data_sha256": sha256_of(data_files(config.data)),
        "eval_data_sha256": sha256_of(data_files(config.eval_data)) if config.eval_data else None,
        "tokenizer_sha256": tokenizer_digest,
        **{name: getattr(config, name) for name in _EXAMPLE_SETTINGS},
    }


# Training records encoded before the first step, so that the run's header counts its examples:
# a few seconds' work. Beyond it they are encoded while the run trains (a million take minutes).
ENCODE_FIRST = 10_000

# The options that change the examples made from the same data and tokenizer.
_EXAMPLE_SETTINGS = (
    "format", "skip_bad_lines", "seq_len", "pack", "eval_fraction", "seed", "max_eval_examples", "chat_date",
)  # fmt: skip


def plan_run(
    config: RunConfig, resolved: ResolvedModel, device: torch.device | None = None
) -> tuple[RunConfig, Plan | None]:
    """Plan this run with the same planner as `lowmem-ft plan`; returns the resolved run (the
    options as given, with the plan's choices where the user left them open) and the plan.

    Options the user gave win; the plan says whether they fit. A plan that does not fit stops the
    run here, before anything is loaded or written. ``device``: the one the run will use (the memory
    trace plans for a GPU it does not have).
    """
    device = device or config.resolved_device()
    try:
        result = build_plan(
            resolved.name,
            config=resolved.config.to_dict(),
            gpu_mem=config.gpu_mem if device.type == "cuda" else None,
            gpu=None if device.type == "cuda" else "none",
            dtype=dtype_name(config.compute_dtype()),
            cuda_index=device.index or 0,
            **planned_as_given(config),
        )
    except UnsupportedModel as exc:
        log.info(f"plan       none: {exc}; micro-batch and checkpointing default to 4 and off")
        chosen: dict = {
            "micro_batch_size": config.micro_batch_size or min(4, config.batch_size),
            "gradient_checkpointing": bool(config.gradient_checkpointing),
        }
        groups = getattr(config.method_options, "groups", None)  # HiFT's --groups
        if groups:
            chosen["units_per_group"] = -(-(resolved.config.num_hidden_layers + 2) // groups)
        chosen |= learning_rate(config, count_parameters(resolved.weights_dir))
        return config.replace(**{**chosen, **streaming(config, resolved, 0)}), None
    plan = result.plan
    if not plan.fits:
        raise UserError(
            f"{resolved.name} with --method {config.method} does not fit this machine: {plan.shortfall} "
            f"(`lowmem-ft plan {config.model} --method {config.method}` shows the breakdown)"
        )
    chosen = {
        "micro_batch_size": plan.execution.micro_batch_size,
        "gradient_checkpointing": plan.execution.gradient_checkpointing,
    }
    # HiFT's and the sparse methods' choices, when the user left them open
    for option in planned_options(config.method):
        if getattr(config.method_options, option) is None:
            chosen[option] = getattr(plan.method_options, option)
    resolved_run = config.replace(**chosen, **learning_rate(config, plan.total_params))
    return resolved_run.replace(**streaming(resolved_run, resolved, plan.execution.streamed_units or 0)), plan


def learning_rate(config: RunConfig, params: int) -> dict:
    """--lr, or the default for the method and the model's size (config.default_lr)."""
    return {} if config.lr is not None else {"lr": default_lr(config.method, params)}


def streaming(config: RunConfig, resolved: ResolvedModel, planned: int) -> dict:
    """How many decoder layers are streamed: all with --stream, else the plan's count (the planner
    streams decoder layers only). Streamed layers are rebuilt in the backward: checkpointing is on."""
    layers = config.streamed_layers
    if layers is None:
        layers = resolved.config.num_hidden_layers if config.streams_every_layer else planned
    return {"streamed_layers": layers, **({"gradient_checkpointing": True} if layers else {})}


def setup(config: RunConfig, show_progress: bool = False, group: Group = ONE) -> Setup:
    """``config``: the run as asked for. ``Setup.config`` is the resolved run, the plan's choices
    filled in, which everything after this reads. ``show_progress``: bars while data is read and
    tokenised. ``group``: the job's ranks, each of which sets up the same run (its own slice of
    every batch)."""
    config.validate()
    resolved = resolve_model(
        config.model, allow_download=config.allow_download, trust_remote_code=config.trust_remote_code
    )
    lr_is_default = config.lr is None
    config, plan = plan_run(config, resolved)
    tokenizer = load_tokenizer(resolved, trust_remote_code=config.trust_remote_code)
    data = load_data(config, tokenizer, show_progress)
    try:
        return _set_up_model(config, plan, resolved, tokenizer, data, lr_is_default, group)
    except BaseException:
        data.train.close()  # the records' background encoding ends with the run that needed it
        raise


def _set_up_model(
    config: RunConfig, plan: Plan | None, resolved: ResolvedModel, tokenizer, data: Data, lr_is_default: bool,
    group: Group,
) -> Setup:  # fmt: skip
    """``setup`` once the data is read: the model, the method and the batches."""
    torch.manual_seed(config.seed)
    device, compute_dtype = config.resolved_device(), config.compute_dtype()
    if group.several:
        device = group.device  # a rank's own GPU (cuda:LOCAL_RANK), or the CPU
    if device.type == "cuda":  # --device cuda:N: streams, pinning and the context all on that card
        torch.cuda.set_device(device)
    method = build_method(config)
    method.group = group
    model, model_params = load_placed_model(config, method, resolved, device, plan)
    finish_model(config, method, model)
    if plan is not None and device.type == "cuda":  # before step 1 and before the job is written
        check_plan_fits_device(plan, device)

    batcher = Batcher(
        data.train, config.batch_size, config.micro_batch_size, tokenizer.pad_token_id, config.seed,
        group.ranks.rank, group.ranks.size,
    )  # fmt: skip
    max_steps = config.max_steps or max(1, math.ceil(config.epochs * batcher.steps_per_epoch))
    return Setup(
        config, plan, resolved, tokenizer, data, model, model_params, method, device, compute_dtype, batcher,
        max_steps, lr_is_default, group,
    )  # fmt: skip


def load_placed_model(
    config: RunConfig, method: Method, resolved: ResolvedModel, device: torch.device, plan: Plan | None
) -> tuple[torch.nn.Module, int]:
    """The model, loaded and on its device (``method.place``), and its parameter count as loaded
    (before a method re-stores any weights: a quantised base).

    With several ranks, ``full`` and ``hift`` read it once (distributed/fsdp.load_sharded). The
    data-parallel methods hold it whole on every rank, and each rank holds a host copy of it while
    it loads: the ranks of a node take turns, ``plan.loads_at_once`` at a time (as many copies as
    the plan's host memory holds), each turn ending when its ranks have their model on the device.
    """
    group, dtype, remote = method.group, method.weight_dtype(), config.trust_remote_code
    if group.several and method.name in SHARDED_METHODS:
        from lowmem_ft.distributed.fsdp import load_sharded

        model = load_sharded(resolved, dtype, group, remote)  # sharded on the device: nothing to place
        return model, sum(p.numel() for p in model.parameters())
    ranks = group.ranks
    # Rank 0's count: each rank planned on its own, and host memory read a moment apart can differ
    # (every rank must wait at the same turns)
    at_once = group.broadcast(plan.loads_at_once if plan is not None else ranks.local_size)
    model, params = None, 0
    turns = math.ceil(ranks.local_size / at_once)
    for turn in range(turns):
        if ranks.local_rank // at_once == turn:
            model = load_model(resolved, dtype, trust_remote_code=remote)
            params = sum(p.numel() for p in model.parameters())
            method.place(model, device)
        if turns > 1:
            group.wait_long()  # for the ranks of this turn: a slow disk may take longer than a collective
    return model, params


def prepare_model(config: RunConfig, method: Method, model: torch.nn.Module, device: torch.device) -> None:
    """Weights onto the device (streamed layers' frozen weights stay in host memory), then
    ``finish_model``."""
    method.place(model, device)
    finish_model(config, method, model)


def finish_model(config: RunConfig, method: Method, model: torch.nn.Module) -> None:
    """Activation checkpointing as planned, then the method marks what trains and builds its
    optimizer."""
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    model.config.use_cache = False  # the KV cache is for generation; in training it only costs memory
    method.setup(model)


def enable_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward instead of storing them: activation
    memory drops from every intermediate of every layer to one hidden state per layer."""
    kwargs = {"use_reentrant": False}  # the reentrant variant breaks when inputs need no grad
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # transformers also makes the embedding's output require grad, which only the reentrant variant
    # needs. With it, every layer below HiFT's active group would be rebuilt and back-propagated
    # through in the backward, for input gradients nobody uses (and streamed in a second time).
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()
