"""The plan as people read it (a table) and as programs read it (JSON)."""

from __future__ import annotations

from lowmem_ft.planner.plan import ASSUMED_FLOPS, Plan
from lowmem_ft.sizes import format_bytes


def _cell(n: int) -> str:
    return format_bytes(n) if n else "-"


def render_plan(plan: Plan, model_name: str, budget_line: str) -> str:
    lines = [
        f"plan       {model_name}, --method {plan.method}, on {plan.device}",
        f"machine    {budget_line}",
        "settings   " + "  ".join(f"{k}={v}" for k, v in plan.settings.items()),
        "",
    ]
    if plan.ranks > 1:
        lines.insert(
            2,
            f"ranks      {plan.ranks} (--nproc): GPU memory per rank; host rows per rank (a model loaded "
            f"once, once), the host peak and budget the node's, its {plan.ranks} ranks together",
        )
    width = max(len(c.name) for c in plan.components) + 2
    lines.append(f"{'component'.ljust(width)}{'GPU':>12}{'host':>12}  note")
    for c in plan.components:
        lines.append(
            f"{c.name.ljust(width)}{_cell(c.gpu_bytes):>12}{_cell(c.host_bytes):>12}  {c.note}".rstrip()
        )
    lines.append(f"{'peak (not the sum: see docs/planner.md)'.ljust(width)}{_cell(plan.gpu_peak_bytes):>12}"
                 f"{_cell(plan.host_peak_bytes):>12}")  # fmt: skip
    lines.append(
        f"{'budget'.ljust(width)}{_cell(plan.gpu_budget_bytes):>12}{_cell(plan.host_budget_bytes):>12}"
    )
    if plan.peak_phase:
        lines.append(f"peak at    {plan.peak_phase}")
    lines.append("")
    fraction = plan.trainable_params / plan.total_params if plan.total_params else None
    share = "-" if fraction is None else f"{fraction:.2%}" if fraction >= 1e-3 else f"{fraction:.4%}"
    lines.append(f"trainable  {plan.trainable_params:,} of {plan.total_params:,} parameters ({share})")
    if plan.traffic_bytes_per_step and plan.device == "cuda":  # (on the CPU nothing crosses a link)
        seconds = plan.traffic_bytes_per_step / plan.link_bytes_per_s
        lines.append(
            f"traffic    {format_bytes(plan.traffic_bytes_per_step)} host<->GPU per optimizer step "
            f"(≈ {seconds * 1000:,.0f} ms at {plan.link_bytes_per_s / 1e9:.1f} GB/s)"
        )
    if plan.stream_seconds_per_micro_batch is not None:
        lines.append(
            f"streaming  {plan.stream_seconds_per_micro_batch * 1000:,.0f} ms of copying per micro-batch, "
            f"≈ {plan.compute_seconds_per_micro_batch * 1000:,.0f} ms of compute (at an assumed "
            f"{ASSUMED_FLOPS / 1e12:.0f} TFLOPS; copies overlap with compute)"
        )
    for note in plan.notes:
        lines.append(f"note       {note}")
    if plan.fits:
        headroom = [f"{format_bytes(plan.host_budget_bytes - plan.host_peak_bytes)} host"]
        if plan.device == "cuda":
            headroom.insert(0, f"{format_bytes(plan.gpu_budget_bytes - plan.gpu_peak_bytes)} GPU")
        lines.append(f"fits       yes, with {' and '.join(headroom)} to spare")
        if plan.thin_spare_note:
            lines.append(f"note       {plan.thin_spare_note}")
    else:
        lines.append(f"fits       NO: {plan.shortfall}")
    return "\n".join(lines)
