"""Planned vs traced GPU memory of the whole training loop, at full 7B/8B size, without a GPU.

    python bench/plan_vs_trace.py                              # the whole matrix
    python bench/plan_vs_trace.py --write docs/planner.md         # and record the table there
    python bench/plan_vs_trace.py --models llama-2-7b --methods hift --budgets 8 24
    python bench/plan_vs_trace.py --models llama-2-7b --budgets 12 16 48 \
        --write docs/planner.md --section plan-vs-trace-budgets   # a part, as a table of its own
    python bench/plan_vs_trace.py --cases 'mistral-7b:sift bf16:12' 'qwen2.5-7b:hift drop:16'  # these

For each model, method (with its variants: HiFT's state policies, the sparse methods' bases,
streamed or resident) and GPU budget, it asks the planner for a plan exactly as `lowmem-ft run`
would on such a card, and where the plan fits, traces the recipe's own loop for that plan on fake
tensors (lowmem_ft/looptrace.py): several optimizer steps with gradient accumulation, HiFT's largest
groups with the next group's state prefetched, SIFT's selection, evaluation and checkpoint capture.

    planned   the plan's GPU peak less the planned CUDA context and allocator margin: its tensors
    traced    the largest live bytes of the traced tensors, anywhere in the loop
    ratio     planned / traced: never below 1 (the plan holds), at most 1.05 (it wastes nothing);
              a case outside that is printed and the script exits with 1 (after writing the table)

The trace measures tensors, not the CUDA context or the allocator's fragmentation: those are the
planner's constants (CUDA_CONTEXT_BYTES, ALLOCATOR_MARGIN), to be measured on a GPU
(bench/gpu_check.py). QLoRA is not traced: bitsandbytes' Params4bit cannot wrap a fake
tensor (tests/test_planner.py checks what it adds to LoRA's plan on real tensors).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_report, whatever the working directory
from _report import command_line, write_section  # noqa: E402

from lowmem_ft.config import RunConfig
from lowmem_ft.errors import UserError
from lowmem_ft.looptrace import trace_run
from lowmem_ft.planner.plan import ALLOCATOR_MARGIN, CUDA_CONTEXT_BYTES
from lowmem_ft.sizes import format_bytes

SECTION = "plan-vs-trace"
MODELS = ("llama-2-7b", "llama-3-8b", "qwen2.5-7b", "mistral-7b")
BUDGETS = (8, 12, 16, 24, 48)
# name -> RunConfig options; the planner chooses everything else, as in `lowmem-ft run`.
VARIANTS = {
    "full": {"method": "full"},
    "full --nproc 8": {"method": "full", "nproc": 8},
    "hift keep": {"method": "hift", "state_policy": "keep"},
    "hift keep-8bit": {"method": "hift", "state_policy": "keep-8bit"},
    "hift drop": {"method": "hift", "state_policy": "drop"},
    "hift --stream": {"method": "hift", "stream": True},
    "hift layers random-cycle": {"method": "hift", "trained_units": "layers", "order": "random-cycle"},
    "hift --nproc 4": {"method": "hift", "nproc": 4},  # rank 0 of 4, on torch's fake process group
    "sift bf16": {"method": "sift", "base_quant": "none"},
    "sift int8": {"method": "sift", "base_quant": "int8"},
    "sift nf4": {"method": "sift", "base_quant": "nf4"},
    "sift --stream": {"method": "sift", "stream": True},
    "random bf16": {"method": "random", "base_quant": "none"},
    "magnitude nf4": {"method": "magnitude", "base_quant": "nf4"},
    "lora": {"method": "lora", "base_quant": "none"},
    "bitfit": {"method": "bitfit"},
    "spafit": {"method": "spafit"},
}
# By default the first model gets every variant, the others these.
CORE = ("hift keep", "hift --stream", "sift nf4", "lora")
# Host RAM is not what this measures: a large one, so that the GPU alone decides the plan.
HOST = "1TiB"


def planned_tensor_bytes(plan) -> float:
    return (plan.gpu_peak_bytes - CUDA_CONTEXT_BYTES) / (1 + ALLOCATOR_MARGIN)


def run_case(model: str, variant: str, budget: int) -> dict:
    config = RunConfig.create(
        model=model, data=Path("trace.jsonl"), dtype="bf16", device="cpu", gpu_mem=f"{budget}GiB",
        cpu_mem=HOST, **VARIANTS[variant],
    )  # fmt: skip
    row = {"model": model, "method": variant, "budget": budget}
    started = time.perf_counter()
    try:
        plan, trace = trace_run(replace(config))
    except UserError as exc:
        return {**row, "fits": False, "note": str(exc).split(": ", 1)[-1][:90]}
    planned = planned_tensor_bytes(plan)
    chosen = {k: v for k, v in plan.settings.items() if k not in ("batch_size", "gradient_accumulation")}
    return {
        **row, "fits": True, "planned": planned, "traced": trace.peak, "ratio": planned / trace.peak,
        "plan_phase": plan.peak_phase, "trace_phase": trace.peak_phase, "host": trace.host_buffer_bytes,
        "settings": chosen, "seconds": time.perf_counter() - started,
    }  # fmt: skip


def settings_text(settings: dict) -> str:
    short = {
        "units_per_group": "m", "state_policy": "", "streamed_units": "streamed", "micro_batch_size": "mb",
        "sparsity": "rate", "base_quant": "", "gradient_checkpointing": None, "groups": None,
        "resident_units": None, "selection_passes": None, "cutoffs": "cutoffs", "ranks": "ranks",
    }  # fmt: skip
    parts = []
    for key, value in settings.items():
        label = short.get(key, key)
        if label is None or (key == "streamed_units" and not value):
            continue
        parts.append(f"{label} {value}" if label else str(value))
    return ", ".join(parts)


def ratio_text(ratio: float) -> str:
    """Three decimals, but a plan below its trace never shows as 1.000 (four, cut, not rounded)."""
    return f"{math.floor(ratio * 10_000) / 10_000:.4f}" if 0.9995 <= ratio < 1 else f"{ratio:.3f}"


def table(rows: list[dict]) -> str:
    lines = [
        "| model | method | GPU | plan | planned | traced | ratio | plan's peak | traced peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r["fits"]:
            lines.append(f"| {r['model']} | {r['method']} | {r['budget']} GiB | does not fit | | | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['method']} | {r['budget']} GiB | {settings_text(r['settings'])} "
            f"| {format_bytes(r['planned'])} | {format_bytes(r['traced'])} | {ratio_text(r['ratio'])} "
            f"| {r['plan_phase']} | {r['trace_phase']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument(
        "--methods", nargs="+", help="variant names or methods [default: all for the first model, then CORE]"
    )
    parser.add_argument(
        "--budgets", nargs="+", type=int, default=list(BUDGETS), help="GiB, for the first model"
    )
    parser.add_argument(
        "--other-budgets", nargs="+", type=int, help="GiB, for the other models [default: --budgets]"
    )
    parser.add_argument("--write", type=Path, help="put the table into this Markdown file")
    parser.add_argument(
        "--section", default=SECTION, help=f"the table's section of the --write file [default: {SECTION}]"
    )
    parser.add_argument("--jobs", type=int, default=2, help="cases traced side by side")
    parser.add_argument(
        "--cases", nargs="+", metavar="MODEL:VARIANT:GIB",
        help="these cases only, e.g. 'mistral-7b:sift bf16:12' (rows to trace again after a change)",
    )  # fmt: skip
    args = parser.parse_args()
    cases = []
    for case in args.cases or []:
        model, variant, budget = (case.rsplit(":", 2) + ["", ""])[:3]
        if not budget.isdigit():
            parser.error(f"--cases {case!r}: write MODEL:VARIANT:GIB, e.g. 'mistral-7b:sift bf16:12'")
        if variant not in VARIANTS:
            parser.error(f"--cases {case!r}: no variant {variant!r}; the variants are {', '.join(VARIANTS)}")
        cases.append((model, variant, int(budget)))
    for n, model in enumerate([] if args.cases else args.models):
        chosen = args.methods or (list(VARIANTS) if n == 0 else list(CORE))
        variants = [v for v in VARIANTS if v in chosen or VARIANTS[v]["method"] in chosen]
        budgets = args.budgets if n == 0 else (args.other_budgets or args.budgets)
        cases += [(model, variant, budget) for variant in variants for budget in budgets]
    # Each case in a fresh process (a trace must not see what an earlier one left behind), two at a time.
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=spawn, max_tasks_per_child=1) as pool:
        rows = []
        for row in pool.map(run_case, *zip(*cases, strict=True)):
            rows.append(row)
            shown = f"{ratio_text(row['ratio'])} ({row['seconds']:.0f}s)" if row["fits"] else "does not fit"
            print(f"{row['model']:12} {row['method']:15} {row['budget']:3} GiB  {shown}", flush=True)
    fitted = [r for r in rows if r["fits"]]
    summary = (
        f"{len(fitted)} plans that fit, traced: planned/traced from "
        f"{ratio_text(min(r['ratio'] for r in fitted))} to {ratio_text(max(r['ratio'] for r in fitted))}"
        if fitted
        else "no plan fits"
    )
    print(summary)
    if args.write:
        body = (
            f"Generated by `{command_line()}` (CPU only: fake tensors, lowmem_ft/looptrace.py). "
            f"*planned*: the plan's GPU peak less its CUDA context ({format_bytes(CUDA_CONTEXT_BYTES)}) "
            f"and allocator margin ({ALLOCATOR_MARGIN:.0%}); *traced*: the largest live bytes of the "
            f"loop's tensors. {summary}.\n\n{table(rows)}"
        )
        write_section(args.write, args.section, body)
        print(f"wrote {args.write}")
    # The promise: never below the trace (the plan holds), at most 5% above it (it wastes nothing).
    outside = [r for r in fitted if not 1 <= r["ratio"] <= 1.05]
    for r in outside:
        print(f"OUTSIDE [1, 1.05]: {r['model']} {r['method']} {r['budget']} GiB: {ratio_text(r['ratio'])}")
    if outside:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
