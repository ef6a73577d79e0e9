"""Tokens per second of one process against two ranks (--nproc 2), on this machine's CPU.

    python bench/distributed_speed.py --write docs/benchmarks.md
    python bench/distributed_speed.py --steps 10 --methods full    # a quick look

For each method, the same job (the embedded ``tiny`` model on examples/python-qa.jsonl, the same
global batch) runs once as one process and once as two ranks with gloo, each rank on half of the
cores. The figure is the median ``tokens_per_s`` that metrics.jsonl records per step (all ranks'
tokens over the step's time), the first two steps left out (warm-up); the wall time includes
starting the ranks. A CPU figure, named so: on CPU the ranks share one memory bus and their
collectives go through loopback TCP, so it says what the machinery costs, not what GPUs would gain
(GPU scaling: not measured, no multi-GPU machine was lent).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import command_line, write_section  # noqa: E402
from quickstart import machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def measure(method: str, nproc: int, steps: int, scratch: Path) -> dict:
    job = scratch / f"{method}-{nproc}"
    args = [
        "run", "tiny", "examples/python-qa.jsonl", "--method", method, "--max-steps", str(steps),
        "--batch-size", "16", "--micro-batch-size", "8", "--eval-every", "0", "--eval-fraction", "0",
        "--out", str(job), "-q", "--nproc", str(nproc),
    ]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "lowmem_ft", *args], cwd=REPO, capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{method} --nproc {nproc} failed:\n{result.stderr[-2000:]}")
    rows = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][2:]
    return {"tokens_per_s": statistics.median(speeds), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--methods", default="full,lora")
    parser.add_argument("--write", type=Path, help="write the results into this Markdown file")
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for method in args.methods.split(","):
            one = measure(method, 1, args.steps, Path(scratch))
            two = measure(method, 2, args.steps, Path(scratch))
            results.append((method, one, two))
            print(
                f"{method:<5} 1 process {one['tokens_per_s']:8,.0f} tok/s ({one['wall_s']:.0f} s)   "
                f"2 ranks {two['tokens_per_s']:8,.0f} tok/s ({two['wall_s']:.0f} s)   "
                f"×{two['tokens_per_s'] / one['tokens_per_s']:.2f}"
            )
    if args.write:
        lines = [
            "## One process against two ranks, on CPU (`--nproc 2`, gloo)",
            "",
            f"Measured {date.today()} on {machine()} with `{command_line()}`: the embedded `tiny` "
            f"model, {args.steps} steps of 16 examples (micro-batch 8), median tokens/s per step after "
            "two warm-up steps; the wall time includes loading and, for two ranks, starting them. "
            "A CPU figure: two ranks share the cores and the memory bus and reduce over loopback TCP. "
            "GPU scaling: not measured (no multi-GPU machine was lent).",
            "",
            "| method | 1 process tok/s | 2 ranks tok/s | ratio | 1 process wall | 2 ranks wall |",
            "|---|---|---|---|---|---|",
        ]
        for method, one, two in results:
            ratio = two["tokens_per_s"] / one["tokens_per_s"]
            lines.append(
                f"| {method} | {one['tokens_per_s']:,.0f} | {two['tokens_per_s']:,.0f} | {ratio:.2f} | "
                f"{one['wall_s']:.0f} s | {two['wall_s']:.0f} s |"
            )
        write_section(args.write, "distributed-speed", "\n".join(lines))
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
