"""Measure the quick start and the planner's speed on this machine, and record them.

    python bench/quickstart.py --write docs/benchmarks.md

Runs the README's first command (the `lowmem-ft run ...` part, as a subprocess, so the wall time
includes Python start-up and imports) and reports wall time, the eval-loss change, training
tokens/s and the process's peak RSS; then times `lowmem-ft plan llama-2-70b` (the answer must
come in under 2 s). Everything runs on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import psutil

    ram = psutil.virtual_memory().total / 1024**3
    return f"{cpu}, {os.cpu_count()} cores, {ram:.0f} GiB RAM, no GPU, Python {platform.python_version()}"


def readme_run_args() -> list[str]:
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("pip install") and "lowmem-ft run" in line:
            return line.split("lowmem-ft ", 1)[1].split()
    raise SystemExit("README.md has no set-up command that runs lowmem-ft")


def lowmem(*args: str, cwd: Path = REPO) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    command = [sys.executable, "-m", "lowmem_ft", *args]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    return time.perf_counter() - started, result


def readme_setup_command() -> str:
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("pip install") and "lowmem-ft run" in line:
            return line
    raise SystemExit("README.md has no set-up command that runs lowmem-ft")


def time_fresh_venv() -> float:
    """The README's first command, install included, in a new virtualenv on a clean copy of the repo."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["git", "clone", "-q", str(REPO), f"{tmp}/repo"], check=True)
        subprocess.run([sys.executable, "-m", "venv", f"{tmp}/venv"], check=True)
        script = f". {tmp}/venv/bin/activate && cd {tmp}/repo && {readme_setup_command()} -q"
        started = time.perf_counter()
        result = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(f"fresh-venv quick start failed:\n{result.stderr[-2000:]}")
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", type=Path, help="Markdown file to record the results in")
    parser.add_argument("--plan-repeats", type=int, default=5)
    parser.add_argument(
        "--fresh-venv",
        action="store_true",
        help="also time the README's whole first command in a new virtualenv",
    )
    args = parser.parse_args()

    run_args = readme_run_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "job"
        wall, result = lowmem(*run_args, "--out", str(out), "-q")
        if result.returncode != 0:
            raise SystemExit(f"quick start failed:\n{result.stderr[-2000:]}")
        job = json.loads((out / "job.json").read_text())
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tokens_per_s = statistics.median(m["tokens_per_s"] for m in metrics if "tokens_per_s" in m)
    change = 100 * (job["eval_loss"] - job["eval_loss_start"]) / job["eval_loss_start"]

    plan_times = []
    for _ in range(args.plan_repeats):
        plan_args = ["llama-2-70b", "--method", "hift", "--gpu-mem", "24GiB", "--cpu-mem", "256GiB"]
        seconds, result = lowmem("plan", *plan_args)
        if result.returncode not in (0, 3):
            raise SystemExit(f"plan failed:\n{result.stderr}")
        plan_times.append(seconds)

    rows = [
        ("quick start wall time (`lowmem-ft " + " ".join(run_args) + "`)", f"{wall:.1f} s"),
        ("optimizer steps", f"{job['step']}"),
        ("eval loss, start → end", f"{job['eval_loss_start']:.4f} → {job['eval_loss']:.4f} ({change:+.1f}%)"),
        ("training throughput (median over steps)", f"{tokens_per_s:,.0f} tokens/s"),
        ("peak RSS of the run", f"{job['peak_mem_bytes'] / 1024**2:,.0f} MiB"),
        (
            "`lowmem-ft plan llama-2-70b --method hift` wall time",
            f"median {statistics.median(plan_times):.2f} s, max {max(plan_times):.2f} s "
            f"over {len(plan_times)} runs",
        ),
    ]
    if args.fresh_venv:
        rows.insert(
            0, ("README's first command in a new virtualenv, install included", f"{time_fresh_venv():.0f} s")
        )
    table = "| measure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    print(table)
    if args.write:
        markdown = (
            "## Quick start and planner speed (CPU)\n\n"
            f"Machine: {machine()}. Measured {date.today().isoformat()} with "
            f"`python bench/quickstart.py --write {args.write}`.\n\n{table}\n"
        )
        write_section(args.write, "quickstart", markdown)
        print(f"written to {args.write}")


if __name__ == "__main__":
    main()
