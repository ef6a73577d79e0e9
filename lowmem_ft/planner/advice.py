"""When a plan does not fit: what is short, by how much, and which other choice would fit."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

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
    if plan.device == "cuda" and plan.gpu_peak_bytes > plan.gpu_budget_bytes:
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
    pinned = {option: "--" + option.replace("_", "-") for option in common + own}
    trials = [[option] for option in pinned] + ([list(pinned)] if len(pinned) > 1 else [])
    for options in trials:
        freed = replace(request, **{o: None for o in options if o in common})
        freed = freed.with_options(**{o: None for o in options if o in own})
        if replan(freed).fits:
            alternatives.append(
                f"leaving {' and '.join(pinned[o] for o in options)} to the planner would fit"
            )
            break
    gpu_short = plan.device == "cuda" and plan.gpu_peak_bytes > plan.gpu_budget_bytes
    if not alternatives and gpu_short:
        alternatives += _same_method_on_this_gpu(request, replan)
    fixed_on_this_gpu = bool(alternatives)  # with the same method: no need for more GPUs
    if not alternatives:
        for method in _INSTEAD.get(request.method, ()):
            # its own defaults for its options
            other = PlanRequest(
                method, request.seq_len, request.batch_size, request.compute_bytes, ranks=request.ranks
            )
            trial = replan(other)
            if trial.fits:
                alternatives.append(f"--method {method} would fit")
    # With every other choice: how many such GPUs FSDP2 would need
    if not fixed_on_this_gpu and gpu_short and request.method in SHARDED_METHODS:
        alternatives += _enough_gpus(request, replan)
    return message + ("; " + "; ".join(alternatives) if alternatives else "")


def _same_method_on_this_gpu(request: PlanRequest, replan: Callable[[PlanRequest], Plan]) -> list[str]:
    """Short of GPU memory with the method's own choices: what else about the run would fit on
    this GPU, the first of: one process where ranks were asked for (one process streams layers,
    ranks do not), HiFT training the decoder layers only (the embedding and head are its largest
    groups' bulk), a shorter --seq-len (activations)."""
    if request.ranks > 1 and replan(replace(request, ranks=1)).fits:
        return ["one process would fit (--nproc 1: it streams layers from host memory, ranks do not)"]
    trained_units = getattr(request.options, "trained_units", None)
    if trained_units == "all" and replan(request.with_options(trained_units="layers")).fits:
        return ["--trained-units layers would fit (the embedding and head stay as they are)"]
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
        batch = -(-request.batch_size // ranks) * ranks  # a multiple of the ranks
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
