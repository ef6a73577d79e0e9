"""Does a refactor change what training computes? Run every method a few steps on the embedded
model with one fixed seed, once with this checkout and once with another revision, and compare the
losses (training and evaluation) and gradient norms bit for bit.

    python bench/same_losses.py --against a837dc1          # every method, 4 steps each
    python bench/same_losses.py --against HEAD~3 --methods hift sift

The other revision is checked out with `git worktree` into a temporary directory and run through its
own `python -m lowmem_ft` (same interpreter, its sources first on PYTHONPATH), so the two sides
share nothing but the data file. Exit code 0 when every loss is identical, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "python-qa.jsonl"

# One run per method, plus the variants that take a different path through the engine.
CASES: dict[str, list[str]] = {
    "full": ["--method", "full"],
    "hift": ["--method", "hift", "--units-per-group", "2"],
    "hift-stream": ["--method", "hift", "--units-per-group", "2", "--stream"],
    "hift-keep8bit": ["--method", "hift", "--units-per-group", "2", "--state-policy", "keep-8bit"],
    "sift": ["--method", "sift", "--sparsity", "0.01"],
    "sift-stream": ["--method", "sift", "--sparsity", "0.01", "--stream"],
    "random": ["--method", "random", "--sparsity", "0.01"],
    "magnitude": ["--method", "magnitude", "--sparsity", "0.01"],
    "bitfit": ["--method", "bitfit"],
    "lora": ["--method", "lora"],
    "spafit": ["--method", "spafit", "--variant", "II"],
}
COMMON = ["--max-steps", "4", "--batch-size", "8", "--micro-batch-size", "4", "--lr", "1e-3",
          "--eval-every", "2", "--seq-len", "128", "--seed", "0", "--quiet"]  # fmt: skip


def losses(source: Path, case: str, work: Path) -> dict[str, list[float]]:
    """Train and eval losses of one case, run from the package in ``source``."""
    out = work / f"{source.name}-{case}"
    env = {**os.environ, "PYTHONPATH": str(source), "CUDA_VISIBLE_DEVICES": ""}
    command = [
        sys.executable,
        "-m",
        "lowmem_ft",
        "run",
        "tiny",
        str(DATA),
        *CASES[case],
        *COMMON,
        "--out",
        str(out),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=work)
    if done.returncode != 0:
        raise SystemExit(f"{case} failed under {source}:\n{done.stdout}\n{done.stderr}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "train": [r["loss"] for r in records if "loss" in r],
        "grad_norm": [r["grad_norm"] for r in records if "loss" in r],
        "eval": [r["eval_loss"] for r in records if "eval_loss" in r],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", required=True, help="git revision to compare with (e.g. a837dc1)")
    parser.add_argument("--methods", nargs="*", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    same = True
    with tempfile.TemporaryDirectory(prefix="same-losses-") as tmp:
        work = Path(tmp)
        other = work / "other"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(other), args.against],
                       check=True, capture_output=True)  # fmt: skip
        try:
            for case in args.methods:
                here, there = losses(ROOT, case, work), losses(other, case, work)
                verdict = "identical" if here == there else "DIFFERENT"
                same &= here == there
                print(f"{case:14} {verdict:10} train {here['train']}  eval {here['eval']}", flush=True)
                if here != there:
                    print(f"{'':14} {args.against:10} train {there['train']}  eval {there['eval']}")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(other)], check=False)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
