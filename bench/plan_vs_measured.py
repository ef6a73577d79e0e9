"""Planned vs measured GPU memory: does the planner's peak match a real training step on this GPU?

    python bench/plan_vs_measured.py                                    # print the table
    python bench/plan_vs_measured.py --write docs/benchmarks.md         # and record it
    python bench/plan_vs_measured.py --models qwen2.5-0.5b --methods full --seq-len 512 --steps 3

For each model alias and each method that is both trainable (``lowmem_ft.methods.METHODS``) and
plannable (``lowmem_ft.planner.PLANNABLE_METHODS``), it asks the planner for a plan on the GPU it
finds (the planner's own micro-batch and checkpointing, then a few fixed settings), then runs
``--steps`` optimizer steps the way the recipe in ``lowmem_ft/train.py`` does and compares the
plan's GPU peak with what CUDA and NVML saw:

    planned GPU peak   build_plan(...).plan.gpu_peak_bytes: tensor peak + CUDA context + allocator margin
    max allocated      torch.cuda.max_memory_allocated(): the tensors' high-water mark
    max reserved       torch.cuda.max_memory_reserved(): what the caching allocator took from the driver
    NVML used          the device's used memory after the steps, as nvidia-smi shows it

The model has random weights, built from the alias's shipped config.json (no download: memory does
not depend on the values), and the batches are random token ids without padding, every sequence
exactly ``--seq-len`` tokens long, which is the case the planner's activation formula describes.

Without a CUDA device it measures nothing, says so, and with ``--write`` records that in the section.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_report, whatever the working directory
from _report import command_line, write_section  # noqa: E402

from lowmem_ft.hardware import format_bytes
from lowmem_ft.methods import METHODS
from lowmem_ft.models.registry import ALIASES
from lowmem_ft.planner import PLANNABLE_METHODS, PlanResult, build_plan, read_config, render_plan
from lowmem_ft.planner.plan import ALLOCATOR_MARGIN, CUDA_CONTEXT_BYTES

SECTION = "plan-vs-measured"
DEFAULT_MODELS = ("qwen2.5-0.5b", "qwen2.5-1.5b")
COMPUTE_DTYPE = torch.bfloat16
NOT_FIT = "does not fit (planner)"


@dataclass
class Case:
    model: str
    method: str
    chosen_by: str  # "planner" or "fixed"
    config: dict  # the alias's shipped config.json
    result: PlanResult

    @property
    def micro_batch(self) -> int:
        return self.result.plan.settings["micro_batch_size"]

    @property
    def checkpointing(self) -> bool:
        return self.result.plan.settings["gradient_checkpointing"]


@dataclass
class Measurement:
    max_allocated: int
    max_reserved: int
    nvml_used: int | None
    tokens_per_s: float | None  # steps 2..N; None with a single step
    attention: str  # the attention implementation transformers picked
    oom: bool = False


# -- arguments ------------------------------------------------------------------------------------
def plannable_methods() -> list[str]:
    """Methods that can both be trained and be planned (today: full)."""
    return [m for m in METHODS if m in PLANNABLE_METHODS]


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model aliases")
    parser.add_argument(
        "--methods",
        default=",".join(plannable_methods()),
        help=f"comma-separated methods (trainable and plannable: {', '.join(plannable_methods())})",
    )
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    parser.add_argument(
        "--batch-size", type=int, default=16, help="sequences per optimizer step (default 16)"
    )
    parser.add_argument(
        "--micro-batches",
        default="1,4",
        help="fixed micro-batch sizes to run besides the planner's choice, each with checkpointing "
        "off and on (default 1,4; empty for none)",
    )
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per case (default 3)")
    parser.add_argument("--write", type=Path, metavar="FILE", help="record the results in FILE's section")
    args = parser.parse_args(argv)

    args.models = _names(args.models)
    args.methods = _names(args.methods)
    unknown = [m for m in args.models if m not in ALIASES]
    if unknown or not args.models:
        parser.error(
            f"--models: unknown alias {', '.join(unknown) or '(none)'}; choose from {', '.join(ALIASES)}"
        )
    bad = [m for m in args.methods if m not in plannable_methods()]
    if bad or not args.methods:
        parser.error(
            f"--methods: {', '.join(bad) or '(none)'} cannot be both trained and planned; "
            f"choose from {', '.join(plannable_methods())}"
        )
    try:
        args.micro_batches = [int(n) for n in _names(args.micro_batches)]
    except ValueError:
        parser.error(f"--micro-batches must be comma-separated integers, got {args.micro_batches!r}")
    if args.seq_len < 8:
        parser.error("--seq-len must be at least 8")
    if args.batch_size < 1 or any(n < 1 for n in args.micro_batches):
        parser.error("--batch-size and --micro-batches must be at least 1")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


# -- planning -------------------------------------------------------------------------------------
def plan_cases(args: argparse.Namespace) -> list[Case]:
    """The planner's choice for each (model, method), then the fixed settings that differ from it.

    Called before this process allocates anything on the GPU: the planner budgets with NVML's free
    memory, which is what a fresh `lowmem-ft run` would see, not what is left beside our own CUDA
    context and cached blocks.
    """
    cases = []
    for alias in args.models:
        config, _ = read_config(alias)
        for method in args.methods:
            common = {"method": method, "seq_len": args.seq_len, "batch_size": args.batch_size}
            chosen = Case(alias, method, "planner", config, build_plan(alias, **common))
            cases.append(chosen)
            for micro_batch in args.micro_batches:
                if micro_batch > args.batch_size:
                    continue
                for checkpointing in (False, True):
                    if (micro_batch, checkpointing) == (chosen.micro_batch, chosen.checkpointing):
                        continue  # already measured as the planner's choice
                    result = build_plan(
                        alias, **common, micro_batch_size=micro_batch, gradient_checkpointing=checkpointing
                    )
                    cases.append(Case(alias, method, "fixed", config, result))
    return cases


# -- NVML -----------------------------------------------------------------------------------------
def nvml_open():
    """pynvml, initialised, or None (not installed, no driver)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    return pynvml


def nvml_handle(pynvml, device: int):
    """NVML's handle for torch's ``cuda:device``. NVML numbers GPUs by PCI bus and ignores
    CUDA_VISIBLE_DEVICES; torch's own mapping reads only the variable and NVML, so it can be asked
    before CUDA is initialised (the baseline reading must not include our own context). The UUID
    match is the fallback; it initialises CUDA."""
    if pynvml is None:
        return None
    try:
        return pynvml.nvmlDeviceGetHandleByIndex(torch.cuda._get_nvml_device_index(device))
    except Exception:
        pass
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    for candidate in (uuid, f"GPU-{uuid}"):
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(candidate)
        except Exception:
            continue
    return None


def nvml_used(pynvml, handle) -> int | None:
    # Whole-device figure: includes this process's CUDA context (and cuBLAS workspaces), which the
    # allocator does not count, and memory held by any other process on the card.
    if handle is None:
        return None
    return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)


def nvml_name(pynvml, handle) -> str:
    if handle is None:
        return "unknown (NVML unavailable)"
    name = pynvml.nvmlDeviceGetName(handle)
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)


# -- measuring ------------------------------------------------------------------------------------
def synthetic_step(vocab: int, seq_len: int, batch_size: int, micro_batch: int, generator) -> list[dict]:
    """One optimizer step of random token ids, split like the recipe's Batcher: consecutive
    micro-batches of ``micro_batch`` sequences, the last one smaller if the batch does not divide."""
    micro_batches = []
    for start in range(0, batch_size, micro_batch):
        ids = torch.randint(0, vocab, (min(micro_batch, batch_size - start), seq_len), generator=generator)
        micro_batches.append(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        )
    return micro_batches


def measure(case: Case, args: argparse.Namespace, device: torch.device, pynvml, handle) -> Measurement:
    """Build the model on the GPU, run the steps, read the memory counters.

    Everything this allocates is local to this function; the caller collects and empties the CUDA
    cache after it returns, so the next case starts from an empty allocator.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowmem_ft.config import RunConfig
    from lowmem_ft.methods import build_method
    from lowmem_ft.train import enable_checkpointing, loss_sum, target_count

    run_config = RunConfig(
        model=case.model,
        data=Path("bench.jsonl"),
        method=case.method,
        lr=1e-5,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        micro_batch_size=case.micro_batch,
        gradient_checkpointing=case.checkpointing,
    )
    torch.manual_seed(0)
    method = build_method(case.method)
    config = AutoConfig.for_model(**case.config)
    try:
        # Built directly on the GPU, as the recipe's model ends up after .to(device); random weights
        # take the same memory as real ones. The dtype is explicit: from_config would otherwise
        # follow the config's torch_dtype (bf16), not the method's fp32 master weights.
        with device:
            model = AutoModelForCausalLM.from_config(config, dtype=method.weight_dtype(run_config))
        # The same order as train.setup: checkpointing, no KV cache (it only costs memory in
        # training), then the method marks trainable parameters and builds its optimizer.
        if case.checkpointing:
            enable_checkpointing(model)
        model.config.use_cache = False
        method.setup(model, run_config)
        model.train()  # checkpointing is only active in training mode
        attention = str(getattr(model.config, "_attn_implementation", "?"))

        generator = torch.Generator().manual_seed(0)
        # Peak since here: the weights (and nothing else) are already counted as allocated.
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        started, timed_tokens = None, 0
        for step in range(args.steps):
            if step == 1:  # untimed first step: kernel selection, the optimizer's first allocations
                torch.cuda.synchronize(device)
                started = time.perf_counter()
            micro_batches = synthetic_step(
                config.vocab_size, args.seq_len, args.batch_size, case.micro_batch, generator
            )
            # As in train.train: normalise by the whole step's target tokens, backward per micro-batch.
            method.begin_step(step)
            n_targets = max(1, sum(target_count(mb) for mb in micro_batches))
            for mb in micro_batches:
                total = loss_sum(model, mb, device, COMPUTE_DTYPE)
                (total / n_targets).backward()
                total.item()  # the recipe syncs here to log the loss
                if step >= 1:
                    timed_tokens += int(mb["attention_mask"].sum())
            if run_config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(method.trainable_parameters(), run_config.grad_clip)
            method.optimizer.step()
            method.optimizer.zero_grad(set_to_none=True)  # frees the gradients before the next forward
            method.end_step(step)
        torch.cuda.synchronize(device)
        tokens_per_s = timed_tokens / (time.perf_counter() - started) if started is not None else None
    except torch.cuda.OutOfMemoryError:
        # The high-water marks at the failed allocation still say how far the run got.
        return Measurement(
            torch.cuda.max_memory_allocated(device),
            torch.cuda.max_memory_reserved(device),
            nvml_used(pynvml, handle),
            None,
            "?",
            oom=True,
        )
    # NVML has no peak, only the current figure; the caching allocator keeps the blocks it reserved
    # at the peak until empty_cache(), so right after the steps it still holds about max reserved.
    measured = Measurement(
        torch.cuda.max_memory_allocated(device),
        torch.cuda.max_memory_reserved(device),
        nvml_used(pynvml, handle),
        tokens_per_s,
        attention,
    )
    del model, method
    return measured


def free_cuda() -> None:
    # Drop the previous case's tensors (reference cycles included) and hand the cached blocks back
    # to the driver, so each case's reserved and NVML figures are its own.
    gc.collect()
    torch.cuda.empty_cache()


# -- reporting ------------------------------------------------------------------------------------
HEADER = (
    "model",
    "method",
    "chosen by",
    "micro-batch",
    "checkpointing",
    "planned GPU peak",
    "max allocated",
    "max reserved",
    "NVML used",
    "plan vs reserved",
    "plan vs NVML",
    "tokens/s",
)


def _error(planned: int, measured: int | None) -> str:
    """Signed error of the plan relative to the measurement: + means the plan over-estimates."""
    if measured is None or measured <= 0:  # NVML's baseline can move when other processes exit
        return "-"
    return f"{100 * (planned - measured) / measured:+.1f}%"


def row(case: Case, measured: Measurement | None, nvml_before: int | None) -> list[str]:
    plan = case.result.plan
    accumulation = math.ceil(plan.settings["batch_size"] / case.micro_batch)
    cells = [
        case.model,
        case.method,
        case.chosen_by,
        f"{case.micro_batch} (×{accumulation})",
        "on" if case.checkpointing else "off",
        format_bytes(plan.gpu_peak_bytes),
    ]
    if measured is None:
        return cells + [NOT_FIT, "", "", "", "", ""]
    nvml = format_bytes(measured.nvml_used) if measured.nvml_used is not None else "n/a"
    if measured.oom:
        return cells + [
            f"OOM (≥ {format_bytes(measured.max_allocated)})",
            format_bytes(measured.max_reserved),
            nvml,
            "OOM",
            "OOM",
            "-",
        ]
    speed = f"{measured.tokens_per_s:,.0f}" if measured.tokens_per_s is not None else "-"
    ours = None if None in (measured.nvml_used, nvml_before) else measured.nvml_used - nvml_before
    return cells + [
        format_bytes(measured.max_allocated),
        format_bytes(measured.max_reserved),
        nvml,
        _error(plan.gpu_peak_bytes, measured.max_reserved),
        # Against this process's share of NVML's figure: the plan knows nothing of other processes.
        _error(plan.gpu_peak_bytes, ours),
        speed,
    ]


def markdown_table(rows: list[list[str]]) -> str:
    right = {"planned GPU peak", "max allocated", "max reserved", "NVML used", "plan vs reserved"}
    right |= {"plan vs NVML", "tokens/s", "micro-batch"}
    lines = ["| " + " | ".join(HEADER) + " |"]
    lines.append("|" + "|".join("---:" if h in right else "---" for h in HEADER) + "|")
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def versions() -> str:
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}"


def today() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")


def not_measured_section(command: str) -> str:
    return "\n".join(
        [
            "## Planned vs measured GPU memory",
            "",
            "Not measured: no GPU was available when this section was last written (the script needs CUDA).",
            "",
            f"To measure, run on a machine with an NVIDIA GPU: `{command}`",
            "",
            f"Last attempted {today()} with {versions()}.",
        ]
    )


def measured_section(
    args: argparse.Namespace,
    command: str,
    device_line: str,
    attention: str,
    baseline: str,
    table: str,
    breakdown: str,
) -> str:
    return "\n".join(
        [
            "## Planned vs measured GPU memory",
            "",
            f"Measured on {device_line}; {versions()}; attention: {attention}; {today()} (UTC).",
            "",
            f"Command: `{command}`",
            "",
            f"Each row builds the model with random weights from the alias's shipped config on the GPU and "
            f"runs {args.steps} optimizer steps of {args.batch_size} sequences × {args.seq_len} tokens of "
            "random token ids, as the recipe does: bf16 autocast, loss summed per micro-batch and divided "
            "by the step's target tokens, gradient clipping, AdamW, `zero_grad(set_to_none=True)`. "
            "*chosen by planner* is the plan `lowmem-ft run` would adopt on this GPU; *fixed* rows pin "
            "the micro-batch (× gradient accumulation steps) and checkpointing.",
            "",
            f"*planned GPU peak* is the plan's `gpu_peak_bytes`: the tensor peak plus "
            f"{format_bytes(CUDA_CONTEXT_BYTES)} for the CUDA context and a {ALLOCATOR_MARGIN:.0%} "
            "allocator margin. *max allocated* and *max reserved* are torch's high-water "
            "marks from just before the first step (weights included). *NVML used* is the whole device "
            "after the last step: it includes the CUDA context, which the allocator does not count, and "
            f"any other process ({baseline}); *plan vs NVML* compares with NVML used minus that "
            "baseline. Errors are (planned − measured) / measured: positive means the plan "
            f"over-estimates; *plan vs reserved* is biased upward by the {format_bytes(CUDA_CONTEXT_BYTES)} "
            "of context the plan counts."
            " *tokens/s* is over steps 2 and later.",
            "",
            table,
            "",
            "<details><summary>The planner's breakdown for the first row</summary>",
            "",
            "```text",
            breakdown,
            "```",
            "",
            "</details>",
        ]
    )


# -- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = command_line(None if argv is None else [sys.argv[0], *argv])

    # Asks the driver how many devices there are; creates no CUDA context, allocates nothing.
    if not torch.cuda.is_available():
        print("no CUDA device: nothing measured")
        if args.write:
            write_section(args.write, SECTION, not_measured_section(command))
            print(f"wrote the 'not measured' section of {args.write}")
        return 0

    pynvml = nvml_open()
    # torch's default device, named rather than asked for: asking initialises CUDA.
    device = torch.device("cuda", 0)
    handle = nvml_handle(pynvml, device.index)
    # Before this process has a CUDA context: other processes and the driver's own reservation.
    before = nvml_used(pynvml, handle)
    cases = plan_cases(args)  # before any CUDA allocation: see plan_cases
    baseline = (
        f"{format_bytes(before)} was in use before this script allocated anything"
        if before is not None
        else "NVML unavailable"
    )
    device_line = (
        f"**{torch.cuda.get_device_name(device)}** (NVML: {nvml_name(pynvml, handle)}, "
        f"{format_bytes(torch.cuda.get_device_properties(device).total_memory)})"
    )

    first = cases[0].result
    breakdown = render_plan(first.plan, first.model_name, first.budget.describe())
    print(breakdown, end="\n\n")

    rows, attentions = [], set()
    for case in cases:
        label = (
            f"{case.model} {case.method} ({case.chosen_by}): micro-batch {case.micro_batch}, "
            f"checkpointing {'on' if case.checkpointing else 'off'}"
        )
        if not case.result.plan.fits:
            print(f"{label}: {NOT_FIT}: {case.result.plan.shortfall}", flush=True)
            rows.append(row(case, None, before))
            continue
        print(f"{label}: measuring ...", flush=True)
        measured = measure(case, args, device, pynvml, handle)
        free_cuda()
        attentions.add(measured.attention)
        rows.append(row(case, measured, before))
        print(
            "  " + " | ".join(f"{h}: {c}" for h, c in zip(HEADER[5:], rows[-1][5:], strict=True)), flush=True
        )

    table = markdown_table(rows)
    attention = ", ".join(sorted(attentions - {"?"})) or "unknown"
    print()
    print(f"{device_line}; {versions()}; attention: {attention}; {baseline}")
    print(table)
    if args.write:
        write_section(
            args.write,
            SECTION,
            measured_section(args, command, device_line, attention, baseline, table, breakdown),
        )
        print(f"\nwrote the section of {args.write}")
    if pynvml is not None:
        pynvml.nvmlShutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
