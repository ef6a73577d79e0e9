"""From command-line options to a plan: validate, read the model's shape, detect the machine, plan.

Both `lowmem-ft plan` and `lowmem-ft run` come through here, so the dry run and the real run
always agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowmem_ft.errors import UserError
from lowmem_ft.planner.plan import Plan, PlanRequest, make_plan
from lowmem_ft.planner.shapes import ModelShape, read_config, shape_from_config

COMPUTE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class PlanResult:
    model_name: str
    shape: ModelShape
    budget: object  # lowmem_ft.hardware.Budget
    plan: Plan


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


# The run's options (RunConfig fields) that `run` and `plan` pass to build_plan as they were given.
PLANNED_AS_GIVEN = (
    "method", "cpu_mem", "seq_len", "batch_size", "micro_batch_size", "gradient_checkpointing",
    "units_per_group", "state_policy", "groups", "sparsity", "base_quant", "targets", "stream",
    "lora_rank", "cutoffs", "variant", "add_biases", "freeze_layers", "order", "switch_every",
)  # fmt: skip


def build_plan(
    model: str | None = None,
    *,
    config: dict | None = None,
    method: str = "full",
    gpu_mem: str | None = None,
    cpu_mem: str | None = None,
    gpu: str | None = None,
    seq_len: int = 512,
    batch_size: int = 16,
    micro_batch_size: int | None = None,
    gradient_checkpointing: bool | None = None,
    dtype: str = "auto",
    units_per_group: int | None = None,
    state_policy: str | None = None,
    sparsity: float | None = None,
    base_quant: str | None = None,
    groups: int | None = None,
    targets: str = "all-linear",
    selection_batches: int = 1,
    stream: bool = False,
    lora_rank: int = 8,
    cutoffs: str | None = None,
    variant: str = "I",
    add_biases: bool = False,
    freeze_layers: str | None = None,
    order: str = "bottom-up",
    switch_every: int = 1,
    cuda_index: int = 0,  # the GPU torch calls cuda:N (`run --device cuda:N`): its memory is planned for
) -> PlanResult:
    """Plan MODEL (or an already-read ``config``) for this machine or the one the flags describe.
    The options must have been validated (lowmem_ft.config.RunConfig.validate)."""
    from lowmem_ft.hardware import detect_budget

    # The options were checked where they were given (RunConfig.validate: `run`, `plan`, `resume`);
    # what is checked here depends on the model.
    if config is None:
        config, name = read_config(model)
    else:
        name = model or config.get("_name_or_path", "model")
    shape = shape_from_config(config)
    if units_per_group is not None:
        _check(
            units_per_group <= len(shape.units),
            f"--units-per-group {units_per_group} is more than the model's {len(shape.units)} units",
        )
    if groups is not None:  # HiFT: k groups of about equal size
        _check(
            1 <= groups <= len(shape.units),
            f"--groups must be between 1 and {len(shape.units)}, got {groups}",
        )
        units_per_group = -(-len(shape.units) // groups)
    budget = detect_budget(gpu_mem=gpu_mem, cpu_mem=cpu_mem, gpu=gpu, cuda_index=cuda_index)
    on_gpu = budget.gpu_bytes > 0
    compute = COMPUTE_BYTES[dtype] if dtype != "auto" else (2 if on_gpu else 4)
    request = PlanRequest(
        method=method,
        seq_len=seq_len,
        batch_size=batch_size,
        compute_bytes=compute,
        micro_batch_size=micro_batch_size,
        gradient_checkpointing=gradient_checkpointing,
        units_per_group=units_per_group,
        state_policy=state_policy,
        sparsity=sparsity,
        base_quant=base_quant,
        targets=targets,
        selection_batches=selection_batches,
        stream=stream,
        lora_rank=lora_rank,
        cutoffs=cutoffs,
        variant=variant,
        add_biases=add_biases,
        freeze_layers=freeze_layers,
        order=order,
        switch_every=switch_every,
    )
    plan = make_plan(shape, request, budget.gpu_bytes, budget.host_bytes, budget.link_bytes_per_s)
    return PlanResult(name, shape, budget, plan)
