"""Step time of HiFT against full fine-tuning on the same model and batch, measured in one run.

    python bench/hift_speed.py --write docs/benchmarks.md

A random-initialised Llama (12.6M parameters: big enough that compute, not Python, dominates
on a CPU) runs the recipe's own step (method hooks, loss_sum, backward, update) for full
fine-tuning and for HiFT with one unit per group over one whole cycle, so every group (and so
every depth at which the backward stops) is in the average. On a CPU only time is compared;
memory and tokens/s on a GPU need a CUDA device and are reported as not measured here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import command_line, write_section  # noqa: E402
from quickstart import machine  # noqa: E402

from lowmem_ft.config import RunConfig  # noqa: E402
from lowmem_ft.methods import build_method  # noqa: E402
from lowmem_ft.train import loss_sum  # noqa: E402


def build_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
        use_cache=False,
    )
    return LlamaForCausalLM(config)


def step_times(method_name: str, steps: int, warmup: int, batch: dict, **options) -> list[float]:
    model = build_model()
    config = RunConfig.create(model="bench", data=Path("bench.jsonl"), method=method_name, lr=1e-4, **options)
    method = build_method(config)
    method.setup(model)
    device, dtype = torch.device("cpu"), torch.float32
    n_targets = batch["labels"][:, 1:].numel()
    if method.selection_batches():  # SIFT chooses its entries first (not timed)
        method.select([batch], lambda b: (loss_sum(model, b, device, dtype) / n_targets).backward())
    times = []
    for step in range(warmup + steps):
        started = time.perf_counter()
        method.begin_step(step)
        (loss_sum(model, batch, device, dtype) / n_targets).backward()
        method.reduce_gradients()
        method.optimizer.step()
        method.optimizer.zero_grad(set_to_none=True)
        method.end_step(step)
        if step >= warmup:
            times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()

    ids = torch.randint(0, 4096, (args.micro_batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    n_groups = 6 + 2  # embedding, 6 layers, head: one unit per group
    full = step_times("full", steps=n_groups, warmup=2, batch=batch)
    # Warm up a whole cycle first: each group's optimizer is created on its first visit.
    hift = step_times(
        "hift", steps=n_groups, warmup=n_groups, batch=batch, units_per_group=1, state_policy="keep"
    )
    full_s, hift_s = statistics.mean(full), statistics.mean(hift)
    tokens = args.micro_batch * args.seq_len
    hift_label = "HiFT, 1 unit per group, keep (mean over a cycle)"
    rows = [
        ("full fine-tuning (AdamW, fp32)", f"{full_s * 1000:,.0f} ms", f"{tokens / full_s:,.0f}", "1.00"),
        (hift_label, f"{hift_s * 1000:,.0f} ms", f"{tokens / hift_s:,.0f}", f"{hift_s / full_s:.2f}"),
    ]
    per_group = ", ".join(f"{t * 1000:,.0f}" for t in hift)
    table = "| run | step time | tokens/s | time vs full |\n|---|---|---|---|\n" + "\n".join(
        f"| {' | '.join(r)} |" for r in rows
    )
    print(table)
    print(f"HiFT step time per group, bottom-up (ms): {per_group}")
    if args.write:
        markdown = (
            "## HiFT step time vs full fine-tuning (CPU)\n\n"
            f"Machine: {machine()}. Measured {date.today().isoformat()} with `{command_line()}`. "
            "Random-initialised Llama, 12.6M parameters (6 layers, hidden 384), "
            f"micro-batch {args.micro_batch} × {args.seq_len} tokens, fp32.\n\n{table}\n\n"
            f"HiFT step time per group, embedding first (ms): {per_group}. The lower the active group, "
            "the deeper the backward goes.\n\n"
            "GPU peak memory and tokens/s against full fine-tuning and BAdam: not measured (no GPU was "
            "available to this work).\n"
        )
        write_section(args.write, "hift-speed", markdown)
        print(f"written to {args.write}")


if __name__ == "__main__":
    main()
