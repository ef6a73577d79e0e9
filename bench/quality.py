"""Final eval loss of each method on the embedded model and the example data, same steps for all.

    python bench/quality.py --write docs/benchmarks.md

Every row is one `lowmem-ft run tiny examples/python-qa.jsonl --lr 1e-3 ...` (25 optimizer steps,
one epoch, the same seed, data order and evaluation split), so the rows differ only in the method
and its options. Later methods add rows to RUNS.
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
BASE = ["run", "tiny", "examples/python-qa.jsonl", "--lr", "1e-3", "-q"]
RUNS = [
    ("full", []),
    ("hift bottom-up (planner: 2 units per group)", ["--method", "hift"]),
    ("hift top-down", ["--method", "hift", "--order", "top-down"]),
    ("hift random", ["--method", "hift", "--order", "random"]),
    ("hift 1 unit per group", ["--method", "hift", "--units-per-group", "1"]),
    (
        "hift, BAdam-style: 5 steps per group, state dropped",
        ["--method", "hift", "--switch-every", "5", "--state-policy", "drop"],
    ),  # fmt: skip
    ("hift keep-8bit", ["--method", "hift", "--state-policy", "keep-8bit"]),
    ("hift, bf16 weights + fp32 masters, stochastic rounding", ["--method", "hift", "--dtype", "bf16"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    rows, full_drop = [], None
    for label, options in RUNS:
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, "-m", "lowmem_ft", *BASE, *options, "--out", f"{tmp}/job"]
            result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
            if result.returncode != 0:
                raise SystemExit(f"{label} failed:\n{result.stderr[-2000:]}")
            job = json.loads(Path(f"{tmp}/job/job.json").read_text())
        start, end = job["eval_loss_start"], job["eval_loss"]
        drop = start - end
        full_drop = full_drop if full_drop is not None else drop
        row = (label, " ".join(options) or "—", f"{start:.4f}", f"{end:.4f}", f"{-100 * drop / start:+.1f}%",
               f"{100 * drop / full_drop:.0f}%")  # fmt: skip
        rows.append(row)
        print(" | ".join(row), flush=True)
    table = "| method | options | eval loss at step 0 | after 25 steps | change | drop vs full |\n"
    table += "|---|---|---|---|---|---|\n" + "\n".join(f"| {' | '.join(r)} |" for r in rows)
    if args.write:
        markdown = (
            "## Quality on the embedded model (CPU)\n\n"
            f"Machine: {machine()}. Measured {date.today().isoformat()} with `{command_line()}`. "
            "Each row: `lowmem-ft " + " ".join(BASE[:-1]) + " OPTIONS` (25 steps of 16 examples, seed 0).\n\n"
            f"{table}\n"
        )
        write_section(args.write, "quality", markdown)
        print(f"written to {args.write}")


if __name__ == "__main__":
    main()
