"""Final eval loss of each method on the embedded model and the example data, same steps for all.

    python bench/quality.py --write docs/benchmarks.md

Every row is one `lowmem-ft run tiny examples/python-qa.jsonl --lr LR ...` (25 optimizer steps,
one epoch, the same seed, data order and evaluation split), so the rows differ only in the method,
its options and the learning rate. Later methods add rows to RUNS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import command_line, write_section  # noqa: E402
from quickstart import machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BASE = ["run", "tiny", "examples/python-qa.jsonl", "-q"]
FULL_LR, SPARSE_LR = ["--lr", "1e-3"], ["--lr", "1e-2"]
RUNS = [
    ("full", FULL_LR),
    ("full, lr 3e-3", ["--lr", "3e-3"]),
    ("hift bottom-up (planner: 2 units per group)", [*FULL_LR, "--method", "hift"]),
    ("hift top-down", [*FULL_LR, "--method", "hift", "--order", "top-down"]),
    ("hift random", [*FULL_LR, "--method", "hift", "--order", "random"]),
    ("hift 1 unit per group", [*FULL_LR, "--method", "hift", "--units-per-group", "1"]),
    (
        "hift, BAdam-style: 5 steps per group, state dropped",
        [*FULL_LR, "--method", "hift", "--switch-every", "5", "--state-policy", "drop"],
    ),  # fmt: skip
    ("hift keep-8bit", [*FULL_LR, "--method", "hift", "--state-policy", "keep-8bit"]),
    (
        "hift, bf16 weights + fp32 masters, stochastic rounding",
        [*FULL_LR, "--method", "hift", "--dtype", "bf16"],
    ),
    # Sparse masks at equal budgets: gradient-chosen (SIFT) against random and magnitude.
    *[
        (f"{name} {rate:.1%}", [*SPARSE_LR, "--method", name, "--sparsity", str(rate)])
        for rate in (0.001, 0.01, 0.05)
        for name in ("sift", "random", "magnitude")
    ],
    ("sift 1% at full's lr", [*FULL_LR, "--method", "sift", "--sparsity", "0.01"]),
    (
        "sift 1%, 8 selection micro-batches, Σg²",
        [
            *SPARSE_LR,
            "--method",
            "sift",
            "--sparsity",
            "0.01",
            "--selection-batches",
            "8",
            "--selection-score",
            "grad2",
        ],
    ),  # fmt: skip
    ("sift 1%, NF4 base", [*SPARSE_LR, "--method", "sift", "--sparsity", "0.01", "--base-quant", "nf4"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    results = []
    for label, options in RUNS:
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, "-m", "lowmem_ft", *BASE, *options, "--out", f"{tmp}/job"]
            result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
            if result.returncode != 0:
                raise SystemExit(f"{label} failed:\n{result.stderr[-2000:]}")
            job = json.loads(Path(f"{tmp}/job/job.json").read_text())
        start, end = job["eval_loss_start"], job["eval_loss"]
        results.append((label, options, start, end))
        print(f"{label}: {start:.4f} -> {end:.4f}", flush=True)
    # The reference is full fine-tuning at its better learning rate of the two tried.
    full_drop = max(start - end for label, _, start, end in results if label.startswith("full"))
    rows = [
        (label, " ".join(options), f"{start:.4f}", f"{end:.4f}", f"{-100 * (start - end) / start:+.1f}%",
         f"{100 * (start - end) / full_drop:.0f}%")
        for label, options, start, end in results
    ]  # fmt: skip
    table = "| method | options | eval loss at step 0 | after 25 steps | change | drop vs best full |\n"
    table += "|---|---|---|---|---|---|\n" + "\n".join(f"| {' | '.join(r)} |" for r in rows)
    if args.write:
        markdown = (
            "## Quality on the embedded model (CPU)\n\n"
            f"Machine: {machine()}. Measured {date.today().isoformat()} with `{command_line()}`. "
            "Each row: `lowmem-ft " + " ".join(BASE[:-1]) + " OPTIONS` (25 steps of 16 examples, one "
            "epoch, seed 0). Sparse methods train 0.1–5% of each linear weight of the decoder layers "
            "and use a 10× larger learning rate than full fine-tuning; one row shows SIFT at full's "
            'rate. "drop vs best full" compares each eval-loss drop with full fine-tuning\'s at its '
            "better learning rate.\n\n"
            f"{table}\n"
        )
        write_section(args.write, "quality", markdown)
        print(f"written to {args.write}")


if __name__ == "__main__":
    main()
