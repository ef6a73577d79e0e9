"""Everything before the first step: the options checked, the model resolved and planned for this
machine, data read and tokenised, the model loaded and placed, the method set up. Whatever the
user got wrong fails here, before a job directory exists."""

from __future__ import annotations

import logging
import math
import shlex
from dataclasses import asdict, dataclass

import torch

from lowmem_ft.choices import flag
from lowmem_ft.config import RunConfig, default_lr
from lowmem_ft.data import Batcher
from lowmem_ft.devices import measures_free_memory
from lowmem_ft.distributed.group import ONE, Group
from lowmem_ft.distributed.ranks import SHARDED_METHODS
from lowmem_ft.errors import UserError
from lowmem_ft.methods import build_method
from lowmem_ft.methods.base import Method
from lowmem_ft.models import ResolvedModel, count_parameters, load_model, load_tokenizer, resolve_model
from lowmem_ft.planner import PLANNED_AS_GIVEN, Plan, build_plan, planned_as_given
from lowmem_ft.planner.shapes import UnsupportedModel
from lowmem_ft.precision import dtype_name
from lowmem_ft.preflight import check_plan_fits_device
from lowmem_ft.registry import planned_options
from lowmem_ft.run_data import Data, load_data
from lowmem_ft.sizes import format_bytes, format_bytes_down, parse_size

log = logging.getLogger(__name__)  # the CLI shows it (cli.report_to_console)


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
            f"(`{_plan_command(config, device, result.budget.gpu_bytes)}` shows the breakdown)"
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


def _plan_command(config: RunConfig, device: torch.device, gpu_bytes: int) -> str:
    """The `lowmem-ft plan` command that plans the run asked for: with the options given that the
    planner reads (without them it plans another run, which may well fit). ``gpu_bytes``: the GPU
    budget the run planned with (`plan` looks at the first GPU: another one's is given as a size)."""
    default = RunConfig.create(model=config.model, data=config.data, method=config.method)
    words = ["lowmem-ft", "plan", config.model, "--method", config.method]
    if device.type == "cpu" and torch.cuda.is_available():
        words += ["--gpu", "none"]
    if device.type == "cuda" and (device.index or 0) > 0 and config.gpu_mem is None:
        words += ["--gpu-mem", str(gpu_bytes)]  # (bytes: exactly the budget; parse_size reads them)
    common = [*(["gpu_mem"] if device.type == "cuda" else []), *PLANNED_AS_GIVEN[1:]]  # ([0]: method)
    given = {name: (getattr(config, name), getattr(default, name)) for name in (*common, "dtype")}
    defaults = asdict(default.method_options)
    given |= {name: (value, defaults.get(name)) for name, value in asdict(config.method_options).items()}
    for name, (value, unset) in given.items():
        if value is None or value == unset:
            continue
        if isinstance(value, bool):
            words.append(flag(name) if value else flag(name).replace("--", "--no-", 1))
        else:
            words += [flag(name), str(value)]
    return shlex.join(words)


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


def _check_host_budget(config: RunConfig) -> None:
    """A run's --cpu-mem is memory of this machine: more than it has would let the planner keep in
    host memory what does not fit there (HiFT's waiting optimizer state, 8 bytes a parameter), and
    the system would kill the run without a word, hours in. (`plan` plans for any machine.)"""
    if config.cpu_mem is None:
        return
    import psutil

    machine = psutil.virtual_memory().total
    if parse_size(config.cpu_mem, "--cpu-mem") > machine:
        most = format_bytes_down(machine)
        raise UserError(
            f"--cpu-mem {config.cpu_mem} is more than this machine's {format_bytes(machine)} of memory; "
            f"give at most {most.replace(' ', '')}, or leave --cpu-mem out to plan with what is free "
            "(`lowmem-ft plan` plans for another machine)"
        )


def setup(
    config: RunConfig,
    show_progress: bool = False,
    group: Group = ONE,
    digests: dict | None = None,
    kept_data: bool = False,
) -> Setup:
    """``config``: the run as asked for. ``Setup.config`` is the resolved run, the plan's choices
    filled in, which everything after this reads. ``show_progress``: bars while data is read and
    tokenised. ``group``: the job's ranks, each of which sets up the same run (its own slice of
    every batch). ``digests``: the data files' (``run_data.data_digests``), where the caller has
    them already (`resume` checks them first), so that large files are not read twice for them.
    ``kept_data``: a data file is gone, and the examples the job kept stand in for it (`resume`)."""
    config.validate(data_files=not kept_data)
    _check_host_budget(config)
    resolved = resolve_model(
        config.model, allow_download=config.allow_download, trust_remote_code=config.trust_remote_code
    )
    lr_is_default = config.lr is None
    config, plan = plan_run(config, resolved)
    tokenizer = load_tokenizer(resolved, trust_remote_code=config.trust_remote_code)
    _check_vocabulary(resolved, tokenizer)
    data = load_data(config, tokenizer, show_progress, digests)
    try:
        return _set_up_model(config, plan, resolved, tokenizer, data, lr_is_default, group)
    except BaseException:
        data.train.close()  # the records' background encoding ends with the run that needed it
        raise


def _check_vocabulary(resolved: ResolvedModel, tokenizer) -> None:
    """A tokenizer whose vocabulary, or the special tokens the tool writes (bos, eos, pad), reaches
    beyond the model's embedding rows makes ids that index nothing: the run would fail at its first
    step with an IndexError, after the job was made. (An added token beyond them that the data never
    writes is harmless: some tokenizer classes add an unknown token of their own.)"""
    config = resolved.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    rows = getattr(text, "vocab_size", None)
    written = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    largest = max([tokenizer.vocab_size - 1] + [i for i in written if i is not None])
    if rows and largest >= rows:
        raise UserError(
            f"{resolved.name}: its tokenizer makes ids up to {largest:,} and the model's embedding has "
            f"{rows:,} rows, so ids from {rows:,} on have none; give the tokenizer this model was trained "
            "with (or resize the model's embeddings to the tokenizer first)"
        )


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
    if plan is not None and measures_free_memory(device):  # before step 1 and before the job is written
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
