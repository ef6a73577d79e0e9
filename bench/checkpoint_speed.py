"""How long a checkpoint takes to write, verify and load, per GiB of state, on this machine's disk.

    python bench/checkpoint_speed.py --gib 2 --dir /path/on/the/disk/of/your/runs --write docs/benchmarks.md

The state is synthetic (fp32 tensors of 64 MiB, like a model's weights and optimizer moments) and
goes through the same functions a job uses: ``save_checkpoint`` (host copy per shard, safetensors
serialisation, fsync, sha256, rename), ``verify_checkpoint`` (reads every byte back and checks it)
and ``load_checkpoint``. A 7B HiFT job's checkpoint is its bf16 weights (~13.5 GB) plus its AdamW
state (~54 GB fp32 with ``keep``), so multiply the per-GiB figures by its size in GiB for an
estimate on the same disk. Reads may come from the page cache right after the write; the verify
and load figures are then the cached ones, and say so.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import command_line, write_section  # noqa: E402
from quickstart import machine  # noqa: E402

from lowmem_ft.checkpoint import load_checkpoint, save_checkpoint, verify_checkpoint  # noqa: E402

TENSOR_MIB = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=2.0, help="size of the synthetic state")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()

    n = max(1, round(args.gib * 1024 / TENSOR_MIB))
    numel = TENSOR_MIB * 2**20 // 4
    state = {"weights": {f"w{i}": torch.randn(numel) for i in range(n)}, "step": 1}
    gib = n * TENSOR_MIB / 1024
    root = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        started = time.perf_counter()
        path = save_checkpoint(root, 1, state, keep=1)
        write_s = time.perf_counter() - started
        started = time.perf_counter()
        assert verify_checkpoint(path) is None
        verify_s = time.perf_counter() - started
        started = time.perf_counter()
        loaded = load_checkpoint(path)
        sum(float(t[-1]) + float(t.sum()) for t in loaded["weights"].values())  # safetensors maps lazily
        load_s = time.perf_counter() - started
        assert torch.equal(loaded["weights"]["w0"], state["weights"]["w0"])
    finally:
        shutil.rmtree(root, ignore_errors=True)

    rows = [
        ("write (safetensors shards, fsync, sha256, manifest, rename)", write_s),
        ("verify (read back every file, sha256)", verify_s),
        ("load (safetensors, every tensor read)", load_s),
    ]
    for label, seconds in rows:
        print(f"{label}: {seconds:.2f} s for {gib:.2f} GiB = {seconds / gib:.2f} s/GiB", flush=True)
    if args.write:
        table = "| operation | time | per GiB |\n|---|---|---|\n" + "\n".join(
            f"| {label} | {seconds:.2f} s | {seconds / gib:.2f} s |" for label, seconds in rows
        )
        markdown = (
            "## Checkpoint write, verify and load (CPU, local disk)\n\n"
            f"Machine: {machine()}. Measured {date.today().isoformat()} with `{command_line()}`. "
            f"A synthetic state of {gib:.2f} GiB (fp32 tensors of {TENSOR_MIB} MiB) through the job's own "
            "checkpoint functions.\n\n"
            f"{table}\n\n"
            "Verify and load ran right after the write, so they may have read from the page cache. "
            "A checkpoint of a model on a GPU adds the device-to-host copy, which is not measured "
            "here (no GPU was available to this work).\n"
        )
        write_section(args.write, "checkpoint-speed", markdown)
        print(f"written to {args.write}")


if __name__ == "__main__":
    main()
