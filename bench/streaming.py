"""Streamed against resident HiFT on a GPU: tokens/s, host-to-device bandwidth, peak memory vs plan.

    python bench/streaming.py --write docs/benchmarks.md          # needs a CUDA device

A random-initialised Llama of about 1.3B parameters (24 layers, hidden 2048; a size any current
GPU holds resident, so both runs can be compared) is written to a temporary model directory with
the embedded model's tokenizer, then trained by the real CLI, `lowmem-ft run DIR ... --method
hift`, once with every weight resident and once with `--stream` (every decoder layer streamed),
at the planner's micro-batch and at smaller ones, and once more under torch.profiler to measure how
much of the copying overlaps compute (``copy_overlap``, tested on CPU). Tokens/s is the median of
the logged steps after the first two; peak memory is the job's own measurement against its
plan.json. Bandwidth is a pinned host-to-device copy of one layer's weights timed with CUDA
events, against the PCIe link NVML reports. Target (issue 7): streamed ≥ 0.8× resident tokens/s
at the planner's micro-batch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import REPO, command_line, write_section  # noqa: E402

from lowmem_ft.gpus import detect_gpu  # noqa: E402
from lowmem_ft.sizes import format_bytes  # noqa: E402

TINY = REPO / "lowmem_ft" / "models" / "tiny"
DATA = REPO / "examples" / "python-qa.jsonl"


def build_model(directory: Path) -> int:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TINY)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=5504, num_hidden_layers=24,
        num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048, dtype="bfloat16",
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def run(model_dir: Path, out: Path, micro: int | None, stream: bool, args) -> dict:
    command = [
        sys.executable, "-m", "lowmem_ft", "run", str(model_dir), str(DATA), "--out", str(out),
        "--method", "hift", "--units-per-group", "1", "--pack", "--seq-len", str(args.seq_len),
        "--batch-size", str(args.batch_size), "--max-steps", str(args.steps), "--eval-fraction", "0",
        "--gradient-checkpointing", "-q", *(["--micro-batch-size", str(micro)] if micro else []),
        *(["--stream"] if stream else []),
    ]  # fmt: skip
    subprocess.run(command, check=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][2:]
    job = json.loads((out / "job.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    return {
        "tokens_per_s": statistics.median(rates),
        "peak": job["peak_mem_bytes"],
        "planned": plan["gpu"]["peak_bytes"],
        "micro": job["config"]["micro_batch_size"],
    }


def bandwidth(numel: int) -> float:
    host = torch.empty(numel, dtype=torch.bfloat16, pin_memory=True)
    device = torch.empty(numel, dtype=torch.bfloat16, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    device.copy_(host, non_blocking=True)
    times = []
    for _ in range(10):
        start.record()
        device.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * numel / statistics.median(times)


def copy_overlap(kernels: list[tuple[str, float, float]]) -> dict:
    """How much of the host-to-device copying ran while the GPU computed. ``kernels``: (name, start,
    end) of every GPU activity in a profile; copies are the "Memcpy HtoD" ones, compute is every
    kernel that is not a memcpy or memset. Returns the copy time, the part of it that overlapped
    compute, and the fraction (1.0: every copy hidden behind compute)."""

    def union(spans):
        merged = []
        for start, end in sorted(spans):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        return merged

    copies = union((s, e) for name, s, e in kernels if name.startswith("Memcpy HtoD"))
    compute = union((s, e) for name, s, e in kernels if not name.startswith(("Memcpy", "Memset")))
    copy_time = sum(e - s for s, e in copies)
    overlapped, j = 0.0, 0
    for start, end in copies:  # both lists sorted and disjoint: one sweep
        while j < len(compute) and compute[j][1] <= start:
            j += 1
        k = j
        while k < len(compute) and compute[k][0] < end:
            overlapped += min(end, compute[k][1]) - max(start, compute[k][0])
            k += 1
    return {
        "copy": copy_time,
        "overlapped": overlapped,
        "fraction": overlapped / copy_time if copy_time else 0.0,
    }


def profiled_overlap(model_dir: Path, out: Path, micro: int, args) -> dict:
    """A short streamed run in this process under torch.profiler: the copy/compute overlap."""
    from torch.profiler import ProfilerActivity, profile

    from lowmem_ft.cli import main as lowmem_ft

    command = [
        "run", str(model_dir), str(DATA), "--out", str(out), "--method", "hift", "--units-per-group", "1",
        "--pack", "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--max-steps", "3",
        "--eval-fraction", "0", "--micro-batch-size", str(micro), "--stream", "-q",
    ]  # fmt: skip
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        try:
            lowmem_ft(command)
        except SystemExit as exit:
            if exit.code:
                raise
    kernels = [
        (e.name, e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    ]
    return copy_overlap(kernels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/streaming.py needs a CUDA device; nothing measured, nothing written")
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        params = build_model(model_dir)
        layer_numel = 4 * 2048 * 2048 + 3 * 2048 * 5504
        achieved = bandwidth(layer_numel)
        gpu = detect_gpu()
        link = gpu.link_bytes_per_s if gpu else None
        resident_planned = run(model_dir, Path(tmp) / "probe", None, False, args)["micro"]
        micros = [resident_planned] + [m for m in (resident_planned // 2, resident_planned // 4) if m >= 1]
        for micro in micros:
            resident = run(model_dir, Path(tmp) / f"resident-{micro}", micro, False, args)
            streamed = run(model_dir, Path(tmp) / f"streamed-{micro}", micro, True, args)
            ratio = streamed["tokens_per_s"] / resident["tokens_per_s"]
            rows.append((micro, resident, streamed, ratio))
            print(f"micro-batch {micro}: resident {resident['tokens_per_s']:,.0f} tok/s, streamed "
                  f"{streamed['tokens_per_s']:,.0f} tok/s ({ratio:.2f}×)", flush=True)  # fmt: skip
        overlap = profiled_overlap(model_dir, Path(tmp) / "profiled", resident_planned, args)
        print(f"copy time overlapped with compute: {overlap['fraction']:.0%}", flush=True)
    name = torch.cuda.get_device_name()
    table = "| micro-batch | resident tok/s | streamed tok/s | streamed / resident | peak resident (plan) | peak streamed (plan) |\n|---|---|---|---|---|---|\n"  # noqa: E501
    table += "\n".join(
        f"| {m} | {r['tokens_per_s']:,.0f} | {s['tokens_per_s']:,.0f} | {ratio:.2f} | "
        f"{format_bytes(r['peak'])} ({format_bytes(r['planned'])}) | {format_bytes(s['peak'])} ({format_bytes(s['planned'])}) |"  # noqa: E501
        for m, r, s, ratio in rows
    )
    link_text = f"{link / 1e9:.1f} GB/s (NVML)" if link else "unknown"
    summary = (
        f"## Streaming vs resident HiFT ({name})\n\n"
        f"Device: {name}. Measured {date.today().isoformat()} with `{command_line()}`. Random-initialised "
        f"Llama, {params / 1e9:.2f}B parameters, bf16, HiFT one layer per group, batch {args.batch_size} × "
        f"{args.seq_len} tokens (packed), activation checkpointing in both runs; the first micro-batch "
        "is the planner's.\n\n"
        f"{table}\n\n"
        f"Host-to-device copy of one layer ({format_bytes(2 * layer_numel)}, pinned): "
        f"{achieved / 1e9:.1f} GB/s achieved; link {link_text}.\n\n"
        f"Copy time that overlapped compute (torch.profiler, a 3-step streamed run at micro-batch "
        f"{resident_planned}): {overlap['fraction']:.0%} of {overlap['copy'] / 1e3:.1f} ms of "
        "host-to-device copies.\n"
    )
    print(summary)
    if args.write:
        write_section(args.write, "streaming", summary)


if __name__ == "__main__":
    main()
