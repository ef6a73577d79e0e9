"""Final eval loss of each method on the embedded model, on two tasks, same steps for all.

    python bench/quality.py --write docs/benchmarks.md                  # HiFT, sparse masks
    python bench/quality.py --group family --jobs 2 --write docs/benchmarks.md   # LoRA, SPAFIT, BitFit
    python bench/quality.py --task word-order           # one task only (prints, does not write)

Every row is one `lowmem-ft run tiny TASK.jsonl --lr LR ...` (25 optimizer steps, one epoch, the
same seed, data order and evaluation split), so the rows of a task differ only in the method, its
options and the learning rate. Parameter-efficient methods are compared at matched trainable
counts where that makes sense: LoRA rank 2 / rank 8 on every linear layer against sparse masks of
the same count, and SPAFIT against the LoRA it contains and against BitFit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import command_line, write_section  # noqa: E402
from quickstart import machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = {
    "python-qa": "examples/python-qa.jsonl",  # docstrings the tiny model was pretrained on
    "word-order": "examples/word-order.jsonl",  # a rule to learn (sort, reverse, swap words)
}
FULL_LR, SPARSE_LR = ["--lr", "1e-3"], ["--lr", "1e-2"]
# LoRA rank r on all 42 linear layers of tiny trains r·27,744 values of the 4,349,952 in those
# weights: rank 2 = 1.276%, rank 8 = 5.102%. The sparse masks below match those counts.
MATCHED = {2: "0.01276", 8: "0.05102"}
BOTH, QA = tuple(TASKS), ("python-qa",)
RUNS = [  # section "quality": HiFT and the sparse masks
    ("full", FULL_LR, QA),
    ("full, lr 3e-3", ["--lr", "3e-3"], QA),
    ("hift bottom-up (planner: 2 units per group)", [*FULL_LR, "--method", "hift"], QA),
    ("hift top-down", [*FULL_LR, "--method", "hift", "--order", "top-down"], QA),
    ("hift random", [*FULL_LR, "--method", "hift", "--order", "random"], QA),
    ("hift 1 unit per group", [*FULL_LR, "--method", "hift", "--units-per-group", "1"], QA),
    (
        "hift, BAdam-style: 5 steps per group, state dropped",
        [*FULL_LR, "--method", "hift", "--switch-every", "5", "--state-policy", "drop"],
        QA,
    ),
    ("hift keep-8bit", [*FULL_LR, "--method", "hift", "--state-policy", "keep-8bit"], QA),
    (
        "hift, bf16 weights + fp32 masters, stochastic rounding",
        [*FULL_LR, "--method", "hift", "--dtype", "bf16"],
        QA,
    ),
    # Sparse masks at equal budgets: gradient-chosen (SIFT) against random and magnitude.
    *[
        (f"{name} {rate:.1%}", [*SPARSE_LR, "--method", name, "--sparsity", str(rate)], QA)
        for rate in (0.001, 0.01, 0.05)
        for name in ("sift", "random", "magnitude")
    ],
    ("sift 1% at full's lr", [*FULL_LR, "--method", "sift", "--sparsity", "0.01"], QA),
    (
        "sift 1%, 8 selection micro-batches, Σg² (Fu et al.'s SAM)",
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
        QA,
    ),  # fmt: skip
    ("sift 1%, NF4 base", [*SPARSE_LR, "--method", "sift", "--sparsity", "0.01", "--base-quant", "nf4"], QA),
]
# The parameter-efficient family side by side (section "quality-family"): LoRA against sparse
# masks of the same trainable count, SPAFIT against the LoRA it contains and BitFit; full
# fine-tuning is each task's reference.
FAMILY = [
    ("full", FULL_LR, BOTH),
    *[
        row
        for (rank, rate), tasks in zip(MATCHED.items(), (QA, BOTH), strict=True)
        for row in [
            (f"lora r={rank}", [*SPARSE_LR, "--method", "lora", "--lora-rank", str(rank)], tasks),
            *[
                (
                    f"{name} at lora r={rank}'s count",
                    [*SPARSE_LR, "--method", name, "--sparsity", rate],
                    tasks,
                )
                for name in ("sift", "random", "magnitude")
            ],
        ]
    ],
    ("qlora r=8 (NF4 base)", [*SPARSE_LR, "--method", "lora", "--lora-rank", "8", "--base-quant", "nf4"], QA),
    # SPAFIT (planner: cut-offs 1,2 of 6 layers) against the LoRA it contains, and BitFit.
    ("spafit I", [*SPARSE_LR, "--method", "spafit"], BOTH),
    ("spafit II", [*SPARSE_LR, "--method", "spafit", "--variant", "II"], QA),
    (
        "lora r=8 on attention, layers 2-5 (spafit's LoRA alone)",
        [*SPARSE_LR, "--method", "lora", "--targets", "attention", "--freeze-layers", "0-1"],
        QA,
    ),
    ("bitfit (norm weights)", [*SPARSE_LR, "--method", "bitfit"], BOTH),
    ("bitfit + added biases", [*SPARSE_LR, "--method", "bitfit", "--add-biases"], QA),
]


GROUPS = {"main": RUNS, "family": FAMILY}
SECTIONS = {"main": "quality", "family": "quality-family"}
TITLES = {
    "main": "## Quality on the embedded model (CPU)",
    "family": "## Quality of the parameter-efficient family at matched budgets (CPU)",
}


def run_one(task: str, options: list[str], threads: int | None) -> dict:
    # One torch thread per run when several run at once: a model this small gains little from
    # intra-op threads, and whole runs side by side use the cores better.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "lowmem_ft", "run", "tiny", TASKS[task], "-q", *options]
        result = subprocess.run(
            [*command, "--out", f"{tmp}/job"], cwd=REPO, capture_output=True, text=True, env=env
        )
        if result.returncode != 0:
            raise SystemExit(f"{task} {' '.join(options)} failed:\n{result.stderr[-2000:]}")
        return json.loads(Path(f"{tmp}/job/job.json").read_text())


def table(rows: list[tuple]) -> str:
    # The reference is full fine-tuning at the better of its learning rates tried.
    full_drop = max(start - end for label, _, _, start, end in rows if label.startswith("full"))
    lines = [
        "| method | options | trainable | eval loss at step 0 | after 25 steps | change "
        "| drop vs best full |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, options, trainable, start, end in rows:
        change, of_full = -100 * (start - end) / start, 100 * (start - end) / full_drop
        cells = [label, " ".join(options), f"{trainable:,}", f"{start:.4f}", f"{end:.4f}",
                 f"{change:+.1f}%", f"{of_full:.0f}%"]  # fmt: skip
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", type=Path)
    parser.add_argument(
        "--group",
        choices=GROUPS,
        default="main",
        help="main: HiFT and sparse masks; family: LoRA, SPAFIT, BitFit",
    )
    parser.add_argument("--task", choices=list(TASKS), help="run one task only (not with --write)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each with one thread if > 1)")
    args = parser.parse_args()
    if args.write and args.task:
        parser.error("--write needs every task; leave out --task")
    tables = []
    threads = 1 if args.jobs > 1 else None
    with ThreadPoolExecutor(args.jobs) as pool:
        for task in [args.task] if args.task else TASKS:
            runs = [(label, options) for label, options, tasks in GROUPS[args.group] if task in tasks]
            if not runs:
                continue
            jobs = pool.map(lambda run, task=task: run_one(task, run[1], threads), runs)
            rows = []
            for (label, options), job in zip(runs, jobs, strict=True):
                start, end = job["eval_loss_start"], job["eval_loss"]
                rows.append((label, options, job["trainable_parameters"], start, end))
                print(f"{task}: {label}: {start:.4f} -> {end:.4f}", flush=True)
            tables.append(f"### {task} (`{TASKS[task]}`)\n\n{table(rows)}\n")
    parallel = f" ({args.jobs} runs at a time, one thread each)" if args.jobs > 1 else ""
    if args.write:
        markdown = (
            TITLES[args.group] + "\n\n"
            f"Machine: {machine()}. Measured {date.today().isoformat()} with `{command_line()}`{parallel}. "
            "Each row: `lowmem-ft run tiny TASK.jsonl OPTIONS` (25 steps of 16 examples, one epoch, seed "
            "0). Parameter-efficient methods (sparse masks, LoRA, SPAFIT, BitFit) use a 10× larger "
            'learning rate than full fine-tuning (lr 1e-2 against 1e-3). "trainable" is the number of '
            'values the method trains; "at lora r=N\'s count" rows train as many as the LoRA row above '
            'them. "drop vs best full" compares each eval-loss drop with full fine-tuning\'s on the same '
            "task. python-qa is text the tiny model was pretrained on (format learning); word-order is a "
            "rule it never saw (sort, reverse or swap 3-6 words).\n\n" + "\n".join(tables)
        )
        write_section(args.write, SECTIONS[args.group], markdown)
        print(f"written to {args.write}")
    else:
        print("\n".join(tables))


if __name__ == "__main__":
    main()
