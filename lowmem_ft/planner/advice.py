"""When a plan does not fit: what is short, by how much, and which other choice would fit."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import replace

from lowmem_ft.choices import flag
from lowmem_ft.distributed.ranks import SHARDED_METHODS
from lowmem_ft.planner.types import Plan, PlanRequest
from lowmem_ft.registry import planned_options
from lowmem_ft.sizes import format_bytes_up

# The methods to suggest when a method does not fit with any of its own choices: the closest in what
# they train, that need less memory. BitFit and SPAFIT train little but keep the whole 16-bit base on
# the GPU, where LoRA and SIFT can quantise (or stream) it.
_INSTEAD = {
    "full": ("hift", "sift"),
    "hift": ("sift", "lora"),
    "bitfit": ("lora", "sift"),
    "spafit": ("lora", "sift"),
}


def shortfall(plan: Plan, request: PlanRequest, replan: Callable[[PlanRequest], Plan]) -> str:
    """What is short, by how much, and what would fit instead (``replan``: the same machine's plan
    for another request)."""

    parts = []
    gpu_short = plan.device == "cuda" and plan.gpu_peak_bytes > plan.gpu_budget_bytes
    if gpu_short:
        parts.append(f"needs {format_bytes_up(plan.gpu_peak_bytes - plan.gpu_budget_bytes)} more GPU memory")
    if plan.host_peak_bytes > plan.host_budget_bytes:
        parts.append(f"needs {format_bytes_up(plan.host_peak_bytes - plan.host_budget_bytes)} more host RAM")
    message = " and ".join(parts) or "does not fit"
    alternatives = []
    policy_given = getattr(request.options, "state_policy", None)  # HiFT's
    if policy_given not in (None, "drop"):
        for policy in ("keep-8bit", "drop"):
            if policy != policy_given and not (policy == "keep-8bit" and request.ranks > 1):
                trial = replan(request.with_options(state_policy=policy))
                if trial.fits:
                    alternatives.append(f"--state-policy {policy} would fit")
                    break
    # Options the user pinned that the planner would choose (the step's, and the method's own: HiFT's
    # --units-per-group, SIFT's --sparsity, ...): would its own choice fit? One at a time, then all.
    common = [o for o in ("micro_batch_size", "gradient_checkpointing") if getattr(request, o) is not None]
    own = [
        option
        for option in planned_options(request.method)
        if option != "state_policy"  # (tried above, policy by policy)
        and getattr(request.options, option, None) is not None
    ]
    pinned = {option: flag(option) for option in common + own}
    trials = [[option] for option in pinned] + ([list(pinned)] if len(pinned) > 1 else [])
    for options in trials:
        freed = replace(request, **{o: None for o in options if o in common})
        freed = freed.with_options(**{o: None for o in options if o in own})
        if replan(freed).fits:
            alternatives.append(
                f"leaving {' and '.join(pinned[o] for o in options)} to the planner would fit"
            )
            break
    fixed_on_this_gpu = bool(alternatives)  # with the same method: no need for more GPUs
    if not alternatives:
        this_gpu = _same_method_on_this_gpu(request, replan) if gpu_short else []
        fixed_on_this_gpu = bool(this_gpu)
        shorter = [] if this_gpu or not gpu_short else _shorter_sequences(request, replan)
        alternatives = this_gpu + shorter + _other_methods(request, replan, [pinned[o] for o in common])
    # With every other choice: how many such GPUs FSDP2 would need
    if not fixed_on_this_gpu and gpu_short and request.method in SHARDED_METHODS:
        alternatives += _enough_gpus(request, replan)
    return message + ("; " + "; ".join(alternatives) if alternatives else "")


def _other_methods(
    request: PlanRequest, replan: Callable[[PlanRequest], Plan], pinned: list[str]
) -> list[str]:
    """The methods closest to this one that would fit: with the step's options the user gave
    (``pinned``, e.g. --micro-batch-size), or else with the planner choosing them; the options of
    this method they do not take are named, as following the advice means leaving them out."""
    given = request.options
    alternatives = []
    for method in _INSTEAD.get(request.method, ()):
        other = PlanRequest(
            method, request.seq_len, request.batch_size, request.compute_bytes, request.micro_batch_size,
            request.gradient_checkpointing, ranks=request.ranks,
        )  # fmt: skip
        if replan(other).fits:
            freed = ""
        elif pinned and replan(replace(other, micro_batch_size=None, gradient_checkpointing=None)).fits:
            freed = f", leaving {' and '.join(pinned)} to the planner"
        else:
            continue
        left_out = [
            flag(field.name)
            for field in dataclasses.fields(given)
            if getattr(given, field.name) != field.default and field.name not in other.options.names()
        ]
        without = f" (without {' '.join(left_out)})" if left_out else ""
        alternatives.append(f"--method {method} would fit{freed}{without}")
    return alternatives


def _same_method_on_this_gpu(request: PlanRequest, replan: Callable[[PlanRequest], Plan]) -> list[str]:
    """Short of GPU memory with the method's own choices: what else about the run would fit on
    this GPU, the first of: one process where ranks were asked for (a process alone may stream
    layers and keep HiFT's state in 8 bits, ranks do neither), HiFT training the decoder layers only
    (the embedding and head are its largest groups' bulk)."""
    if request.ranks > 1 and replan(replace(request, ranks=1)).fits:
        return ["--nproc 1 would fit (one process may stream layers or keep 8-bit state; ranks do neither)"]
    trained_units = getattr(request.options, "trained_units", None)
    if trained_units == "all" and replan(request.with_options(trained_units="layers")).fits:
        return ["--trained-units layers would fit (the embedding and head stay as they are)"]
    return []


def _shorter_sequences(request: PlanRequest, replan: Callable[[PlanRequest], Plan]) -> list[str]:
    """The longest --seq-len, halving down to 128, that would fit (activations shrink with it)."""
    seq_len = request.seq_len // 2
    while seq_len >= 128:
        if replan(replace(request, seq_len=seq_len)).fits:
            return [f"--seq-len {seq_len} would fit"]
        seq_len //= 2
    return []


def _enough_gpus(request: PlanRequest, replan: Callable[[PlanRequest], Plan]) -> list[str]:
    """How many GPUs of this size FSDP2 would need to hold the model (per-rank memory shrinks with
    the shards; the gathered layers and activations stay): the smallest power of two that fits, on
    one machine (--nproc starts its ranks there: 8 GPUs at most)."""
    for ranks in (2, 4, 8):
        if ranks <= request.ranks:
            continue
        # a multiple of the ranks, and each rank's share at least a micro-batch the user gave
        batch = max(-(-request.batch_size // ranks), request.micro_batch_size or 1) * ranks
        trial = replan(replace(_without_what_ranks_cannot_do(request), ranks=ranks, batch_size=batch))
        if trial.gpu_peak_bytes <= trial.gpu_budget_bytes:
            resized = f" and --batch-size {batch}" if batch != request.batch_size else ""
            how = f"--nproc {ranks}{resized}; docs/distributed.md"
            if trial.host_peak_bytes <= trial.host_budget_bytes:
                return [f"{ranks} such GPUs would fit ({how})"]
            return [
                f"{ranks} such GPUs would hold its GPU memory ({how}), with "
                f"{format_bytes_up(trial.host_peak_bytes)} of host RAM for their ranks, "
                f"{format_bytes_up(trial.host_peak_bytes - trial.host_budget_bytes)} more than this machine's"
            ]
    return []


def _without_what_ranks_cannot_do(request: PlanRequest) -> PlanRequest:
    """The ranks neither stream nor keep HiFT's state in 8 bits (docs/distributed.md)."""
    changes = {}
    if getattr(request.options, "stream", False):
        changes["stream"] = False
    if getattr(request.options, "state_policy", None) == "keep-8bit":
        changes["state_policy"] = None
    return request.with_options(**changes) if changes else request
