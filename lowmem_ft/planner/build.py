"""From command-line options to a plan: validate, read the model's shape, detect the machine, plan.

Both `lowmem-ft plan` and `lowmem-ft run` come through here, so the dry run and the real run
always agree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lowmem_ft.planner.plan import Plan, PlanRequest, make_plan
from lowmem_ft.planner.shapes import ModelShape, read_config, shape_from_config

COMPUTE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class PlanResult:
    model_name: str
    shape: ModelShape
    budget: object  # lowmem_ft.hardware.Budget
    plan: Plan


# The common options (RunConfig fields) the planner reads as they were given; with them, the
# method's own options (all of them: its planner reads what it needs).
PLANNED_AS_GIVEN = (
    "method", "cpu_mem", "seq_len", "batch_size", "micro_batch_size", "gradient_checkpointing", "nproc",
)  # fmt: skip


def planned_as_given(run) -> dict:
    """What `run` and `plan` pass to ``build_plan`` from a run's options (a RunConfig)."""
    return {**{name: getattr(run, name) for name in PLANNED_AS_GIVEN}, **asdict(run.method_options)}


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
    cuda_index: int = 0,  # the GPU torch calls cuda:N (`run --device cuda:N`): its memory is planned for
    nproc: int = 1,  # ranks (--nproc): the plan is one rank's, host memory the whole node's
    **method_options,
) -> PlanResult:
    """Plan MODEL (or an already-read ``config``) for this machine or the one the flags describe;
    ``method_options``: the method's own options by name (its package's options.py). The options
    must have been validated (lowmem_ft.config.RunConfig.validate); what is checked here depends on
    the model."""
    from lowmem_ft.hardware import detect_budget

    if config is None:
        config, name = read_config(model)
    else:
        name = model or config.get("_name_or_path", "model")
    shape = shape_from_config(config)
    budget = detect_budget(gpu_mem=gpu_mem, cpu_mem=cpu_mem, gpu=gpu, cuda_index=cuda_index)
    on_gpu = budget.gpu_bytes > 0
    compute = COMPUTE_BYTES[dtype] if dtype != "auto" else (2 if on_gpu else 4)
    request = PlanRequest.create(
        method,
        seq_len=seq_len,
        batch_size=batch_size,
        compute_bytes=compute,
        micro_batch_size=micro_batch_size,
        gradient_checkpointing=gradient_checkpointing,
        ranks=nproc,
        **method_options,
    )
    plan = make_plan(shape, request, budget.gpu_bytes, budget.host_bytes, budget.link_bytes_per_s)
    context = config.get("max_position_embeddings")
    if isinstance(context, int) and seq_len > context:  # (`run` warns alike, in its header)
        plan.notes.append(
            f"--seq-len {seq_len} is longer than {name}'s context ({context} positions, "
            f"max_position_embeddings): it never saw positions beyond it; --seq-len {context} stays within it"
        )
    return PlanResult(name, shape, budget, plan)
