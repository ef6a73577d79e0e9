"""Host memory of each rank once the model is loaded, with two ranks on this machine's CPU.

    python bench/loading_memory.py --write docs/benchmarks.md

A Llama-shaped model of about 190M parameters (random weights, written to a scratch directory with
the embedded model's tokenizer) trains one step with ``--nproc 2``, once with ``full`` (FSDP2: rank 0
reads the model and sends each rank its shards) and once with ``lora`` (data-parallel: every rank
loads the whole model). Each rank records its peak resident memory when set-up ends, before the
first step. With ``full``, rank 1 never holds the whole model: its peak is below rank 0's by about
the model's fp32 size. On a CPU the trained weights stay in host memory, so this measures where
the whole copy lives, not a GPU run's host memory (not measured: no GPU was lent).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import command_line, write_section  # noqa: E402
from quickstart import machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MiB = 2**20

SHAPE = {  # the embedded tiny model's config, wider and deeper
    "hidden_size": 1024, "intermediate_size": 2752, "num_hidden_layers": 16, "num_attention_heads": 16,
    "num_key_value_heads": 8, "head_dim": 64,
}  # fmt: skip

# Each rank writes its peak resident memory when prepare.setup returns (before the first step).
HOOK = """\
import os
import resource

if os.environ.get("RANK") is not None:
    import lowmem_ft.prepare as prepare

    setup = prepare.setup

    def recorded(*args, **kwargs):
        s = setup(*args, **kwargs)
        with open(os.environ["LOADING_MEMORY"], "a") as note:
            note.write(f"{os.environ['RANK']} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}\\n")
        return s

    prepare.setup = recorded
"""


def make_model(where: Path) -> int:
    """A random model of SHAPE in ``where`` (bf16 safetensors, the tiny model's tokenizer); its
    parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tiny = REPO / "lowmem_ft" / "models" / "tiny"
    config = AutoConfig.from_pretrained(tiny)
    for key, value in SHAPE.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(where, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, where / name)
    return sum(p.numel() for p in model.parameters())


def measure(model: Path, method: str, scratch: Path) -> dict[int, int]:
    notes, hook = scratch / f"{method}.rss", scratch / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOOK)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hook), str(REPO)]), LOADING_MEMORY=str(notes))
    args = [
        "run", str(model), "examples/python-qa.jsonl", "--method", method, "--nproc", "2",
        "--max-steps", "1", "--batch-size", "2", "--seq-len", "64", "--eval-every", "0",
        "--eval-fraction", "0", "--out", str(scratch / method), "-q",
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "lowmem_ft", *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise SystemExit(f"{method} --nproc 2 failed:\n{result.stderr[-2000:]}")
    return {int(rank): int(peak) for rank, peak in map(str.split, notes.read_text().splitlines())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="write the results into this Markdown file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        params = make_model(scratch / "model")
        results = {method: measure(scratch / "model", method, scratch) for method in ("full", "lora")}
    fp32 = 4 * params
    print(f"model: {params:,} parameters, {fp32 / MiB:,.0f} MiB in fp32")
    for method, peaks in results.items():
        print(f"{method:<5} rank 0 {peaks[0] / MiB:7,.0f} MiB   rank 1 {peaks[1] / MiB:7,.0f} MiB")
    if args.write:
        lines = [
            "## Host memory of each rank once the model is loaded (`--nproc 2`, CPU)",
            "",
            f"Measured {date.today()} on {machine()} with `{command_line()}`: a Llama-shaped model of "
            f"{params:,} parameters ({fp32 / MiB:,.0f} MiB in fp32; random weights, bf16 on disk), one "
            "step on two ranks; each rank's peak resident memory when set-up ends. `full` shards the "
            "model with FSDP2: rank 0 reads it and sends each rank its shards, so rank 1 never holds "
            "it whole. `lora` is data-parallel: each rank loads the whole model (on a GPU the ranks "
            "of a node take turns, as many at once as the plan's host memory holds). On a CPU the "
            "trained weights stay in host memory; a GPU run's host memory: not measured.",
            "",
            "| method | rank 0 peak | rank 1 peak | rank 0 − rank 1 |",
            "|---|---|---|---|",
        ]
        for method, peaks in results.items():
            lines.append(
                f"| {method} | {peaks[0] / MiB:,.0f} MiB | {peaks[1] / MiB:,.0f} MiB | "
                f"{round((peaks[0] - peaks[1]) / MiB):,} MiB |"
            )
        write_section(args.write, "loading-memory", "\n".join(lines))
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
