"""Step time of SIFT (and its quantised-base variants) against full fine-tuning, measured in one run.

    python bench/sift_speed.py --write docs/benchmarks.md

The same random-initialised Llama and batch as bench/hift_speed.py (12.6M parameters), the
recipe's own step for each method, after SIFT's selection (not timed). On a CPU only time is
compared; peak GPU memory against the planner and tokens/s need a CUDA device and are reported
as not measured here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import command_line, write_section  # noqa: E402
from hift_speed import step_times  # noqa: E402
from quickstart import machine  # noqa: E402

RUNS = [
    ("full fine-tuning (AdamW, fp32)", "full", {}),
    ("SIFT 1%", "sift", {"sparsity": 0.01}),
    ("SIFT 5%", "sift", {"sparsity": 0.05}),
    ("SIFT 1%, int8 base", "sift", {"sparsity": 0.01, "base_quant": "int8"}),
    ("SIFT 1%, NF4 base", "sift", {"sparsity": 0.01, "base_quant": "nf4"}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()

    ids = torch.randint(0, 4096, (args.micro_batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    tokens = args.micro_batch * args.seq_len
    rows, full_s = [], None
    for label, method, options in RUNS:
        seconds = statistics.median(step_times(method, steps=args.steps, warmup=2, batch=batch, **options))
        full_s = full_s or seconds
        time_ms, rate = f"{seconds * 1000:,.0f} ms", f"{tokens / seconds:,.0f}"
        rows.append((label, time_ms, rate, f"{seconds / full_s:.2f}"))
        print(" | ".join(rows[-1]), flush=True)
    table = "| run | step time (median) | tokens/s | time vs full |\n|---|---|---|---|\n" + "\n".join(
        f"| {' | '.join(r)} |" for r in rows
    )
    if args.write:
        markdown = (
            "## SIFT step time vs full fine-tuning (CPU)\n\n"
            f"Machine: {machine()}. Measured {date.today().isoformat()} with `{command_line()}`. "
            "Random-initialised Llama, 12.6M parameters (6 layers, hidden 384), "
            f"micro-batch {args.micro_batch} × {args.seq_len} tokens, fp32, median of {args.steps} steps "
            "after 2 warm-up steps; SIFT's selection is not timed.\n\n"
            f"{table}\n\n"
            "On a CPU, SIFT does the same matmuls as full fine-tuning plus building W + Δ twice per "
            "layer (forward and backward) and a gather; what it saves is memory (no dense gradients "
            "or optimizer state), which this table does not show. A quantised base adds a "
            "dequantisation per layer, forward and backward.\n\n"
            "GPU peak memory against the planner and tokens/s: not measured (no GPU was available to "
            "this work).\n"
        )
        write_section(args.write, "sift-speed", markdown)
        print(f"written to {args.write}")


if __name__ == "__main__":
    main()
